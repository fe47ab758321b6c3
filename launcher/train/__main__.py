"""`python -m launcher.train --job-dir DIR`: read DIR/plan.yaml and DIR/config.yaml, train, write into DIR."""

from __future__ import annotations

import argparse
import sys

from launcher.errors import EXIT_USER_ERROR, LaunchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__)
    parser.add_argument("--job-dir", required=True, help="directory with plan.yaml and config.yaml (llaunch run writes them)")
    args = parser.parse_args(argv)
    from launcher.train.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(args.job_dir)
        return trainer.train()
    except LaunchError as err:
        print(f"llaunch: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C reaches every rank through torchrun: stop quietly
        return 130
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
