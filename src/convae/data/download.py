"""Downloads of missing built-in datasets, verified against the official checksums before use."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from .._io import atomic_path
from ..errors import DataError
from ..progress import progress_bar
from .containers import error_reason
from .dirs import DATASET_FOLDERS

_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20

#: Official MD5 checksums of the downloaded files (as torchvision lists them). Tests monkeypatch this.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
}

#: Base URLs tried in order. ``$CONVAE_DOWNLOAD_URL`` replaces them with ``<base>/<folder>/``.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}


class _DownloadFailed(Exception):
    pass


def _download_missing(name: str, files: list[str], dirs: list[Path], download: bool, progress: bool) -> Path:
    """Download `files` of dataset `name` into the first writable data dir; return its dataset folder."""
    folder_name = DATASET_FOLDERS[name]
    shown = dirs[0] / folder_name
    head = f"{name} not found: place {', '.join(files)} in {shown}{os.sep} (or pass --data-dir / set CONVAE_DATA)"
    if not download:
        raise DataError(head)
    target = None
    for d in dirs:
        folder = d / folder_name
        existed = folder.is_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            target = folder
            break
    if target is None:
        raise DataError(f"{head}; download failed: none of {', '.join(map(str, dirs))} is writable")
    base = os.environ.get("CONVAE_DOWNLOAD_URL")
    bases = [f"{base.rstrip('/')}/{folder_name}/"] if base else list(MIRRORS[name])
    for fname in files:
        dest = target / fname
        if dest.is_file():
            continue
        md5 = CHECKSUMS.get(name, {}).get(fname)
        errors = []
        for b in bases:
            url = b + fname
            try:
                _fetch(url, dest, md5, progress)
                break
            except _DownloadFailed as e:
                errors.append(str(e))
        else:
            if not existed:  # leave no empty dataset folder behind
                try:
                    target.rmdir()
                except OSError:
                    pass
            reason = "; ".join(errors) or "no download source"
            raise DataError(f"{head}; download failed: {reason}".replace("\n", " "))
    return target


def _fetch(url: str, dest: Path, md5: str | None, progress: bool) -> None:
    """Download `url` to `dest` through a temporary file, renamed only when the MD5 matches."""
    if not md5:
        raise _DownloadFailed(f"no checksum known for {dest.name}")
    try:
        with atomic_path(dest) as tmp:
            h = hashlib.md5()
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with progress_bar(progress, total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            got = h.hexdigest()
            if got != md5.lower():
                raise _DownloadFailed(f"checksum mismatch for {dest.name} from {url} (md5 {got}, expected {md5})")
    except _DownloadFailed:
        raise
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _DownloadFailed(f"{url}: {e.reason}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _DownloadFailed(f"{url}: {error_reason(e)}") from e
