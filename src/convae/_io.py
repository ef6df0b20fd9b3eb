"""Atomic file writes: a file convae writes appears whole or not at all.

Every file is written to a temporary ``.NAME.XXXX.tmp`` beside it, fsynced, and renamed over
``NAME``; a crash at any moment leaves either the previous file or the new one, never a mix.
A full disk or an unwritable folder raises :class:`~convae.errors.StorageError` (one line,
naming the file) and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .errors import StorageError

#: errno values that mean "the disk (or quota) is full".
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_folders(folder: str | os.PathLike) -> None:
    """``mkdir -p`` without recursion (pathlib's and os.makedirs recurse once per missing level,
    so a path thousands of folders deep would be a RecursionError): FileExistsError never,
    other OSErrors as they come."""
    folder = Path(folder)
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:
            if not level.is_dir():
                raise


def storage_error(path: str | os.PathLike, e: OSError) -> StorageError:
    """A one-line StorageError for an OSError met while writing `path`."""
    path = Path(path)
    if e.errno in DISK_FULL:
        message = (
            f"cannot write {path}: no space left on device; the previous {path.name}, if any, is kept "
            "(free some space, then run the command again)"
        )
    else:
        reason = (e.strerror or str(e) or type(e).__name__).replace("\n", " ")
        message = f"cannot write {path}: {reason}"
    return StorageError(message, e.errno, str(path))


def _mode_for(path: Path) -> int:
    """The permissions the file being replaced has, else those of a new file under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # Linux shows the umask without changing it; elsewhere reading it means setting it for an
    # instant, which a thread creating a file at that moment could see.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success, fsync and rename it over `path`.

    On error the temporary file is removed and `path` is untouched. OSErrors of the commit
    (and a full disk met inside the block) become a :class:`StorageError` naming `path`.
    """
    path = Path(path)
    try:
        make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _mode_for(path))  # mkstemp's 0600 would make every file private
        finally:
            os.close(fd)
    except OSError as e:
        raise storage_error(path, e) from e
    tmp_path = Path(tmp)
    committing = False
    try:
        yield tmp_path
        committing = True
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, StorageError) and (committing or e.errno in DISK_FULL):
            raise storage_error(path, e) from e
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces `path` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` atomically. Serialize to memory first and write with this: Python's own
    writes report a full disk as ENOSPC, where C++ and Rust writers raise vaguer errors."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def remove_stale_tmp(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files a killed writer of `names` in `directory` left behind.

    Only ``.NAME.*.tmp`` files of the given names are touched; call it only while no other
    process writes them (e.g. holding :func:`lock_dir`).
    """
    directory = Path(directory)
    removed = []
    for name in names:
        target = directory / name
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
    return removed


class DirLock:
    """An exclusive advisory lock (flock) on a directory, released when the process dies."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_dir(directory: str | os.PathLike) -> DirLock | None:
    """Lock `directory` for this process; None when another process holds the lock.

    Where locks are not supported (no fcntl, some network file systems) the lock is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return DirLock(None)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return DirLock(None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        return DirLock(None)
    return DirLock(fd)
