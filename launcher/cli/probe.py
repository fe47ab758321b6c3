"""`llaunch probe`: what this machine has (GPUs, links, CPU, RAM, SLURM allocation)."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="show GPUs, NVLink, CPU, RAM and the SLURM allocation of this machine")
    p.add_argument("--json", action="store_true", help="print the probe as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from launcher.planning.hardware import probe
    from launcher.units import format_bytes

    hw = probe()
    if args.json:
        print(json.dumps(hw.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if hw.gpus:
        table = Table(title=f"{len(hw.gpus)} GPU(s) on {hw.hostname}, driver {hw.driver}")
        for column in ("index", "name", "memory total", "memory free", "compute capability", "NVLink links"):
            table.add_column(column)
        for g in hw.gpus:
            table.add_row(str(g.index), g.name, format_bytes(g.memory_total), format_bytes(g.memory_free),
                          g.compute_capability, str(g.nvlink_links))
        console.print(table)
        facts = hw.facts
        console.print(f"datasheet: {facts.key}, {facts.peak_flops['bf16'] / 1e12:.0f} TFLOP/s bf16 ({facts.source})"
                      if facts else "datasheet: this GPU is not in launcher/planning/data/gpus.json; plans use --gpu to name one.")
    else:
        console.print(f"no NVIDIA GPU visible on {hw.hostname}: {hw.nvml_error or 'NVML found no device'}; plans run on CPU.")
    console.print(f"CPU: {hw.cpu_cores} cores; RAM: {format_bytes(hw.ram_bytes)} total, "
                  f"{format_bytes(hw.ram_available_bytes)} available")
    if hw.slurm:
        console.print(f"SLURM job {hw.slurm.job_id}: {hw.slurm.nodes} node(s) ({hw.slurm.nodelist}), "
                      f"{hw.slurm.gpus_per_node if hw.slurm.gpus_per_node is not None else 'no'} GPU(s) per node")
    else:
        console.print("SLURM: not inside an allocation")
    return 0
