"""Datasets: built-in benchmarks, folders of images and .npy/.npz arrays, all as uint8 NHWC.

    load.py        load_dataset: one name for every source
    containers.py  ImageData, what every loader returns (images, labels, each image's source)
    index.py       SourceIndex: each row's index, path, label and class; its CSV file
    dirs.py        where built-in datasets are looked for
    builtin.py     digits, MNIST and Fashion-MNIST (IDX), CIFAR-10 (binary) readers
    download.py    downloads verified against the official checksums
    arrays.py      the array layout rule, conversions, .npy/.npz files
    folders.py     folders of images, LazyImages for folders too large for memory

Every loader returns an :class:`ImageData` whose ``images`` are uint8 with shape (N, H, W, C).

Built-in datasets (``BUILTIN_DATASETS``):

* ``digits``: scikit-learn's 8x8 digits (offline), values 0..16 scaled to 0..255; splits
  ``train``/``test`` are a fixed stratified 80/20 split (``random_state=0``).
* ``mnist``, ``fashion-mnist``: IDX files (``.gz`` or not) in ``<dir>/mnist/`` resp.
  ``<dir>/fashion-mnist/``.
* ``cifar10``: ``<dir>/cifar-10/cifar-10-binary.tar.gz`` (read member by member, never
  extracted to disk) or the extracted ``<dir>/cifar-10/cifar-10-batches-bin/`` (preferred when
  complete, as it is faster).

``<dir>`` is searched in the order given by :func:`find_data_dir`. Missing files are downloaded
into the first writable directory of that list, verified against the official MD5 checksums
(``CHECKSUMS``) and only then renamed into place. Files a user placed are read as they are.

Behaviour choices for folders of images:

* Transparent pixels (RGBA, LA, P or RGB/L with a transparency key) are composited on **white**.
* 16-bit images ("I;16", "I") are scaled from 0..65535 to 0..255 (rounded), not clipped; "F"
  images are taken as 0..1 when their maximum is at most 1, else as 0..255.
* EXIF orientation is applied; animated images use their first frame.
* Hidden files and folders (names starting with ".") are ignored; symlinked folders are not
  followed.
* A folder that would take more than ``max_memory_bytes`` decoded is returned as
  :class:`LazyImages`. Every file is still decoded once while loading (and discarded), so
  unreadable files are skipped up front rather than failing in the middle of training.

Array layout rule (``.npy``/``.npz``/:func:`as_uint8_images`): 3-D is (N, H, W); 4-D is
(N, C, H, W) when ``shape[1]`` is 1, 3 or 4 and ``shape[3]`` is not, otherwise (N, H, W, C).
"""

from __future__ import annotations

from .arrays import as_uint8_images
from .builtin import BUILTIN_DATASETS, SPLITS
from .containers import ImageData
from .dirs import find_data_dir
from .download import CHECKSUMS, MIRRORS
from .folders import IMAGE_EXTENSIONS, LazyImages
from .index import SourceIndex, read_index_csv, write_index_csv
from .load import load_dataset

__all__ = [
    "BUILTIN_DATASETS",
    "CHECKSUMS",
    "IMAGE_EXTENSIONS",
    "MIRRORS",
    "SPLITS",
    "ImageData",
    "LazyImages",
    "SourceIndex",
    "as_uint8_images",
    "find_data_dir",
    "load_dataset",
    "read_index_csv",
    "write_index_csv",
]
