"""Photo-sized image folders from CIFAR-10: each image upsampled (bicubic, Pillow) and saved as a JPEG.

    .venv/bin/python benchmarks/photo_folders.py [--size 96 128] [--limit 10000] [--out DIR]
        [--data-dir ../shared/datasets] [--quality 90]

convae's benchmarks otherwise stop at 32x32; users' images do not. A folder of JPEGs is what a
user points `convae fit` at, so a benchmark reading these folders measures the decoding path
too. For each size it writes, by default into benchmarks/runs/photos-SIZE/ (gitignored):

    photos-96/train/airplane/00029.jpg ...   --limit images of CIFAR-10's train split
    photos-96/test/airplane/00003.jpg ...    --limit images of its test split

one subfolder per class, which `convae.load_dataset` turns into labels
(``load_dataset("benchmarks/runs/photos-96", "train")``, or the path of the split folder on the
command line). The file name is the image's index in its CIFAR-10 split. The images taken are
the first of each class in turn (balanced: with --limit 100, ten of each), so every class is in
both splits and the two folders' labels mean the same classes.

Idempotent and atomic: a folder is written in full under a temporary name next to it, with a
``.complete.json`` recording how it was made, then renamed into place; a folder whose record
matches the request is left as it is, one written by this script with other settings is
replaced, and a folder this script did not write is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from convae.data import load_dataset

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"
MARKER = ".complete.json"  # hidden: convae's folder scan skips dot files
SPLITS = ("train", "test")


def default_out(size: int) -> Path:
    return HERE / "runs" / f"photos-{size}"


def _record(size: int, limit: int | None, quality: int) -> dict:
    return {"source": "cifar10", "size": size, "limit": limit, "quality": quality, "resample": "bicubic"}


def _existing(out: Path) -> dict | None:
    """The record of a folder this script wrote, or None when there is no folder; SystemExit for a foreign one."""
    if not out.exists():
        return None
    try:
        return json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SystemExit(f"{out} exists and was not written by {Path(__file__).name}; pick another --out") from None


def balanced_first(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` images taken a class at a time (each class's first, then each one's second...), sorted."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)  # how many earlier images share the label
    for c in np.unique(labels):
        rank[labels == c] = np.arange(np.count_nonzero(labels == c))
    return np.sort(np.lexsort((labels, rank))[:limit])


def _write_split(root: Path, split: str, size: int, limit: int | None, quality: int, data_dir: Path) -> int:
    data = load_dataset("cifar10", split, data_dir=data_dir)
    picked = balanced_first(data.labels, limit)
    for c in np.unique(data.labels[picked]):  # no empty class folders: convae would see no such class anyway
        (root / split / data.classes[c]).mkdir(parents=True)
    for i in picked:
        image = Image.fromarray(data.images[i]).resize((size, size), Image.Resampling.BICUBIC)
        image.save(root / split / data.classes[data.labels[i]] / f"{i:05d}.jpg", quality=quality)
    return len(picked)


def write_photo_folder(
    size: int, out: Path | None = None, limit: int | None = 10_000, quality: int = 90, data_dir: Path = DEFAULT_DATA
) -> Path:
    """The folder for `size`, written unless a complete one with these settings is there; its path."""
    out = Path(out) if out is not None else default_out(size)
    wanted = _record(size, limit, quality)
    found = _existing(out)
    if found is not None and {k: found.get(k) for k in wanted} == wanted:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside its destination (same filesystem), so the rename that publishes it is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = {split: _write_split(tmp, split, size, limit, quality, data_dir) for split in SPLITS}
        (tmp / MARKER).write_text(json.dumps(wanted | {"images": counts}, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the folder from other users
        if found is not None:  # ours, with other settings: moved aside, then removed once the new one is in place
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[96, 128], help="image sides in pixels")
    parser.add_argument("--limit", type=int, default=10_000, help="images per split (0: all of them)")
    parser.add_argument("--out", type=Path, help="the folder (one --size only); default benchmarks/runs/photos-SIZE")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.out is not None and len(args.size) != 1:
        parser.error("--out names one folder: give one --size with it")
    if args.limit < 0 or any(s < 1 for s in args.size) or not 1 <= args.quality <= 95:
        parser.error("--limit must be >= 0, --size >= 1 and --quality 1-95")
    for size in args.size:
        out = write_photo_folder(size, args.out, args.limit or None, args.quality, args.data_dir)
        print(json.loads((out / MARKER).read_text(encoding="utf-8")) | {"folder": str(out)})


if __name__ == "__main__":
    main()
