"""`llaunch lr-find CONFIG`: LR range test on the config's own model and data; plot + suggested learning rate.

Runs in this process (one rank, no torchrun): an exponential sweep from --start-lr to --end-lr over
--num-steps optimizer steps, stopping early once the smoothed loss diverges. Writes DIR/lr_find.png and
DIR/lr_find.json, and prints the LR where the smoothed loss fell fastest (use it, or a little below it, as
training.learning_rate). The throw-away training job lives in a temporary directory, and DIR is never a
run's directory, so an LR sweep cannot touch a run's checkpoints or metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.errors import LaunchError
from launcher.knobs import LR_FIND, add_knob_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lr-find", help="learning-rate range test: plot and suggested learning rate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="train config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--output-dir", default="runs/lr-find", help="where lr_find.png and lr_find.json go (not a run's directory)")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=200)
    p.add_argument("--smoothing", type=float, default=0.98, help="EMA factor of the smoothed loss")
    add_knob_flags(p, LR_FIND)
    p.set_defaults(run=run)


def run(args) -> int:
    import tempfile

    from launcher.jobdir.prepare import prepare_job
    from launcher.knobs import cli_knobs, config_overrides
    from launcher.train import lr_find

    out = _output_dir(args.output_dir)
    lrs = lr_find.sweep_lrs(args.start_lr, args.end_lr, args.num_steps)
    if not 0 <= args.smoothing < 1:
        raise LaunchError(f"--smoothing {args.smoothing} must be in [0, 1).")
    overrides = [*args.overrides, f"training.max_steps={args.num_steps}", "training.save_strategy='no'",
                 "training.eval_steps=null", "training.resume_from_checkpoint=null", "parallel.nproc_per_node=1"]
    with tempfile.TemporaryDirectory(prefix="llaunch-lr-find-") as job_dir:
        job = prepare_job(args.config, overrides, flags=config_overrides(args), knobs=cli_knobs(args),
                          output_dir=job_dir)
        try:  # before the sweep, not after it
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LaunchError(f"cannot create {out} ({err.strerror or err}); choose a writable --output-dir.") from None
        from launcher.train.loop import Trainer
        from launcher.train.metrics import LOSS

        trainer = Trainer(job.output_dir)
        try:
            trainer.scheduler = lr_find.sweep_scheduler(trainer.engine.optimizer, lrs)
            trainer.engine.train()
            result = lr_find.run_lr_find(lambda: trainer.train_step()[LOSS], lrs, beta=args.smoothing)
        finally:
            trainer.close()
    if not result.lrs:
        raise LaunchError(f"the loss was not finite at the first step (lr {lrs[0]:.1e}); lower --start-lr or "
                          "check the data and model.")
    return _report(result, lrs, out)


def _output_dir(path: str) -> Path:
    """Where the plot goes: a directory that is not a training run's (an LR sweep never touches a run)."""
    from launcher.jobdir.prepare import is_run_dir

    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LaunchError(f"lr-find output {out} is a file; choose a directory for lr_find.png and lr_find.json.")
    if is_run_dir(out):
        raise LaunchError(f"{out} is a training run's directory; lr-find writes into its own, e.g. "
                          f"--output-dir {out.parent / 'lr-find'}.")
    return out


def _report(result, lrs, out: Path) -> int:
    """Write the plot and the JSON, print the suggestion; 1 when the sweep shows no clear descent."""
    import json

    from launcher.files import write_text_atomic
    from launcher.train import lr_find

    lr_find.plot(result, out / "lr_find.png")
    write_text_atomic(out / "lr_find.json", json.dumps(
        {"lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
         "suggested_lr": result.suggested_lr, "stopped_early": result.stopped_early}, indent=1))
    stop = "stopped when the loss diverged" if result.stopped_early else "full sweep"
    print(f"swept {len(result.lrs)} steps from {lrs[0]:.1e} to {result.lrs[-1]:.1e} ({stop}); plot: {out / 'lr_find.png'}")
    if result.suggested_lr is None:
        print("no clear descent in the loss; widen --start-lr/--end-lr or add --num-steps")
        return 1
    print(f"suggested learning rate: {result.suggested_lr:.2e}")
    return 0
