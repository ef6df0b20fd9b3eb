"""What every loader returns: :class:`ImageData`, uint8 images (N, H, W, C) with optional labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .folders import LazyImages


@dataclass
class ImageData:
    """Images (uint8, N x H x W x C), optional integer labels and class names, and a name."""

    images: np.ndarray | LazyImages
    labels: np.ndarray | None
    classes: list[str] | None
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)


def error_reason(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ") or type(e).__name__
    return text
