"""How llaunch's processes end: the one exception a user can cause (the CLI turns it into one sentence and exit
code 2), and every exit code a llaunch process or rank chooses, in one place."""

# A rank that crashed (any other exit code, or a signal) ends the launch with this: not a user error (2), not a
# preemption (75) nor a hang (124), and not 128 + N, which says the launcher itself was signalled.
RANK_FAILED_EXIT_CODE = 1
EXIT_USER_ERROR = 2  # the process printed `llaunch: error: <what to do>`; nothing more needs saying
EXIT_CHECK_FAILED = 3  # `llaunch doctor`: a check failed; its lines name the node, the check and what to do
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". A rank, torchrun's wrapper
# and `llaunch run` exit with it after a preemption checkpoint; SLURM requeue logic keys on it.
REQUEUE_EXIT_CODE = 75
# Like coreutils timeout(1): the launcher's watchdog saw a rank stop making progress, dumped the stacks and
# killed the ranks (launcher.runtime.watchdog; the evidence is in the job dir's hangs/ folder).
HANG_EXIT_CODE = 124
# `python -m cluster.teardown --next-step`: the job starts no further step in its allocation (the batch
# script's loop of steps ends; cluster.submission.restart_lines).
NO_NEW_STEP_EXIT_CODE = 1


class LaunchError(Exception):
    """A mistake the user can fix: the message is one sentence that says what to do."""
