"""The one exception type for mistakes a user can fix."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do.

    The command line prints it without a traceback and exits non-zero; internal invariants use
    plain asserts instead.
    """


def run_cli(body: Callable[[], int]) -> int:
    """Runs a command's `body` and returns its exit status; the one place CLIs turn errors into it.

    A UserError prints `error: <message>` on stderr (exit 2); Ctrl-C prints `interrupted` (exit
    130, as shells report SIGINT); neither shows a traceback. Whatever the body was writing must
    clean up on its way out (see `checkpoint.atomic_directory`).
    """
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
