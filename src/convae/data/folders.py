"""Folders of images: scanned recursively, decoded in parallel, class subfolders as labels."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError, SkippedFileWarning
from ..progress import progress_bar
from ..readback import NotRegularFile, open_regular
from .containers import ImageData, error_reason

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tiff", ".tif", ".webp")


class LazyImages:
    """An array-like of images decoded from files on access (for folders too large for memory).

    ``x[i]`` gives one (H, W, C) uint8 image; a slice, an integer array or a boolean mask gives
    (n, H, W, C). Holds only paths and preprocessing settings, so it pickles cheaply.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: tuple[int, int], channels: int):
        self.paths = [os.fspath(p) for p in paths]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), *self.image_size, self.channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, dtype=uint8)"

    def _one(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            return _decode(path, self.image_size, self.channels)
        except Exception as e:  # the file changed since it was checked at load time
            raise DataError(f"cannot read image {path}: {error_reason(e)}; reload the folder") from e

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            n = len(self.paths)
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} images")
            return self._one(i % n)
        indices = np.arange(len(self.paths))[idx]
        if indices.ndim != 1:
            raise IndexError("LazyImages supports an int, a slice, or a 1-D integer/boolean index")
        out = np.empty((len(indices), *self.image_size, self.channels), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = self._one(int(i))
        return out

    def subset(self, rows) -> LazyImages:
        """The images at `rows` (indices or a mask), still read on access."""
        picked = np.arange(len(self.paths))[rows]
        return LazyImages([self.paths[int(i)] for i in picked], self.image_size, self.channels)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype, copy=False)


_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _scan(root: Path) -> list[Path]:
    """Image files under `root`, hidden ones and symlinked folders left out, in path order.

    A walk with a stack of its own, not os.walk (recursive in Python 3.11): a folder nested
    thousands deep is scanned, not a RecursionError.
    """
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:  # skipped, never silently
            if Path(folder) != root:
                warnings.warn(f"skipped folder {folder}: {e.strerror or e}", SkippedFileWarning, stacklevel=3)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):
                if not entry.is_symlink():  # a linked folder is not followed (no loops, no escapes)
                    stack.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: a file entry that later fails to open, with a warning
        return False


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike):
    """Open `path` for reading only if it is a regular, non-empty file (:func:`convae.readback.open_regular`:
    a FIFO, a device or a socket named like an image is refused at once, never waited on)."""
    with contextlib.ExitStack() as stack:
        try:
            f, st = stack.enter_context(open_regular(path))
        except NotRegularFile as e:
            raise ValueError(f"not a regular file ({e.kind})") from None
        if st.st_size == 0:
            raise ValueError("empty file")
        yield f


def _probe(path: Path) -> tuple[tuple[int, int], bool]:
    """((height, width) after EXIF orientation, is_colour), reading only the header."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            if im.mode in _GRAY_MODES or im.mode in _16BIT_MODES:
                colour = False
            elif im.mode in ("P", "PA"):
                pal = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
                colour = bool(len(pal)) and not ((pal[:, 0] == pal[:, 1]) & (pal[:, 1] == pal[:, 2])).all()
            else:
                colour = True
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (h, w), colour


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> 8-bit "L" (channels 1) or "RGB" (channels 3); transparency over white."""
    mode = im.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(a.astype(np.uint8))
    elif mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if a.size and a.max() <= 1.0:
            a = a * 255
        im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
    elif mode in ("RGBA", "LA", "PA") or (mode in ("P", "RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers `size` (H, W), keeping the aspect ratio, then crop the centre."""
    th, tw = size
    w, h = im.size
    if (h, w) == (th, tw):
        return im
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    budget = pixel_budget()
    if nw * nh > budget:  # a size of another shape (100000x2 from 8x8) covered before the crop
        raise DataError(
            f"resizing {h}x{w} to cover {th}x{tw} takes {nh}x{nw} pixels, above convae's budget of {budget:,} "
            f"(${PIXELS_ENV}); choose an --image-size closer to the images' shape"
        )
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return im.crop((left, top, left + tw, top + th))


#: Decoded pixels one image may take (after a JPEG's reduced decode): 4 bytes each in RGBA and a
#: few copies while converting, in each decoding thread. $CONVAE_MAX_IMAGE_PIXELS raises it.
MAX_DECODED_PIXELS = 50_000_000
PIXELS_ENV = "CONVAE_MAX_IMAGE_PIXELS"
#: Images above this many pixels decode reduced (JPEG draft, whole-factor reduce) before the
#: resampling: below it they resample from full size exactly as they always have.
_REDUCE_ABOVE = 4_000_000


def pixel_budget() -> int:
    """Pixels an image may decode to: $CONVAE_MAX_IMAGE_PIXELS, else :data:`MAX_DECODED_PIXELS`."""
    text = os.environ.get(PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return MAX_DECODED_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"${PIXELS_ENV}={text[:40]!r}: give a number of pixels, e.g. 200000000")
    return int(text)


def _draft_for(im: Image.Image, size: tuple[int, int] | None) -> None:
    """Ask a JPEG to decode at 1/2, 1/4 or 1/8 scale, still covering `size` in either orientation
    (EXIF rotation comes after): a photo of 9400x9400 becomes a few hundred pixels, never 88 M."""
    if size is None or im.format != "JPEG" or im.size[0] * im.size[1] <= _REDUCE_ABOVE:
        return
    w, h = im.size
    side = max(size)
    scale = side / max(min(w, h), 1)
    if scale < 1:
        im.draft(im.mode, (max(1, -(-w * side // min(w, h))), max(1, -(-h * side // min(w, h)))))


def _decode(path: str | os.PathLike, size: tuple[int, int], channels: int) -> np.ndarray:
    # Runs in threads: the bomb limit is checked by hand, as warnings.catch_warnings is not thread-safe.
    with _open_regular(path) as f, Image.open(f) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.size[0] * im.size[1] > limit:
            raise ValueError(
                f"image of {im.size[0]}x{im.size[1]} pixels exceeds the limit of {limit} (decompression bomb?)"
            )
        _draft_for(im, size)
        budget = pixel_budget()
        if im.size[0] * im.size[1] > budget:  # what decoding would hold (the draft's size for a JPEG)
            raise ValueError(
                f"{im.size[0]}x{im.size[1]} pixels decoded is above convae's budget of {budget:,} per image "
                f"(raise it with ${PIXELS_ENV}, or shrink the file)"
            )
        im.load()  # first frame of an animation
        im = _reduced(im, size)
        im = ImageOps.exif_transpose(im)
        im = _fit(_to_mode(im, channels), size)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _reduced(im: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """`im` shrunk by a whole factor (box filter, cheap) while it still covers `size` twice over
    in either orientation: the mode conversions and the resampling after it work on far fewer
    pixels. Orientation-agnostic, so it may run before the EXIF transpose."""
    if size is None or im.size[0] * im.size[1] <= _REDUCE_ABOVE:
        return im
    factor = min(im.size) // (2 * max(size))
    return im.reduce(factor) if factor >= 2 and im.mode not in ("P", "1") else im


def _load_folder(
    root: Path, size: tuple[int, int] | None, channels: int | None, progress: bool, max_memory_bytes: int
) -> ImageData:
    files = _scan(root)
    if not files:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); check the path"
        )
    sizes, skipped, any_colour = _probe_all(files, progress)
    size = size or _common_size(root, sizes)
    if channels is None:
        channels = 3 if any_colour else 1
    candidates = [i for i in range(len(files)) if i not in skipped]
    h, w = size if size is not None else (1, 1)
    lazy = len(candidates) * h * w * channels > max_memory_bytes
    out, ok = _decode_all(files, candidates, size, channels, lazy, progress, skipped)
    for i in sorted(skipped):
        warnings.warn(f"skipped {files[i]}: {skipped[i]}", SkippedFileWarning, stacklevel=3)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(files)} files in {root}", SkippedFileWarning, stacklevel=3)
    kept = [files[i] for i, good in zip(candidates, ok) if good]
    if not kept:
        raise DataError(f"none of the {len(files)} image files in {root} could be read; see the warnings")
    images: np.ndarray | LazyImages = LazyImages(kept, size, channels) if lazy else (out if ok.all() else out[ok])
    labels, classes = _folder_labels(root, kept)
    paths = [p.relative_to(root).as_posix() for p in kept]  # what the index records, row by row
    return ImageData(images, labels, classes, str(root), paths=paths)


def _probe_all(files: list[Path], progress: bool) -> tuple[dict[int, tuple[int, int]], dict[int, str], bool]:
    """(size of each readable file, why each other one was skipped, whether any is in colour)."""
    skipped: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    any_colour = False
    with progress_bar(progress, len(files), desc="scanning", unit="file") as bar:
        for i, p in enumerate(files):
            try:
                sizes[i], colour = _probe(p)
                any_colour |= colour
            except Exception as e:  # any unreadable file is skipped, never fatal
                skipped[i] = error_reason(e)
            bar.update(1)
    return sizes, skipped, any_colour


def _common_size(root: Path, sizes: dict[int, tuple[int, int]]) -> tuple[int, int] | None:
    """The one size every image has; several sizes need --image-size."""
    distinct = set(sizes.values())
    if len(distinct) > 1:
        examples = ", ".join(f"{h}x{w}" for h, w in sorted(distinct)[:3])
        raise DataError(
            f"images in {root} have {len(distinct)} different sizes (e.g. {examples}); "
            "pass --image-size (image_size=) to resize them"
        )
    return next(iter(distinct), None)


def _decode_all(
    files, candidates: list[int], size, channels: int, lazy: bool, progress: bool, skipped: dict[int, str]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Every candidate decoded in threads (kept unless `lazy`); (images, which decoded), `skipped` updated."""
    h, w = size if size is not None else (1, 1)
    out = None if lazy else np.empty((len(candidates), h, w, channels), dtype=np.uint8)

    def work(k: int):
        try:
            arr = _decode(str(files[candidates[k]]), size, channels)  # decoded even when lazy: bad files are found now
            if out is not None:
                out[k] = arr
            return None
        except Exception as e:
            return error_reason(e)

    ok = np.ones(len(candidates), dtype=bool)
    if not candidates:
        return out, ok
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    try:
        results = pool.map(work, range(len(candidates)), chunksize=16)
        with progress_bar(progress, len(candidates), desc="checking" if lazy else "decoding", unit="file") as bar:
            for k, reason in enumerate(results):
                if reason is not None:
                    skipped[candidates[k]] = reason
                    ok[k] = False
                bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not decode the rest first
        raise
    pool.shutdown()
    return out, ok


def _folder_labels(root: Path, kept: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    """Class subfolders as labels, when every image is in one."""
    rel = [p.relative_to(root).parts for p in kept]
    if not all(len(parts) > 1 for parts in rel):
        return None, None
    classes = sorted({parts[0] for parts in rel})
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[parts[0]] for parts in rel], dtype=np.int64), classes
