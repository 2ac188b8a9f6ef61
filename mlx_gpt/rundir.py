"""Output directories: claimed before anything is written, locked while one writer writes them,
and a run's log kept to exactly the steps its checkpoint holds.

``claim_out`` is how every command that writes a directory (train, fuse, convert, the ladder)
takes its ``--out``: it refuses an output that is one of the command's inputs, or that holds
what we did not write, or an existing result without ``--overwrite``; then it locks the output
and finishes or clears a save that was cut short. A save replaces the whole directory
(``atomic.replacing_directory``), so the directory must be ours alone: a folder holding anything
else, a file, or the working directory is refused, even with ``--overwrite``. The lock is an
``flock`` on ``.NAME.lock`` beside the directory (inside, it would be swapped away at every
save); the kernel drops it when the process dies, however it dies, so a stale lock file never
blocks the next writer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

from . import checkpoint
from .atomic import previous_version, replacing_file
from .checkpoint import CONFIG, METRICS
from .errors import UserError, filesystem_error


def claim_out(out: Path, **refusals) -> "RunLock":
    """Take ``out`` for one writer and return its (held) lock; release it when done. ``refusals``
    are ``check_claim``'s, which runs first."""
    check_claim(out, **refusals)
    lock = RunLock(out).acquire()
    try:
        clean_up(out)
    except BaseException:
        lock.release()
        raise
    return lock


def check_claim(out: Path, *, overwrite: bool = False, resume: bool = False,
                inputs: Mapping[str, str | os.PathLike | None] = {}, flag: str = "--out",
                check: Callable[[Path, str], None] | None = None, holds: Callable[[Path], bool] = checkpoint.exists,
                what: str = "a checkpoint", hint: str = "pass --overwrite to replace it") -> None:
    """``claim_out``'s refusals alone, for a command that checks its output before long work.

    ``inputs`` (what each is -> its path): what the command reads, which it must never replace.
    ``check(out, flag)`` refuses an output we did not write (default: ``check_out``, a run
    directory's); ``holds(out)`` says it already holds ``what``, which only ``overwrite`` (or
    ``resume``) may replace.
    """
    (check or check_out)(out, flag)
    for name, path in inputs.items():
        if path is not None and _same(out, Path(path)):
            raise UserError(f"{flag} {out} is {name}; a command never writes over what it reads: choose another "
                            "folder")
    if holds(out) and not (overwrite or resume):
        raise UserError(f"{out} already holds {what}; {hint}")


# what mlx_gpt writes into a folder in another project's layout (an export), and beside a single
# file it writes (an llm.c model): the record that it wrote them, which its files' names are not
WRITTEN = ".mlx_gpt-written"


def record_written(directory: Path) -> None:
    """Into a folder about to be swapped in: the names of the files we wrote there."""
    names = sorted(p.name for p in directory.iterdir() if p.name != WRITTEN)
    (directory / WRITTEN).write_text(json.dumps({"files": names}) + "\n")


def record_written_file(path: Path) -> None:
    """Beside a file now in place: that we wrote it (``check_export_file`` reads it)."""
    path.with_name(f".{path.name}{WRITTEN}").write_text("{}\n")


def _written_here(out: Path) -> bool:
    """Whether folder ``out`` holds our record and nothing it does not list."""
    try:
        record = json.loads((out / WRITTEN).read_text())
        present = {p.name for p in out.iterdir()} - {WRITTEN}
    except (OSError, ValueError):
        return False
    files = record.get("files") if isinstance(record, dict) else None
    return isinstance(files, list) and present <= {f for f in files if isinstance(f, str)}


def check_export(out: Path, flag: str) -> None:
    """An export's folder replaces only an empty folder, or one we wrote (our record, and no file
    it does not list): a folder of the same layout that someone else made is theirs."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _written_here(out))):
        raise UserError(f"{out} exists and was not written by mlx_gpt (no record of writing it, or files it does not "
                        "list); refusing to replace it even with --overwrite")


def check_export_file(out: Path, flag: str = "--out") -> None:
    """An export's file replaces only a regular file we wrote (its record beside it): never a
    user's file of the same name, what a link points to, or a device."""
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UserError(f"{out} exists and is not a regular file; refusing to replace it even with --overwrite")
    if out.exists() and not out.with_name(f".{out.name}{WRITTEN}").is_file():
        raise UserError(f"{out} exists and was not written by mlx_gpt; refusing to replace it even with --overwrite")


def check_file_out(out: Path, ours: Callable[[Path], bool], flag: str = "--out") -> None:
    """A file output (a picture) replaces only a regular file we wrote (``ours``), or takes a new
    path: never a folder, a device, what a link points to, a user's file, or a file inside a
    checkpoint (checkpoints are written whole, by the command that owns them)."""
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UserError(f"{flag} {out} is not a regular file (a folder, a device or a link); choose a new file")
    if checkpoint.exists(out.absolute().parent):
        raise UserError(f"{flag} {out} is inside the checkpoint {out.absolute().parent}, which only its own command "
                        "writes; choose a file outside it")
    if out.exists() and not ours(out):
        raise UserError(f"{flag} {out} exists and was not written by mlx_gpt; refusing to replace it: choose "
                        "another file")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_out(out: Path, flag: str = "--out", known: frozenset[str] = checkpoint.FILES) -> None:
    """Refuse an output directory that a save must not replace: a file (or a path through one),
    the working directory or a folder above it, a folder holding anything but a run's files, or
    run-like files without the checkpoint that would make them ours."""
    for p in (out, *out.absolute().parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == out else f"goes through the file {p}"
            raise UserError(f"{flag} {out} {what}; a run directory needs a folder of its own")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise UserError(f"{flag} {out} is the working directory (or holds it); each save replaces the run directory "
                        "whole, so give the run a folder of its own (e.g. checkpoints/NAME)")
    if not out.is_dir():
        return
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise filesystem_error(e, f"reading {out}") from None
    strangers = [n for n in names if n not in known and not _swap_leftover(n)]
    if strangers:
        more = f" and {len(strangers) - 3} more" if len(strangers) > 3 else ""
        raise UserError(f"{flag} {out} holds files that are not an mlx_gpt run ({', '.join(strangers[:3])}{more}); "
                        "refusing to replace it or write into it, even with --overwrite: choose another folder")
    if CONFIG in names and not checkpoint.is_config(out / CONFIG):
        raise UserError(f"{flag} {out} holds a config.json that is not an mlx_gpt run's; refusing to replace it or "
                        "write into it, even with --overwrite: choose another folder")
    # a folder is ours by what we wrote in it (a checkpoint's config, here or waiting in a cut-short
    # swap's .NAME.old), never by the names of the files it holds (a user's own metrics.jsonl)
    ours = (out / CONFIG).is_file() or checkpoint.is_config(previous_version(out) / CONFIG)
    contents = [n for n in names if not _swap_leftover(n)]
    if contents and not ours:
        raise UserError(f"{flag} {out} holds files ({', '.join(contents[:3])}) but no mlx_gpt checkpoint; refusing to "
                        "replace it or write into it, even with --overwrite: choose another folder")


def _swap_leftover(name: str) -> bool:
    """.NAME.tmp-*, .NAME.old, .NAME.lock: what our own saves and locks leave beside a directory."""
    return name.startswith(".") and (".tmp-" in name or name.endswith((".old", ".lock")))


class RunLock:
    """A lock on a run directory: exclusive for the one process that writes it, shared for those
    that read it while they work (a LoRA run pins its base), so neither sees the other's half
    (see the module doc)."""

    def __init__(self, out: Path, shared: bool = False, hint: str = "wait for it to finish or choose another --out"):
        self.out, self.shared, self.hint = out, shared, hint
        self.path = out.with_name(f".{out.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            if not self.shared:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except (PermissionError, OSError) as e:
                    if self.shared and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                        return self  # a folder nobody here may write is pinned already
                    raise
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    if self.shared:
                        raise UserError(f"{self.out} is being written by another mlx_gpt process (pid {holder}); "
                                        "wait for it to finish") from None
                    raise UserError(f"{self.out} is in use by another mlx_gpt process (pid {holder}); "
                                    f"{self.hint}") from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it as we opened it: take the new one
                    os.close(fd)
                    continue
                if not self.shared:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
        except OSError as e:
            raise filesystem_error(e, f"locking {self.out}") from None
        return self

    def release(self) -> None:
        if self._fd is not None:
            if not self.shared:  # readers leave the file to the others reading
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_up(out: Path) -> None:
    """Under the lock: remove temp folders of saves that were cut short, and finish a swap that a
    crash interrupted between its two renames (the whole previous checkpoint waits in .NAME.old)."""
    try:
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        old = previous_version(out)
        if (old / CONFIG).is_file() and not (out / CONFIG).is_file():
            if out.exists():
                shutil.rmtree(out)  # leftovers only (check_out passed): a log line written after the crash
            old.rename(out)
    except OSError as e:
        raise filesystem_error(e, f"cleaning up {out}") from None


def _step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class RunLog:
    """metrics.jsonl, one JSON object a line, describing exactly the run the checkpoint holds.

    Lines wait in memory and go into the directory with the next checkpoint, inside its atomic
    swap: a run that dies or fails between two saves leaves the log of the last one, and a fresh
    run (``--overwrite``, or a folder left with a lone log) starts a log of its own. A resumed
    run drops the lines of steps after its checkpoint, which older versions wrote as they went.
    """

    def __init__(self, out: Path, resumed_at: int | None):
        self.path = out / METRICS
        self.pending: list[str] = []
        self.owned = resumed_at is not None  # the file in out is this run's log
        if resumed_at is not None:
            self._truncate(resumed_at)

    def _truncate(self, step: int) -> None:
        try:
            if not self.path.is_file():
                return
            lines = self.path.read_text(errors="replace").splitlines(keepends=True)
            kept = [ln for ln in lines if ln.endswith("\n") and (_step(ln) is not None and _step(ln) <= step)]
            if kept != lines:
                with replacing_file(self.path) as tmp:
                    tmp.write_text("".join(kept))
        except OSError as e:
            raise filesystem_error(e, f"rewriting {self.path}") from None

    def write(self, record: dict) -> None:
        self.pending.append(json.dumps(record) + "\n")

    def evaluated(self) -> bool:
        """Whether an evaluation was logged since the last save."""
        return any('"val_loss"' in line for line in self.pending)

    def text(self) -> str:
        """The log as the next checkpoint holds it."""
        try:
            written = self.path.read_text() if self.owned and self.path.is_file() else ""
        except OSError as e:
            raise filesystem_error(e, f"reading {self.path}") from None
        return written + "".join(self.pending)

    def saved(self) -> None:
        """The checkpoint, with ``text()``, is in."""
        self.owned = True
        self.pending.clear()
