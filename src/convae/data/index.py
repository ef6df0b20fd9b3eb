"""Where each image came from: :class:`SourceIndex`, one row per image, and its CSV file.

Columns, always in this order: ``index`` (the image's index in its split, or in the folder's
sorted listing of readable images), ``path`` (the file, relative to the folder; empty for
built-in datasets and arrays), ``label`` and ``class`` (empty without labels). Written beside
extracted features as ``OUT.index.csv`` and read back by ``load_features``; pandas and polars
read it as it is.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._io import atomic_open
from ..errors import DataError
from ..readback import open_bounded, quoted

COLUMNS: tuple[str, ...] = ("index", "path", "label", "class")


@dataclass
class SourceIndex:
    """Each row's source: `index` (int64), `paths` (or None), `labels` (or None) and the class names."""

    index: np.ndarray
    paths: Sequence[str] | None = None
    labels: np.ndarray | None = None
    classes: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        n = len(self.index)
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
        for name, column in (("paths", self.paths), ("labels", self.labels)):
            if column is not None and len(column) != n:
                raise DataError(f"source index: {len(column)} {name} for {n} rows")

    @classmethod
    def of_rows(cls, n: int, labels=None, classes=None) -> SourceIndex:
        """Rows 0..n-1 of an array with no other source."""
        return cls(np.arange(n, dtype=np.int64), None, labels, classes)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows) -> SourceIndex:
        """The rows at `rows` (a slice, indices or a mask)."""
        picked = np.arange(len(self))[rows]
        return SourceIndex(
            self.index[picked],
            None if self.paths is None else [self.paths[int(i)] for i in picked],
            None if self.labels is None else self.labels[picked],
            self.classes,
        )

    @classmethod
    def concatenate(cls, parts: Sequence[SourceIndex]) -> SourceIndex:
        """Shards' indexes, in order, as one."""
        paths = None if any(p.paths is None for p in parts) else [s for p in parts for s in p.paths or ()]
        labels = None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts])
        return cls(np.concatenate([p.index for p in parts]), paths, labels, parts[0].classes if parts else None)

    def class_names(self) -> list[str]:
        """Each row's class name ("" without labels; the label itself without class names)."""
        if self.labels is None:
            return [""] * len(self)
        names = list(self.classes or [])
        return [names[y] if 0 <= y < len(names) else str(y) for y in (int(v) for v in self.labels)]

    def columns(self) -> dict[str, list]:
        """{column: values} (``pandas.DataFrame(index.columns())``); missing values are None."""
        n = len(self)
        return {
            "index": self.index.tolist(),
            "path": list(self.paths) if self.paths is not None else [None] * n,
            "label": self.labels.tolist() if self.labels is not None else [None] * n,
            "class": self.class_names() if self.labels is not None else [None] * n,
        }

    def describe(self, row: int) -> str:
        """Row `row` in a few characters: its path, else #index."""
        return self.paths[row] if self.paths is not None else f"#{int(self.index[row])}"


def write_index_csv(path: str | os.PathLike, index: SourceIndex) -> None:
    """`index` as CSV at `path`, atomically. File names that are not UTF-8 keep their bytes."""
    cols = index.columns()
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in zip(*(cols[c] for c in COLUMNS)):
            writer.writerow(["" if v is None else v for v in row])


#: An index row: a number, a path (at most PATH_MAX bytes, quoted), a label and a class name.
_MAX_ROW_BYTES = 16 << 10


def read_index_csv(path: str | os.PathLike, rows: int | None = None) -> SourceIndex:
    """A SourceIndex from a CSV :func:`write_index_csv` wrote; a file of another shape is a DataError.

    With `rows` (how many the features beside it have), a file larger than that many rows can
    be is refused before it is read (the bounded reader: no FIFO waited on either).
    """
    bound = (rows + 1) * _MAX_ROW_BYTES if rows is not None else 1 << 40
    with open_bounded(path, bound, "a convae index", DataError) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        try:
            found = list(csv.reader(text))
        except csv.Error as e:
            raise DataError(f"{quoted(path)}: not a convae index ({e})") from None
    if not found or tuple(found[0]) != COLUMNS:
        raise DataError(f"{quoted(path)}: not a convae index (expected the columns {','.join(COLUMNS)})")
    body = found[1:]
    try:
        index = np.array([int(r[0]) for r in body], dtype=np.int64)
        has_labels = bool(body) and all(r[2] != "" for r in body)
        labels = np.array([int(r[2]) for r in body], dtype=np.int64) if has_labels else None
    except (ValueError, IndexError, OverflowError):
        raise DataError(f"{quoted(path)}: a row with a missing or non-integer index or label") from None
    paths = [r[1] for r in body] if body and any(r[1] for r in body) else None
    classes = _classes(labels, [r[3] for r in body]) if labels is not None else None
    return SourceIndex(index, paths, labels, classes)


def _classes(labels: np.ndarray, names: list[str]) -> list[str] | None:
    """Class names by label, from each row's (label, class); None when they disagree."""
    by_label: dict[int, str] = {}
    for y, name in zip(labels.tolist(), names):
        if by_label.setdefault(y, name) != name:
            return None
    if not by_label or min(by_label) < 0 or max(by_label) > 2 * len(labels) + 1000:
        return None  # labels far apart: a list of names up to the largest would dwarf the file
    return [by_label.get(k, str(k)) for k in range(max(by_label) + 1)]
