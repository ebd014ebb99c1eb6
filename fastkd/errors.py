"""Errors that reach the user as a one-line message (the CLI prints them, no traceback)."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says what and where."""


class Interrupted(UserError):
    """A run stopped on request (SIGTERM/SIGINT) after saving what it needs to resume; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
