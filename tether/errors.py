"""User-facing errors.

A `TetherError` is a mistake in what the user asked for (bad timeline, missing
file, incompatible checkpoint). The CLI prints its message on one line and
exits non-zero, with no traceback. Anything else is a bug and keeps its traceback.
"""


class TetherError(Exception):
    pass
