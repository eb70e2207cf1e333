"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class HpcmlError(Exception):
    """A runtime failure with a message that names what was wrong (exit code 1)."""

    exit_code = 1


class UsageError(HpcmlError):
    """Invalid input: a bad name, value, file or flag (exit code 2)."""

    exit_code = 2
