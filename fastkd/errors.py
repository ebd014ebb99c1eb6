"""Errors that reach the user as a one-line message (the CLI prints them, no traceback)."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says what and where."""
