"""Exceptions that the command line turns into exit codes and one-line messages."""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


class BadInput(Exception):
    """The user's input cannot be used. The message is one line: what is wrong, where, and the fix."""


class Cancelled(BaseException):
    """The run was asked to stop (SIGTERM, Ctrl-C or a STOP file); its checkpoint, if any, has been written.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a library's optional
    import, a best-effort clean-up) can swallow a cancel."""
