"""The one exception type for mistakes a user can make, and the CLI wrapper that prints it."""

from __future__ import annotations

import errno
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence


class UserError(Exception):
    """Bad input: a missing file, an impossible config, a corrupt checkpoint.

    The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
    traceback.
    """


# Errors of the file system, not of the program: a full disk, a read-only mount, a file where a
# folder belongs. Each is the user's to fix, so it is reported like a UserError.
FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                     errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.ENOENT,
                     errno.ENOTEMPTY, errno.EMFILE, errno.ELOOP}


def describe_os_error(e: OSError) -> str:
    """``No space left on device: checkpoints/run/model.safetensors``."""
    text = e.strerror or str(e)
    return f"{text}: {e.filename}" if e.filename else text


def filesystem_error(e: OSError, doing: str) -> UserError:
    """A UserError for an OSError met while ``doing`` something (``saving checkpoint X``)."""
    return UserError(f"{doing} failed: {describe_os_error(e)}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _leave(message: str, code: int) -> None:
    """Print the last line and exit; a further Ctrl-C can no longer cut it short."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a CLI ``main`` and turn a UserError, a file system error or Ctrl-C into one line and an
    exit code (2, 2, 130)."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main(argv)
    except UserError as e:
        _leave(f"error: {e}", 2)
    except KeyboardInterrupt:
        _leave("interrupted", 130)
    except OSError as e:
        if e.errno not in FILESYSTEM_ERRNOS:
            raise
        _leave(f"error: {describe_os_error(e)}", 2)


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done (a save's renames), then deliver it."""
    if not _main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
