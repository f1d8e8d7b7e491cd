"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class CurateError(Exception):
    """A user-facing error: bad input, missing files, wrong options. The message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
