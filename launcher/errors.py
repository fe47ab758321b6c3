"""The one exception a user can cause; the CLI turns it into one sentence and exit code 2."""

EXIT_USER_ERROR = 2  # the process printed `llaunch: error: <what to do>`; nothing more needs saying
EXIT_CHECK_FAILED = 3  # `llaunch doctor`: a check failed; its lines name the node, the check and what to do


class LaunchError(Exception):
    """A mistake the user can fix: the message is one sentence that says what to do."""
