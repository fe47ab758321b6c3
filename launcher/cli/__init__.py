"""`llaunch` entry point: every module in this package is a subcommand with add_parser() and run().

Subcommand modules import heavy libraries (torch, transformers) inside run(), so that
`llaunch plan` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys
import time

from launcher import __version__
from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.runtime.import_noise import quiet_import_noise

NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one path component and on a whole path, in bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llaunch",
        description="Plan, launch and resume language-model training on the right GPUs with the right parallelism.",
    )
    parser.add_argument("--version", action="version", version=f"llaunch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()  # `llaunch run`'s launch event: reading and planning the job is start-up
    quiet_import_noise()
    args = build_parser().parse_args(argv)
    args.started_at = started_at
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, not at interpreter exit
        return code
    except LaunchError as err:
        print(f"llaunch: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("llaunch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llaunch status | head`: the reader left; say nothing more, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        # a path the user gave (or one llaunch derives from it) that the file system refuses: any command, any step
        name = os.fsdecode(err.filename or "")
        shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(os.fsencode(name))} bytes)"
        print(f"llaunch: error: the path {shown} is too long ({err.strerror}: at most {NAME_MAX} bytes a name and "
              f"{PATH_MAX} in all); choose a shorter one.", file=sys.stderr)
        return EXIT_USER_ERROR
