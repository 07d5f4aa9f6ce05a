"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do.

    The command line prints it without a traceback and exits non-zero; internal invariants use
    plain asserts instead.
    """
