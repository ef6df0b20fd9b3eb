"""The output guard: what convae writes never lands on something a user owns.

Every command that writes a file claims it first (:func:`claim_outputs`):

- the output is not one of the command's inputs (the same file by inode, or by resolved path);
- it is not a run directory's own file (config.json, model.safetensors, history.csv, anything
  under checkpoint/), nor a folder;
- the command holds an exclusive lock on it for as long as it writes (:func:`lock_output`: a
  flock on ``.NAME.lock`` beside it, the way ``fit`` locks a run directory), so a second convae
  process writing the same output is refused instead of interleaving its rows with the first's.

Temporaries are created exclusively (:func:`create_exclusive`): a path that exists, a symlink
above all, is never opened for writing. Torch-free: the CLI checks outputs before loading a model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._io import _mode_for, make_folders, storage_error
from .errors import ConvaeError

#: A run directory's own files (run.RUN_FILES, named here so this module imports no torch).
RUN_DIR_FILES = ("config.json", "model.safetensors", "history.csv")
RUN_DIR_FOLDERS = ("checkpoint",)
_LOCK_TRIES = 50  # a lock file unlinked by its releaser between our open and flock: try again


class OutputError(ConvaeError):
    """An output that would overwrite an input or a run's files, or that another process writes."""


def create_exclusive(path: str | os.PathLike, mode: int | None = None) -> int:
    """Create `path` (which must not exist) and return a descriptor open for writing.

    O_EXCL refuses any existing name, a dangling symlink included, so nothing a user (or an
    attacker) placed there is truncated or written through. `mode` defaults to the umask's.
    """
    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as e:
        raise OutputError(f"{_quote(path)} appeared while convae was about to create it; run the command again") from e
    except OSError as e:
        raise storage_error(path, e) from e
    os.fchmod(fd, _mode_for(path) if mode is None else mode)  # the umask's (0o600 only while empty)
    return fd


def regular_file_kind(path: str | os.PathLike) -> str:
    """'absent', 'file' (a regular file with one name) or what else sits at `path` (not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return "file" if st.st_nlink == 1 else "a file with other hard links"


def open_existing_for_update(path: str | os.PathLike) -> int:
    """A descriptor open for reading and writing on the regular, singly linked file `path`.

    Never follows a symlink, never blocks on a FIFO, never writes through a hard link into a
    file another name shares; anything else is an OutputError naming the path.
    """
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        kind = regular_file_kind(path)
        raise OutputError(f"{_quote(path)}: {kind}, not convae's own temporary file; remove it and run again") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a file with other hard links"
        raise OutputError(f"{_quote(path)}: {kind}, not convae's own temporary file; remove it and run again")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


# ---------------------------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------------------------
def lock_path_of(path: str | os.PathLike) -> Path:
    """feats.npy -> .feats.npy.lock, beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """An exclusive flock on an output's lock file; released (and the file removed) by release()."""

    def __init__(self, lock_file: Path, fd: int | None):
        self.lock_file, self._fd = lock_file, fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinked while still locked: a process that opened it meanwhile sees another inode at
        # the name once it gets the flock, and starts over on a fresh file.
        with contextlib.suppress(OSError):
            os.unlink(self.lock_file)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(path: str | os.PathLike, option: str = "output") -> OutputLock:
    """Lock `path` for this process (creating its folder); OutputError if another process holds it.

    The lock goes away with the process, even a killed one; a leftover lock file is harmless.
    Where flock is not supported (no fcntl, some network file systems) it is a no-op.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return OutputLock(lock_path_of(path), None)
    lock_file = lock_path_of(path)
    try:
        make_folders(path.parent)
    except OSError as e:
        raise storage_error(path, e) from e
    for _ in range(_LOCK_TRIES):
        fd = _open_lock_file(lock_file, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise OutputError(
                f"{_quote(path)} is being written by another convae process{holder}; "
                f"wait for it to finish or choose another {option}"
            ) from None
        except OSError:  # locks not supported here: go on unlocked, as fit does
            return OutputLock(lock_file, fd)
        if _still_named(fd, lock_file):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            remove_own_temporaries(path)  # a killed writer's: no other process writes `path` now
            return OutputLock(lock_file, fd)
        os.close(fd)
    raise OutputError(f"{_quote(path)}: could not lock {lock_file.name}; run the command again")


#: The names _io.atomic_path's temporaries have: ``.NAME.`` + mkstemp's 8 characters + ``.tmp``.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def remove_own_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer of `path` left beside it (a killed .npz packing's
    gigabytes, say); call only while holding its lock. Only regular files named exactly as
    convae names them (``.NAME.xxxxxxxx.tmp``) go: a user's look-alike with another shape stays."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            m = _TEMPORARY.fullmatch(entry.name)
            if m and m["name"] == path.name and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _open_lock_file(lock_file: Path, path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(lock_file, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise OutputError(f"{_quote(lock_file)}: not convae's lock file; remove it and run again") from e
        raise storage_error(path, e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{_quote(lock_file)}: not convae's lock file; remove it and run again")
    return fd


def _still_named(fd: int, lock_file: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock_file, follow_symlinks=False))
    except OSError:
        return False


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {int(text)})" if text.isdigit() else ""


# ---------------------------------------------------------------------------------------------
# what an output may not be
# ---------------------------------------------------------------------------------------------
def input_paths(*specs: object) -> list[Path]:
    """The files and folders named by a command's inputs (a DATA spec's ``:split`` tail dropped)."""
    found: list[Path] = []
    for spec in specs:
        if spec is None or spec == "":
            continue
        items = spec if isinstance(spec, (list, tuple)) else [spec]
        for item in items:
            text = os.fspath(item) if isinstance(item, os.PathLike) else str(item)
            for candidate in {text, text.rpartition(":")[0] or text}:
                if os.path.lexists(candidate):
                    found.append(Path(candidate))
    return found


def run_file_of(path: str | os.PathLike) -> str | None:
    """Which run directory file `path` is (e.g. 'config.json of the run X'), None if none.

    A run directory is a folder holding a config.json; its own files and anything under its
    checkpoint/ folder are convae's record of the run, which no other output may replace.
    """
    given = Path(path)
    path = Path(os.path.abspath(path))
    if path.name in RUN_DIR_FILES and (path.parent / "config.json").is_file():
        return f"{path.name} of the run {_quote(given.parent)}"
    for parent in path.parents:
        if parent.name in RUN_DIR_FOLDERS and (parent.parent / "config.json").is_file():
            return f"inside {parent.name}/ of the run {_quote(parent.parent)}"
    return None


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if os.path.samefile(a, b):  # hard links, symlinks, other spellings
            return True
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[Path] = (), option: str = "--output") -> None:
    """OutputError unless every output may be written: no folder, no input, no run's own file."""
    ins = list(inputs)
    for out in map(Path, outputs):
        if out.is_dir():
            raise OutputError(f"{option} {_quote(out)}: is a folder; give a file name")
        owner = run_file_of(out)
        if owner:
            raise OutputError(
                f"{option} {_quote(out)}: is {owner}; convae never writes over a run's own files, choose another name"
            )
        for source in ins:
            if _same_file(out, source):
                raise OutputError(
                    f"{option} {_quote(out)}: is also an input of this command; writing it would destroy "
                    "that input, choose another name"
                )


def check_side_files(
    main: str | os.PathLike, sides: Iterable[str | os.PathLike], previous: Iterable[str | os.PathLike] = ()
) -> None:
    """Side files (written beside `main` and named after it: OUT.labels.npy, OUT.index.csv,
    results.md) replace only an earlier output to `main`: with `main` (or one of `previous`, an
    unfinished one's files) there, they are that output's and go with it. Without, a file at a
    side file's name is someone else's, and it is refused rather than replaced without a word."""
    main = Path(main)
    if any(os.path.lexists(p) for p in (main, *previous)):
        return
    for side in map(Path, sides):
        if os.path.lexists(side):
            raise OutputError(
                f"{_quote(side)}: exists but {_quote(main.name)} does not, so it is no earlier output of this "
                f"command and writing {_quote(main.name)} would replace it; move it or choose another name"
            )


@contextlib.contextmanager
def claim_outputs(
    outputs: Iterable[str | os.PathLike], inputs: Iterable[Path] = (), option: str = "--output"
) -> Iterator[None]:
    """Check `outputs` (see :func:`check_outputs`) and hold a lock on each while the block runs.

    The first is the output the user named; the others are its side files (see
    :func:`check_side_files`), checked once all are locked.
    """
    outputs = [Path(p) for p in outputs]
    check_outputs(outputs, inputs, option)
    with contextlib.ExitStack() as stack:
        for out in outputs:
            stack.enter_context(lock_output(out, option))
        check_side_files(outputs[0], outputs[1:])
        yield


# ---------------------------------------------------------------------------------------------
# run directories and folders of other files
# ---------------------------------------------------------------------------------------------
def is_run_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a convae run: a config.json with a run's model and train records."""
    config = Path(directory) / "config.json"
    try:
        if not stat.S_ISREG(os.lstat(config).st_mode) or os.lstat(config).st_size > 1 << 20:
            return False
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and isinstance(document.get("model"), dict) and "train" in document


def holds_other_files(directory: str | os.PathLike) -> bool:
    """Whether `directory` exists and holds anything: a folder convae did not create for a run."""
    try:
        with os.scandir(os.fspath(directory)) as entries:
            return any(True for _ in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _quote(path: str | os.PathLike) -> str:
    """A path as one line: a name holding a newline or control character is shown quoted."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return repr(text) if any(ord(ch) < 32 or ch == "\x7f" for ch in text) else text
