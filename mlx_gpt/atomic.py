"""Replace files and directories so that a reader sees the old one or the new one, never half.

A directory is written as a temp sibling, then swapped in with two renames; between them the
previous version sits at ``.NAME.old``, where ``previous_version`` finds it after a crash. A
Ctrl-C during the renames is held back until they are done, so it never cuts a swap in half.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import deferred_interrupt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def previous_version(path: Path) -> Path:
    """Where the version being replaced waits while a new one is swapped in."""
    path = Path(path)
    if not path.name:  # ".", "": the folder they name
        path = path.absolute()
    return path.with_name(f".{path.name}.old")


@contextmanager
def replacing_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``out`` that replaces it only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 is for the temp only
        old = previous_version(out)
        with deferred_interrupt():
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replacing_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside ``out`` that replaces it only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        with deferred_interrupt():
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
