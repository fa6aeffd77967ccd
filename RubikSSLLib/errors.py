"""Exceptions that the command line turns into exit codes and one-line messages."""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


class BadInput(Exception):
    """The user's input cannot be used. The message is one line: what is wrong, where, and the fix."""


class Cancelled(Exception):
    """The run was asked to stop (SIGTERM or a STOP file); its checkpoint has been written."""
