"""`python -m launcher.train --job-dir DIR`: read DIR/plan.yaml and DIR/config.yaml, train, write into DIR."""

from __future__ import annotations

import argparse
import os
import sys

from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.runtime.import_noise import quiet_import_noise
from launcher.runtime.signals import StopSignals, die_with_supervisor, ignore_stop_signals
from launcher.runtime.terminal import outlive_the_terminal
from launcher.runtime.torchrun import RANK_STARTS


def main(argv: list[str] | None = None) -> int:
    die_with_supervisor()  # a rank never outlives the torchrun agent that started it
    outlive_the_terminal()  # a closed terminal must not end a rank in its stop checkpoint
    # Then, before torch is imported: a rank inherits SIG_IGN for the stop signals from its launcher,
    # and a preemption that came while the model is being built would otherwise be dropped.
    early_signals = StopSignals().install()
    quiet_import_noise()
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__)
    parser.add_argument("--job-dir", required=True, help="the job directory `llaunch run` or `submit` wrote (its plan and config)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        print(RANK_STARTS.format(rank=os.environ["RANK"], world=os.environ["WORLD_SIZE"]), flush=True)
    from launcher.train.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(args.job_dir, early_signals=early_signals)
        return trainer.train()
    except LaunchError as err:
        print(f"llaunch: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C reaches every rank through torchrun: stop quietly
        return 130
    finally:
        if trainer is not None:
            trainer.close()  # gives its signals back to early_signals' recorder, which is harmless
        ignore_stop_signals()  # stopping already: a late copy must not kill the rank while Python shuts down


def exit_now(code: int) -> None:
    """End the rank without the interpreter's teardown. Its work is durable by now (checkpoints and the final
    model renamed into place, the ledger fsynced, metrics and TensorBoard closed, the process group destroyed),
    and tearing down torch's, gloo's and bitsandbytes' C++ state has aborted a finished rank under load
    ("terminate called without an active exception", SIGABRT), which turned a finished run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
