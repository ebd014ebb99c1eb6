"""Errors that reach the user as a one-line message (the CLI prints them, no traceback)."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says what and where."""


class Interrupted(UserError):
    """A run stopped on request (SIGTERM/SIGINT) after saving what it needs to resume; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message is for the user, the app's and the lower layers' (which import nothing from
    the app): the CLI prints them as one line; anything else is a bug and keeps its traceback."""
    from fastkd.cache_tools import CacheError
    from fastkd.kernels import LossInputError

    return (UserError, CacheError, LossInputError)
