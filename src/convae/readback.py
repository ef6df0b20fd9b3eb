"""The bounded reader: every file convae reads back (config.json, history.csv, results.json,
progress records, checkpoints) goes through here.

Such files are convae's own, but a user or another program may have changed, replaced or
truncated them since. So each read:

- opens the file non-blocking and checks the open descriptor: a FIFO, a device or a socket in
  its place is refused at once, never waited on (no race between the check and the open);
- refuses a file above a size bound given by the caller (what the file can hold when convae
  wrote it), before reading a byte, and reads at most that many bytes if it grows meanwhile;
- turns every way decoding can fail (bad UTF-8, bad JSON, nesting deep enough for a
  RecursionError) into one line naming the file;
- offers :func:`field` for the checks after parsing: a missing key or a value of the wrong type
  is one line naming the file and the key, never a KeyError or a TypeError later.

Torch-free and a leaf (imports only ``errors`` and ``outputs``' quoting), so anything may use it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from typing import IO, Any

from .errors import ConvaeError
from .outputs import _quote


class ReadBackError(ConvaeError):
    """A file convae reads back that is not what convae wrote there."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class NotRegularFile(OSError):
    """What :func:`open_regular` found instead of a regular file: ``kind`` is "a FIFO", "a folder"..."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@contextlib.contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[tuple[IO[bytes], os.stat_result]]:
    """(binary file object, its stat) for the regular file `path`; :class:`NotRegularFile` for anything else.

    Opened non-blocking and checked on the open descriptor (then made blocking), so a FIFO,
    device or socket in the file's place is refused at once, never waited on, and nothing can
    be swapped in between the check and the open. OSError when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(_kind(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st


@contextlib.contextmanager
def open_bounded(
    path: str | os.PathLike, max_bytes: int, what: str, error: type[ConvaeError] = ReadBackError
) -> Iterator[IO[bytes]]:
    """A binary file object on the regular file `path` of at most `max_bytes` bytes, else `error`.

    `what` names the file's role in messages ("a convae config", "a probe results file").
    """
    with contextlib.ExitStack() as stack:
        try:
            f, st = stack.enter_context(open_regular(path))
        except NotRegularFile as e:
            raise error(f"{_quote(path)}: {e.kind}, not {what}; replace it") from None
        except OSError as e:
            raise error(f"{_quote(path)}: cannot read {what} ({e.strerror or e})") from e
        if st.st_size > max_bytes:
            raise error(
                f"{_quote(path)}: {st.st_size:,} bytes, too large for {what} (at most {max_bytes:,}); replace it"
            )
        yield f


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str, error: type[ConvaeError] = ReadBackError) -> bytes:
    """The whole file, bounded (see :func:`open_bounded`); a file that grew past the bound meanwhile is refused."""
    with open_bounded(path, max_bytes, what, error) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{_quote(path)}: cannot read {what} ({e.strerror or e})") from e
    if len(data) > max_bytes:
        raise error(f"{_quote(path)}: grew past {max_bytes:,} bytes while read, too large for {what}")
    return data


def read_text(path: str | os.PathLike, max_bytes: int, what: str, error: type[ConvaeError] = ReadBackError) -> str:
    try:
        return read_bytes(path, max_bytes, what, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{_quote(path)}: not UTF-8 text, not {what} (byte {e.start})") from e


def read_json(path: str | os.PathLike, max_bytes: int, what: str, error: type[ConvaeError] = ReadBackError) -> Any:
    """The parsed JSON document of `path`; bad JSON or absurd nesting is one line naming it."""
    raw = read_bytes(path, max_bytes, what, error)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError as e:
        raise error(f"{_quote(path)}: nested too deeply to be {what}") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{_quote(path)}: not valid JSON, not {what} ({reason[:200]})") from e


def read_csv_rows(
    path: str | os.PathLike, max_bytes: int, what: str, error: type[ConvaeError] = ReadBackError
) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts; ragged rows are refused."""
    text = read_text(path, max_bytes, what, error)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
        rows = list(reader)
    except csv.Error as e:
        raise error(f"{_quote(path)}: not {what} ({e})") from e
    for i, row in enumerate(rows, start=2):
        if "\0extra" in row or any(v is None for v in row.values()):
            raise error(f"{_quote(path)}: line {i} has another number of fields than the header; not {what}")
    return rows


def field(
    document: Any,
    key: str,
    kind: type | tuple[type, ...],
    path: str | os.PathLike,
    what: str,
    error: type[ConvaeError] = ReadBackError,
) -> Any:
    """``document[key]``, checked to be a `kind` (a bool is never an int or a float here)."""
    if not isinstance(document, dict):
        raise error(f"{_quote(path)}: a JSON {type(document).__name__}, not {what}")
    if key not in document:
        raise error(f"{_quote(path)}: no {key!r}, not {what}")
    value = document[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise error(f"{_quote(path)}: {key!r} is a {type(value).__name__}, expected {expected}; not {what}")
    return value


def quoted(path: str | os.PathLike) -> str:
    """A path as one line in a message (a newline in a name cannot start a line of its own)."""
    return _quote(path)


__all__ = ["ReadBackError", "field", "open_bounded", "quoted", "read_bytes", "read_csv_rows", "read_json", "read_text"]
