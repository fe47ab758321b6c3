"""`llaunch lr-find CONFIG`: LR range test on the config's own model and data; plot + suggested learning rate.

Runs in this process (one rank, no torchrun): an exponential sweep from --start-lr to --end-lr over
--num-steps optimizer steps, stopping early once the smoothed loss diverges. Writes DIR/lr_find.png and
DIR/lr_find.json, and prints the LR where the smoothed loss fell fastest (use it, or a little below it, as
training.learning_rate).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lr-find", help="learning-rate range test: plot and suggested learning rate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="train config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--output-dir", default="runs/lr-find", help="where the plot and the sweep go (replaced)")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=200)
    p.add_argument("--smoothing", type=float, default=0.98, help="EMA factor of the smoothed loss")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from launcher.job import prepare_job
    from launcher.train import lr_find

    lrs = lr_find.sweep_lrs(args.start_lr, args.end_lr, args.num_steps)
    overrides = [*args.overrides, f"training.max_steps={args.num_steps}", "training.overwrite_output_dir=true",
                 "training.save_strategy='no'", "training.eval_steps=null", "parallel.nproc_per_node=1"]
    job = prepare_job(args.config, overrides, output_dir=args.output_dir)
    from launcher.train.loop import Trainer

    trainer = Trainer(job.output_dir)
    trainer.scheduler = lr_find.sweep_scheduler(trainer.engine.optimizer, lrs)
    trainer.engine.train()
    result = lr_find.run_lr_find(trainer.train_step, lrs, beta=args.smoothing)
    out = Path(job.output_dir)
    lr_find.plot(result, out / "lr_find.png")
    (out / "lr_find.json").write_text(json.dumps(
        {"lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
         "suggested_lr": result.suggested_lr, "stopped_early": result.stopped_early}, indent=1))
    trainer.close()
    stop = "stopped when the loss diverged" if result.stopped_early else "full sweep"
    print(f"swept {len(result.lrs)} steps from {lrs[0]:.1e} to {result.lrs[-1]:.1e} ({stop}); plot: {out / 'lr_find.png'}")
    if result.suggested_lr is None:
        print("no clear descent in the loss; widen --start-lr/--end-lr or add --num-steps")
        return 1
    print(f"suggested learning rate: {result.suggested_lr:.2e}")
    return 0
