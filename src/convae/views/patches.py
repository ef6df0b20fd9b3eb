"""Top-activating patches: the images that excite a unit most, cropped to its exact receptive field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..progress import make_bar
from ..tensors import device_of, to_float_nchw
from .common import (
    OUTSIDE,
    as_float,
    check_images,
    image_batches,
    image_shape,
    patch_layers,
    rgb,
    scale_for,
    stacked_figure,
    tile_mosaic,
    upscale,
    view_layers,
)


@dataclass
class Patch:
    """Where a unit fired most in one image: `index` into the images given, the unit's (y, x)
    in its layer's map ((0, 0) for vector layers), its activation, and the input region
    (top, left, bottom, right; exclusive, clipped to the image) it sees."""

    index: int
    y: int
    x: int
    activation: float
    box: tuple[int, int, int, int]


@dataclass
class LayerPatches:
    layer: str
    receptive_field: int
    stride: int | None
    spatial: bool
    variance: np.ndarray  # every channel's activation variance over the images and positions
    mean: np.ndarray
    channels: list[int]  # the chosen channels, most variable first
    patches: list[list[Patch]] = field(default_factory=list)  # per chosen channel, best first


@torch.inference_mode()
def top_patches(
    model: nn.Module,
    images,
    layers: Sequence[str] | str | None = None,
    *,
    channels: int = 8,
    k: int = 8,
    interior: bool = True,
    batch_size: int = 256,
    progress: bool = False,
) -> list[LayerPatches]:
    """For each layer, its `channels` most variable channels and the `k` images that excite each most.

    A channel's score on an image is its largest activation over positions; the patch is the
    receptive field (``model.receptive_box``) of the unit where that maximum lies. With
    `interior`, only units whose whole field lies inside the image compete, where a layer has
    any: otherwise the zero padding makes border units win with "edges" that are the image's
    border. One pass over `images` (uint8 (N, H, W, C) or LazyImages; subsample big sets with
    :func:`sample_indices`).
    """
    check_images(model, images)
    layers = view_layers(model, layers, patch_layers)
    device = device_of(model)
    n = len(images)
    k = max(1, min(k, n))
    tops: dict[str, _TopUnits] = {}
    masks = {layer: _interior_mask(model, layer) if interior else None for layer in layers}
    bar = make_bar(progress, n, desc="patches", leave=False)
    try:
        for start, batch in image_batches(images, np.arange(n), batch_size):
            outs = model.forward_intermediates(to_float_nchw(batch, device), layers)
            for layer in layers:
                maps, best, pos = _strongest_units(outs[layer], masks[layer])
                if layer not in tops:
                    tops[layer] = _TopUnits(maps.shape[1], k, maps.shape[3], spatial=outs[layer].ndim == 4)
                tops[layer].update(maps, best, pos, start)
            bar.update(len(batch))
    finally:
        bar.close()
    return [tops[layer].patches(model, layer, channels) for layer in layers]


def _strongest_units(out: torch.Tensor, mask: torch.Tensor | None):
    """(the maps as (B, C, h, w) float, each image's strongest unit per channel: its value and
    flat position), units outside `mask` left out."""
    maps = out.float()
    if maps.ndim == 2:
        maps = maps[:, :, None, None]  # vector units: one "position"
    flat = maps.flatten(2)  # (B, C, h*w)
    if mask is not None:
        flat = flat.masked_fill(~mask.to(flat.device), -math.inf)
    best, pos = flat.max(2)
    return maps, best, pos


class _TopUnits:
    """One layer over the images seen so far: each channel's mean and variance over all its units,
    and the `k` images whose strongest unit fires most (value, image index, flat position)."""

    def __init__(self, channels: int, k: int, width: int, spatial: bool):
        self.k, self.width, self.spatial = k, width, spatial
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sq = torch.zeros(channels, dtype=torch.float64)
        self.count = 0
        self.val = torch.full((channels, 0), -math.inf)
        self.idx = torch.zeros((channels, 0), dtype=torch.long)
        self.pos = torch.zeros((channels, 0), dtype=torch.long)

    def update(self, maps: torch.Tensor, best: torch.Tensor, pos: torch.Tensor, start: int) -> None:
        """Add a batch (images `start`, `start` + 1, ...): its maps, and :func:`_strongest_units`."""
        b, c, h, w = maps.shape
        self.sum += maps.double().sum((0, 2, 3)).cpu()
        self.sq += maps.double().pow(2).sum((0, 2, 3)).cpu()
        self.count += b * h * w
        val = torch.cat([self.val, best.T.cpu()], 1)
        idx = torch.cat([self.idx, torch.arange(start, start + b).expand(c, b)], 1)
        ps = torch.cat([self.pos, pos.T.cpu()], 1)
        keep = val.topk(min(self.k, val.shape[1]), dim=1).indices
        self.val, self.idx, self.pos = val.gather(1, keep), idx.gather(1, keep), ps.gather(1, keep)

    def patches(self, model: nn.Module, layer: str, channels: int) -> LayerPatches:
        """The layer's `channels` most variable channels, each with its top images' patches."""
        mean = (self.sum / self.count).numpy()
        var = np.maximum((self.sq / self.count).numpy() - mean**2, 0)
        info = model.layer_info(layer)
        chosen = [int(c) for c in np.argsort(-var, kind="stable")[:channels]]
        out = LayerPatches(layer=layer, receptive_field=int(info["receptive_field"]), stride=info["reduction"],
                           spatial=self.spatial, variance=var, mean=mean, channels=chosen)  # fmt: skip
        for c in chosen:
            row = []
            for v, i, p in zip(self.val[c].tolist(), self.idx[c].tolist(), self.pos[c].tolist()):
                y, x = divmod(int(p), self.width)
                box = model.receptive_box(layer, y, x) if self.spatial else model.receptive_box(layer)
                row.append(Patch(index=int(i), y=y, x=x, activation=float(v), box=tuple(int(b) for b in box)))
            out.patches.append(row)
        return out


def _interior_mask(model: nn.Module, layer: str) -> torch.Tensor | None:
    """(h*w,) True where the unit's whole receptive field lies inside the image; None if no unit's does."""
    info = model.layer_info(layer)
    if len(info["shape"]) != 3:
        return None
    _, h, w = info["shape"]
    rf = info["receptive_field"]
    mask = torch.tensor(
        [
            (b[2] - b[0], b[3] - b[1]) == (rf, rf)
            for b in (model.receptive_box(layer, y, x) for y in range(h) for x in range(w))
        ]
    )
    return mask if bool(mask.any()) and not bool(mask.all()) else None


def crop_patch(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The image region (H, W, C) inside box (top, left, bottom, right)."""
    top, left, bottom, right = box
    return image[top:bottom, left:right]


def _patch_canvas(crop: np.ndarray, box: Sequence[int], rf: int, image_hw: tuple[int, int]) -> np.ndarray:
    """A crop (float RGB) on a receptive-field-sized canvas; where the field leaves the image is OUTSIDE.

    The canvas is the field's size, or the image's where the field is larger; a crop clipped
    at the top/left edge sits at the canvas' bottom/right, so the unit's view keeps its place.
    """
    H, W = image_hw
    ch, cw = min(rf, H), min(rf, W)
    canvas = np.empty((ch, cw, 3), dtype=np.float32)
    canvas[:] = OUTSIDE
    top, left, bottom, right = box
    h, w = crop.shape[:2]
    oy = ch - h if top == 0 and bottom < H else 0
    ox = cw - w if left == 0 and right < W else 0
    canvas[oy : oy + h, ox : ox + w] = crop
    return canvas


def patches_figure(model: nn.Module, images, results: Sequence[LayerPatches], title: str = ""):
    """One panel per layer: a row per channel, its top patches left to right, cropped to the unit's receptive field."""
    H, W, _ = image_shape(model)
    blocks = []
    for lp in results:
        k = max((len(r) for r in lp.patches), default=1)
        rf = lp.receptive_field if lp.spatial else max(H, W)
        scale = scale_for(min(rf, H), min(rf, W), target=56)
        tiles = []
        for row in lp.patches:
            for p in row:
                crop = rgb(as_float(crop_patch(np.asarray(images[p.index]), p.box)))
                tiles.append(upscale(_patch_canvas(crop, p.box, rf, (H, W)), scale))
            tiles += [None] * (k - len(row))
        mosaic, corners = tile_mosaic(tiles, k)
        th = tiles[0].shape[0]
        if lp.spatial:
            what = f"receptive field {lp.receptive_field}x{lp.receptive_field} px, stride {lp.stride}"
            if lp.receptive_field >= max(H, W):
                what += ": as large as the image"
        else:
            what = "a vector layer: every unit sees the whole image"
        ticks = [corners[r * k][0] + th / 2 for r in range(len(lp.channels))]
        blocks.append((f"{lp.layer} ({what})", mosaic, ticks, [f"ch {c}" for c in lp.channels]))
    heading = (
        f"{title + ': ' if title else ''}top-activating patches: each layer's most variable channels (rows)\n"
        "and the images that excite them most (left to right), cropped to the unit's\n"
        "receptive field; pale blue: where the field extends past the image"
    )
    fig, _ = stacked_figure(blocks, heading)
    return fig
