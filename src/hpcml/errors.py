"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class HpcmlError(Exception):
    """A runtime failure with a message that names what was wrong (exit code 1)."""

    exit_code = 1


class UsageError(HpcmlError):
    """Invalid input: a bad name, value, file or flag (exit code 2)."""

    exit_code = 2


def error_message(exc: BaseException) -> str:
    """hpcml's own errors already read well; anything else keeps its type name."""
    if isinstance(exc, HpcmlError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def exit_message(code: int | None) -> str:
    """Why a worker process ended without a result, from its exit code (negative: the signal)."""
    import signal

    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory, or killed from outside?)" if -code == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {code} before sending a result"
