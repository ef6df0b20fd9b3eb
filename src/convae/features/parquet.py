"""Features as one Parquet file: the rows' sources (index, path, label, class) as the first
columns, then one column per feature, named as the extractor names them.

Written from the finished extraction row group by row group, so memory stays bounded however
many rows there are; pandas (``pd.read_parquet``), polars and DuckDB read it directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._io import atomic_path
from .._version import __version__
from ..data.index import COLUMNS, SourceIndex
from ..errors import ConfigError

# Rows per row group: about 64 MB of float32 features a group, at least 1,024 rows.
_GROUP_BYTES = 64 << 20


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # a dependency, but an environment may lack it
        raise ConfigError("--format parquet needs pyarrow: pip install pyarrow") from e
    return pa, pq


def _text(values) -> list[str | None]:
    # Parquet strings are UTF-8: a file name that is not keeps its bytes as \x escapes
    return [
        None if v is None else v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for v in values
    ]


def write_parquet(
    out: str | os.PathLike, features: np.ndarray, index: SourceIndex, names: list[str], source: str
) -> None:
    """`features` (N, dim; a memmap is read a row group at a time) with `index` as one Parquet file, atomically."""
    pa, pq = _pyarrow()
    if len(names) != features.shape[1] or set(names) & set(COLUMNS):
        raise ConfigError(f"{out}: feature names do not fit {features.shape[1]} columns")
    feature_type = pa.float16() if features.dtype == np.float16 else pa.float32()
    fields = [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("class", pa.string()),
        *(pa.field(n, feature_type, nullable=False) for n in names),
    ]
    meta = {"convae": json.dumps({"version": __version__, "source": source, "features": len(names)})}
    schema = pa.schema(fields, metadata=meta)
    cols = index.columns()
    step = max(1024, _GROUP_BYTES // max(1, features.shape[1] * 4))
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(features), step):
            stop = min(start + step, len(features))
            block = np.ascontiguousarray(features[start:stop])
            arrays = [
                pa.array(cols["index"][start:stop], pa.int64()),
                pa.array(_text(cols["path"][start:stop]), pa.string()),
                pa.array(cols["label"][start:stop], pa.int64()),
                pa.array(_text(cols["class"][start:stop]), pa.string()),
                *(pa.array(block[:, j], feature_type) for j in range(block.shape[1])),
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


def is_parquet_features(path: str | os.PathLike) -> bool:
    """A Parquet file convae extract wrote (its metadata says so)."""
    _, pq = _pyarrow()
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # not Parquet at all
        return False
    return b"convae" in meta


def read_parquet(path: str | os.PathLike) -> tuple[np.ndarray, SourceIndex]:
    """(features, index) of a Parquet file :func:`write_parquet` wrote."""
    _, pq = _pyarrow()
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
    if table.column_names[: len(COLUMNS)] != list(COLUMNS):
        raise ConfigError(f"{path}: not convae features (expected the columns {', '.join(COLUMNS)} first)")
    features = np.column_stack([table.column(i).to_numpy() for i in range(len(COLUMNS), table.num_columns)])
    labels_col = table.column("label")
    labels = None if labels_col.null_count else labels_col.to_numpy().astype(np.int64)
    paths_col = table.column("path")
    paths = None if paths_col.null_count == len(paths_col) else [p or "" for p in paths_col.to_pylist()]
    classes = None
    if labels is not None:
        by_label = dict(zip(labels.tolist(), table.column("class").to_pylist()))
        if by_label and min(by_label) >= 0:
            classes = [str(by_label.get(k, k)) for k in range(max(by_label) + 1)]
    index = SourceIndex(table.column("index").to_numpy().astype(np.int64), paths, labels, classes)
    return features, index
