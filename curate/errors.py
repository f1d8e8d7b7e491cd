"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class CurateError(Exception):
    """A user-facing error: bad input, missing files, wrong options. The message is one line."""
