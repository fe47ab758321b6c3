"""The one exception a user can cause; the CLI turns it into one sentence and exit code 2."""


class LaunchError(Exception):
    """A mistake the user can fix: the message is one sentence that says what to do."""
