"""What every loader returns: :class:`ImageData`, uint8 images (N, H, W, C) with optional labels,
and where each image came from."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .folders import LazyImages
    from .index import SourceIndex


@dataclass
class ImageData:
    """Images (uint8, N x H x W x C), optional integer labels and class names, a name, and each
    image's source.

    `paths`: for a folder, each image's file relative to the folder (`name`), "/"-separated;
    None for built-in datasets and arrays. `ids`: each image's index in its split (built-ins,
    arrays) or in the folder's sorted listing of readable images; None means 0..N-1. A
    :meth:`subset` keeps both, so rows of a hold-out split still name their files.
    """

    images: np.ndarray | LazyImages
    labels: np.ndarray | None
    classes: list[str] | None
    name: str
    paths: list[str] | None = None
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def image_ids(self) -> np.ndarray:
        """Each image's index in its split or folder listing (int64)."""
        return np.arange(len(self), dtype=np.int64) if self.ids is None else np.asarray(self.ids, dtype=np.int64)

    def source_index(self) -> SourceIndex:
        """Where each image came from: index, path, label and class, one row per image."""
        from .index import SourceIndex

        return SourceIndex(self.image_ids(), self.paths, self.labels, self.classes)

    def describe(self, row: int) -> str:
        """A short name of image `row` for figures and messages: its path, else name[index]."""
        if self.paths is not None:
            return self.paths[row]
        return f"{self.name}[{int(self.image_ids()[row])}]"

    def subset(self, rows) -> ImageData:
        """The images at `rows` (indices or a mask), with their labels, paths and ids; a folder
        read lazily stays lazy (no image is decoded)."""
        rows = np.arange(len(self))[rows]
        images = self.images.subset(rows) if hasattr(self.images, "subset") else self.images[rows]
        return replace(
            self,
            images=images,
            labels=None if self.labels is None else np.asarray(self.labels)[rows],
            paths=None if self.paths is None else [self.paths[int(i)] for i in rows],
            ids=self.image_ids()[rows],
        )


def error_reason(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ") or type(e).__name__
    return text
