"""Errors that reach the user as a one-line message (the CLI prints them, no traceback)."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says what and where."""


class Interrupted(UserError):
    """A run stopped on request (SIGTERM/SIGINT) after saving what it needs to resume; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type whose message is meant for the user: the app's own and those the lower
    layers (cache_tools, kernels) raise, which import nothing from the app. The CLI prints these as
    one line; anything else is a bug and keeps its traceback."""
    from fastkd.cache_tools import CacheError
    from fastkd.kernels import LossInputError

    return (UserError, CacheError, LossInputError)
