"""The one exception type for mistakes a user can make, and the CLI wrapper that prints it."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input: a missing file, an impossible config, a corrupt checkpoint.

    The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
    traceback.
    """


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a CLI ``main`` and turn a UserError (or Ctrl-C) into a one-line message and exit code."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
