"""Errors that are the user's to fix. The CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """A mistake in what the user asked for or pointed us at: a bad path, a corrupt file, a wrong shape.

    The message is a complete sentence that says what was wrong and, where it helps, what to do.
    """

    exit_code = 2


class CheckFailed(Exception):
    """A parity or validation check ran and did not pass (exit code 1)."""

    exit_code = 1
