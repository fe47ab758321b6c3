"""`llaunch submit --sweep` without SLURM: the grid and its element names, the dry run that plans every element
(a sweep over the model gets a plan per model) and writes nothing, and `llaunch status SWEEP`'s table with the
best element by eval loss. tests/slurm/test_slurm_sweep.py runs a sweep as a real job array."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from cluster.jobs import JobRecord, JobState
from launcher.cli import main
from launcher.jobdir.sweep_dir import SweepDir, SweepElement, SweepRecord
from launcher.planning.plan import Plan
from launcher.sweep import grid, parse_axes, split_values

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("1e-4, 3e-4,1e-3") == ["1e-4", "3e-4", "1e-3"]
    assert split_values("[q_proj,v_proj],[all-linear]") == ["[q_proj,v_proj]", "[all-linear]"]
    assert split_values("{hidden_size: 32, num_hidden_layers: 2},{hidden_size: 64}") == [
        "{hidden_size: 32, num_hidden_layers: 2}", "{hidden_size: 64}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_the_grid_varies_the_last_axis_fastest_and_names_each_element_by_its_values():
    axes = parse_axes(["training.learning_rate=1e-4,3e-4", "model.name_or_path=/models/a b,llama-3.2-1b"], (), ())
    elements = grid(axes)
    assert [e.name for e in elements] == [
        "learning_rate=1e-4_name_or_path=-models-a-b", "learning_rate=1e-4_name_or_path=llama-3.2-1b",
        "learning_rate=3e-4_name_or_path=-models-a-b", "learning_rate=3e-4_name_or_path=llama-3.2-1b"]
    assert elements[1].overrides == ("training.learning_rate=1e-4", "model.name_or_path=llama-3.2-1b")


def test_dry_run_plans_every_element_for_the_array_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster" / "slurm.conf"))  # no SLURM needed
    out, config = tmp_path / "sweep", tmp_path / "quickstart.yaml"  # outside git: llaunch alone is frozen
    config.write_text(QUICKSTART.read_text())
    code = main(["submit", str(config), "data.max_train_bytes=200000", "model.overrides={}",
                 "--cluster", "example-h100", "--nodes", "2", "--output-dir", str(out),
                 "--sweep", "model.name_or_path=llama-3.2-1b,llama-3.1-70b",
                 "--sweep", "training.learning_rate=1e-4,3e-4", "--max-parallel", "3", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --array=0-3%3" in printed and "#SBATCH --nodes=2" in printed
    assert f"cd {out / 'code' / 'llaunch'}" in printed.splitlines()  # every element starts in the sweep's frozen code
    assert f"--output={out}/slurm/%A_%a_0_log.out" in printed  # one submitit folder for the whole array
    headers = re.findall(r"^# element (\d) \(array task \d\): (.*), in (.*)$", printed, re.M)
    assert [(int(i), label) for i, label, _ in headers] == [
        (0, "model.name_or_path=llama-3.2-1b training.learning_rate=1e-4"),
        (1, "model.name_or_path=llama-3.2-1b training.learning_rate=3e-4"),
        (2, "model.name_or_path=llama-3.1-70b training.learning_rate=1e-4"),
        (3, "model.name_or_path=llama-3.1-70b training.learning_rate=3e-4")]
    assert headers[3][2] == str(out / "name_or_path=llama-3.1-70b_learning_rate=3e-4")
    node_lines = [line for line in printed.splitlines() if "launcher.runtime.torchrun" in line]
    assert [shlex.split(line)[-1] for line in node_lines] == [dir_ for _, _, dir_ in headers]
    plans = [Plan.from_dict(yaml.safe_load(text.split("\n# ")[0]))
             for text in printed.split("# its plan:\n")[1:]]
    assert [plan.model for plan in plans] == ["llama-3.2-1b"] * 2 + ["llama-3.1-70b"] * 2
    # planned per model: the 70B's weights and states do not fit replicated within a node, the 1B's do
    assert plans[0].params < plans[2].params and plans[0].strategy != plans[2].strategy
    assert plans[0].strategy == plans[1].strategy and plans[2].strategy == plans[3].strategy
    assert not out.exists() and not (tmp_path / "home").exists()


def test_status_of_a_sweep_is_one_table_with_the_best_element_by_eval_loss(tmp_path, monkeypatch, capsys):
    import cluster.sweep

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    sweep_dir = SweepDir(tmp_path / "sweep")
    elements = [SweepElement(f"learning_rate={lr}", (f"training.learning_rate={lr}",))
                for lr in ("1e-4", "3e-4", "1e-3")]
    SweepRecord(name="llaunch-quickstart", cluster="local", elements=elements, array_job_id="41").save(sweep_dir)
    for element, (step, loss, eval_loss) in zip(elements, [(40, 6.1, 6.3), (40, 5.2, 5.4), (25, 5.0, None)]):
        rows = [{"step": step, "loss": loss}] + ([{"step": step, "eval_loss": eval_loss}] if eval_loss else [])
        sweep_dir.element(element.name).mkdir()
        (sweep_dir.element(element.name) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    states = {"41_0": JobState("COMPLETED"), "41_1": JobState("COMPLETED", restarts=1), "41_2": JobState("RUNNING")}
    monkeypatch.setattr(cluster.sweep, "job_state", lambda job_id, env: states[job_id])
    JobRecord("41", "llaunch-quickstart", str(sweep_dir.root), str(sweep_dir.slurm), 1, "local").save()
    assert main(["status", "41"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep 41 (llaunch-quickstart): 3 element(s) as one job array, in {sweep_dir.root}"
    assert lines[1].split() == ["job", "element", "state", "step", "loss", "eval", "loss", "goodput"]
    assert lines[2].split() == ["41_0", "learning_rate=1e-4", "COMPLETED", "40", "6.1000", "6.3000", "-"]
    assert lines[3].split() == ["41_1", "learning_rate=3e-4", "COMPLETED", "(requeued", "1)", "40", "5.2000",
                                "5.4000", "-"]
    assert lines[4].split() == ["41_2", "learning_rate=1e-3", "RUNNING", "25", "5.0000", "-", "-"]
    assert lines[5] == (f"  best by eval loss: learning_rate=3e-4 (job 41_1), eval loss 5.4000 at step 40: "
                        f"{sweep_dir.element('learning_rate=3e-4')}")
    assert main(["logs", "41"]) == 2  # each element has its own logs
    assert "give one element's id, e.g. `llaunch logs 41_0`" in capsys.readouterr().err


def test_submit_writes_the_sweep_record_every_element_and_waits_for_all(tmp_path, monkeypatch, capsys):
    """sbatch replaced by a stand-in that returns array 73: the records `status`, `logs` and `cancel` read are
    written (the sweep's last, so `llaunch status` lists it first), each element's job dir holds its own config,
    and `--wait` answers 0 only when every element completed."""
    import cluster.executor
    import cluster.slurm_checks
    import cluster.sweep

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cluster.slurm_checks, "slurm_reachable", lambda env: None)
    monkeypatch.setattr(cluster.slurm_checks, "check_partition", lambda profile, env: None)
    submitted = {}

    def submit_array(sweep_dir, tasks, profile, name, env, container, max_parallel, frozen):
        submitted.update(tasks=tasks, max_parallel=max_parallel, frozen=frozen)
        return "73"

    ends = iter([["COMPLETED", "COMPLETED"], ["COMPLETED", "FAILED"]])
    monkeypatch.setattr(cluster.sweep, "submit_array", submit_array)
    monkeypatch.setattr(cluster.sweep, "wait_for_sweep", lambda record, env: [JobState(s) for s in next(ends)])
    monkeypatch.setattr(cluster.sweep, "job_state", lambda job_id, env: JobState("COMPLETED"))
    out, config = tmp_path / "sweep", tmp_path / "quickstart.yaml"  # outside git: llaunch alone is frozen
    config.write_text(QUICKSTART.read_text())
    argv = ["submit", str(config), "data.max_train_bytes=200000", "--output-dir", str(out),
            "--sweep", "training.seed=1,2", "--max-parallel", "1", "--wait"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted sweep 73 (llaunch-quickstart): 2 element(s) as one job array" in printed
    assert "sweep 73 (llaunch-quickstart): 2 element(s)" in printed.split("follow:")[1]  # --wait's table
    assert [task.job_dir for task in submitted["tasks"]] == [str(out / "seed=1"), str(out / "seed=2")]
    assert submitted["max_parallel"] == 1
    assert submitted["frozen"].folder == out / "code" and (out / "code" / "llaunch" / "launcher").is_dir()  # once
    assert SweepRecord.load(SweepDir(out)).array_job_id == "73"
    for seed in (1, 2):
        assert yaml.safe_load((out / f"seed={seed}" / "config.yaml").read_text())["training"]["seed"] == seed
    records = {p.stem: p for p in (tmp_path / "home").rglob("*.json")}
    assert sorted(records) == ["73", "73_0", "73_1"]
    assert records["73"].stat().st_mtime >= max(records[e].stat().st_mtime for e in ("73_0", "73_1"))
    assert json.loads(records["73_0"].read_text())["output_dir"] == str(out / "seed=1")
    assert json.loads(records["73"].read_text())["output_dir"] == str(out)
    assert main(argv) == 1  # the same sweep again resumes into the same dirs; one element failed
