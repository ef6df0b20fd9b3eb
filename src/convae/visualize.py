"""Views of a trained autoencoder, as matplotlib figures (the CLI saves them as PNG).

Each view has a function that computes its numbers (``top_patches``, ``maximize_activation``,
``receptive_field_table``, ``embed`` ...) and one that draws them (``*_figure``), so tests and
reports can check the numbers the pictures show. ``render_view`` draws one view by name, as
``convae show`` does. Views that do not apply to a model (feature maps of the dense
autoencoder, whose layers are vectors) raise :class:`ViewNotApplicable` saying why.

Images are drawn as mosaics (one ``imshow`` per panel, tiles upscaled with nearest-neighbour
by whole factors), so small inputs such as 8x8 digits stay sharp and large grids stay fast.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are saved, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ._io import atomic_path  # noqa: E402
from .errors import ConfigError, ConvaeError  # noqa: E402
from .model import SPLIT_SUFFIX  # noqa: E402

VIEWS: tuple[str, ...] = (
    "filters", "maps", "patches", "maximize", "receptive", "recon", "curves", "embedding", "probe",
)  # fmt: skip
OUTSIDE = np.array([0.80, 0.84, 0.90])  # patch canvas outside the image: a pale blue no image pixel uses
_TILE_PX = 40  # tiles are upscaled to about this many pixels on their longer side


class ViewNotApplicable(ConvaeError):
    """A view that does not apply to this model or data; the message says why."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _show(ax, image: np.ndarray) -> None:
    """Draw an (H, W, C) image in [0, 1] or uint8."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1 if image.dtype != np.uint8 else 255)
    else:
        ax.imshow(image[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255)


def _is_conv(model: nn.Module) -> bool:
    """Whether the model's layers are spatial maps (the conv and sparse autoencoders)."""
    return model.config.arch in ("conv", "sparse")


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    h, w = model.config.image_size
    return int(h), int(w), int(model.config.in_channels)


def _view_layer_names(model: nn.Module) -> list[str]:
    """Layers a view can show: the model's, then each conv block's sign-split maps."""
    return [*model.layer_names, *getattr(model, "split_layer_names", [])]


def _info(model: nn.Module, layer: str) -> dict:
    base = layer.removesuffix(SPLIT_SUFFIX) if layer in getattr(model, "split_layer_names", []) else layer
    for f in model.feature_info:
        if f["module"] == base:
            if base == layer:
                return f
            c, *hw = f["shape"]  # the split doubles the channels: [relu(z - t), relu(-z - t)]
            return dict(f, module=layer, num_chs=2 * c, shape=[2 * c, *hw])
    raise ConfigError(f"unknown layer {layer!r}: choose from {', '.join(_view_layer_names(model))}")


def _rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (H, W, 3); grayscale repeated, other channel counts averaged."""
    c = image.shape[-1]
    if c == 3:
        return image
    if c == 1:
        return np.repeat(image, 3, axis=-1)
    return np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)


def _as_float(images) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)


def _colormap(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) RGB through a matplotlib colormap."""
    scale = vmax - vmin if vmax > vmin else 1.0
    return matplotlib.colormaps[cmap](np.clip((values - vmin) / scale, 0, 1))[..., :3]


def _upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    return tile.repeat(factor, 0).repeat(factor, 1) if factor > 1 else tile


def _scale_for(h: int, w: int, target: int = _TILE_PX) -> int:
    return max(1, round(target / max(h, w)))


def _mosaic(tiles: Sequence[np.ndarray | None], cols: int, pad: int = 4, bg: float = 1.0, frame: float | None = 0.55):
    """Tiles (h, w, 3) of one size in a grid with `pad` pixels between; None leaves a blank cell.

    `frame`: the gray of a 1-pixel line around each tile, so white tiles stay apart on white.
    Returns the (H, W, 3) mosaic and the (top, left) of every cell.
    """
    first = next(t for t in tiles if t is not None)
    th, tw = first.shape[:2]
    rows = max(1, math.ceil(len(tiles) / cols))
    out = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), bg, dtype=np.float32)
    corners = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = pad + r * (th + pad), pad + c * (tw + pad)
        corners.append((top, left))
        if tile is None:
            continue
        if frame is not None:
            out[top - 1 : top + th + 1, left - 1 : left + tw + 1] = frame
        out[top : top + th, left : left + tw] = tile
    return out, corners


def _image_axes(mosaic: np.ndarray, dpi: int = 100, margins=(1.6, 0.3, 0.6, 0.3), min_width: float = 3.0):
    """A figure that shows `mosaic` at about one screen pixel per mosaic pixel.

    margins: (left, right, top, bottom) in inches, for labels and the title.
    """
    h, w = mosaic.shape[:2]
    left, right, top, bottom = margins
    fw = max(w / dpi + left + right, min_width)
    fh = h / dpi + top + bottom
    fig = plt.figure(figsize=(fw, fh), dpi=dpi)
    ax = fig.add_axes([left / fw, bottom / fh, (w / dpi) / fw, (h / dpi) / fh])
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig, ax


def _stacked_figure(blocks, title: str, dpi: int = 100, left: float = 0.9, width_min: float = 6.3):
    """Mosaics stacked vertically, each at one screen pixel per mosaic pixel under its own header.

    blocks: (header, mosaic, ytick positions, ytick labels). Returns the figure and its axes.
    """
    head, gap, top_in = 0.28, 0.12, 0.2 + 0.17 * (title.count("\n") + 1)
    width = max(max(b[1].shape[1] for b in blocks) / dpi + left + 0.2, width_min)
    height = top_in + sum(head + b[1].shape[0] / dpi + gap for b in blocks)
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    y = height - top_in
    axes = []
    for header, mosaic, ticks, labels in blocks:
        mh, mw = mosaic.shape[0] / dpi, mosaic.shape[1] / dpi
        fig.text(0.1 / width, (y - head / 2) / height, header, fontsize=8, va="center", ha="left")
        y -= head + mh
        ax = fig.add_axes([left / width, y / height, mw / width, mh / height])
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        axes.append(ax)
        y -= gap
    fig.text(0.1 / width, 1 - (top_in / 2) / height, title, fontsize=9, va="center", ha="left")
    return fig, axes


def sample_indices(n: int, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_images` of `n` images, drawn with a fixed seed (all when None or 0)."""
    if max_images is not None and max_images < 0:
        raise ConfigError(f"max_images must be positive, got {max_images}")
    if not max_images or n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def _batches(images, indices: np.ndarray, batch_size: int):
    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size]
        yield s, np.asarray(images[idx])


def _bar(enabled: bool, total: int, desc: str, unit: str = "img"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def check_images(model: nn.Module, images, what: str = "data") -> None:
    """The images must have the model's (H, W, C)."""
    shape = tuple(int(s) for s in images.shape[1:])
    want = _image_shape(model)
    if shape != want:
        raise ConfigError(
            f"{what}: images are {'x'.join(map(str, shape))} (HxWxC) but the model takes "
            f"{'x'.join(map(str, want))}; load them at that size (--image-size, --channels)"
        )
    if len(images) == 0:
        raise ConfigError(f"{what}: no images")


def hierarchy_layers(model: nn.Module) -> list[str]:
    """One layer per depth (see :func:`convae.model.depth_layers`)."""
    from .model import depth_layers

    return depth_layers(model)


def patch_layers(model: nn.Module) -> list[str]:
    """The first conv layer (edges, colour) and then one layer per depth."""
    layers = hierarchy_layers(model)
    if _is_conv(model) and model.layer_names[0] not in layers:
        layers = [model.layer_names[0], *layers]
    return layers


def resolve_view_layers(model: nn.Module, layers: str | Sequence[str] | None, default) -> list[str]:
    """Layer names from "a,b", a list, "all" or None (the view's default), checked against the model."""
    if layers is None:
        return list(default(model))
    names = [s.strip() for s in layers.split(",") if s.strip()] if isinstance(layers, str) else list(layers)
    if names == ["all"]:
        return list(model.layer_names)
    valid = _view_layer_names(model)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ConfigError(
            f"--layers {','.join(unknown) or '(empty)'}: unknown layer; choose from {', '.join(valid)} or all"
        )
    # network order; a block's split maps right after the block
    order = {n: (i, 0) for i, n in enumerate(model.layer_names)}
    order.update({n: (order[n.removesuffix(SPLIT_SUFFIX)][0], 1) for n in valid if n not in order})
    return sorted(dict.fromkeys(names), key=order.__getitem__)


# ---------------------------------------------------------------------------------------------
# first-layer filters
# ---------------------------------------------------------------------------------------------
def first_layer_weights(model: nn.Module) -> tuple[np.ndarray, str]:
    """First-layer weights as images (N, h, w, C_in), strongest first, and what they are.

    Conv models: the first conv's kernels. The dense autoencoder has no filters; its first
    layer's weight rows are whole-image templates, shown instead.
    """
    if model.config.arch == "sparse":
        w = model.dictionary_images().float().cpu()  # (K, C, k, k)
        kind = f"{w.shape[-2]}x{w.shape[-1]} patches conv1's filters stand for (un-whitened)"
    elif _is_conv(model):
        w = model.encoder["stage1"].conv1[0].weight.detach().float().cpu()  # (C_out, C_in, k, k)
        kind = f"{w.shape[-2]}x{w.shape[-1]} kernels of stage1.conv1"
    else:
        first = next(iter(model.encoder.values()))
        linear = first[0] if isinstance(first, nn.Sequential) else first
        h, wd, c = _image_shape(model)
        w = linear.weight.detach().float().cpu().view(-1, c, h, wd)  # rows as (C, H, W) images
        kind = f"weights of {model.layer_names[0]} as {h}x{wd} templates\n(the dense model has no conv filters)"
    w = w.permute(0, 2, 3, 1).numpy()  # (N, h, w, C_in)
    order = np.argsort(-np.sqrt((w**2).reshape(len(w), -1).sum(1)), kind="stable")
    return w[order], kind


def _filter_tile(w: np.ndarray) -> np.ndarray:
    """One (h, w, C) weight -> RGB: colour as is for 3 channels, blue-white-red otherwise."""
    m = float(np.abs(w).max()) or 1.0
    if w.shape[-1] == 3:
        return np.clip(w / (2 * m) + 0.5, 0, 1)  # zero is mid-gray; a colour gradient shows as colours
    return _colormap(w.mean(-1), "RdBu_r", -m, m)


def filters_figure(model: nn.Module, max_filters: int = 64, title: str = ""):
    """The first layer's filters in a grid, strongest (largest norm) first."""
    weights, kind = first_layer_weights(model)
    weights = weights[:max_filters]
    scale = _scale_for(*weights.shape[1:3], target=48)
    tiles = [_upscale(_filter_tile(w), scale) for w in weights]
    cols = min(16, len(tiles)) if _is_conv(model) else min(8, len(tiles))
    mosaic, _ = _mosaic(tiles, cols)
    fig, ax = _image_axes(mosaic, margins=(0.3, 0.3, 0.6, 0.15), min_width=5.0)
    colour = (
        "RGB, mid-gray = 0" if weights.shape[-1] == 3 else "red = positive, blue = negative weight"
    )
    fig.suptitle(
        f"{title + ': ' if title else ''}first layer, {len(weights)} strongest {kind}\n({colour})", fontsize=9
    )
    return fig


# ---------------------------------------------------------------------------------------------
# feature maps
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def feature_maps(model: nn.Module, images, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """Maps (N, C, h, w) of each layer for uint8 images (N, H, W, C)."""
    out = model.forward_intermediates(_to_input(np.asarray(images), _device_of(model)), list(layers))
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def feature_maps_figure(model: nn.Module, images, layers=None, channels: int = 8, title: str = ""):
    """For each image: its maps at every encoder depth (rows), the most variable channels (columns)."""
    if not _is_conv(model):
        raise ViewNotApplicable(
            "feature maps: the dense autoencoder's layers are vectors, not maps (it flattens the image "
            "first); the patches and maximize views show what its units respond to"
        )
    layers = resolve_view_layers(model, layers, lambda m: m.layer_names)
    images = np.asarray(images)
    maps = feature_maps(model, images, layers)
    h, w, _ = _image_shape(model)
    scale = _scale_for(h, w, target=56)
    # The same channels for every image, so columns compare: the most variable over the images shown.
    chosen = {}
    for layer in layers:
        m = maps[layer]
        chosen[layer] = np.argsort(-m.transpose(1, 0, 2, 3).reshape(m.shape[1], -1).var(1), kind="stable")[:channels]
    labels = ["input"]
    for layer in layers:
        info = _info(model, layer)
        labels.append(f"{layer}\n{info['shape'][1]}x{info['shape'][2]}, RF {info['receptive_field']}")
    mosaics = []
    for i, image in enumerate(images):
        tiles = [_upscale(_rgb(_as_float(image)), scale)] + [None] * (channels - 1)
        for layer in layers:
            m = maps[layer][i]  # (C, h_l, w_l)
            fh, fw = m.shape[1:]
            rows, cols = np.arange(h) * fh // h, np.arange(w) * fw // w  # nearest, back to the input's size
            for c in chosen[layer]:
                lo, hi = float(m[c].min()), float(m[c].max())
                tiles.append(_upscale(_colormap(m[c][rows][:, cols], "magma", lo, hi), scale))
            tiles += [None] * (channels - len(chosen[layer]))
        mosaics.append(_mosaic(tiles, channels))
    th = h * scale
    gap = np.ones((mosaics[0][0].shape[0], 24, 3), dtype=np.float32)
    full = mosaics[0][0]
    for m, _ in mosaics[1:]:
        full = np.concatenate([full, gap, m], axis=1)
    fig, ax = _image_axes(full, margins=(1.4, 0.2, 0.7, 0.1))
    corners = mosaics[0][1]
    ax.set_yticks([corners[r * channels][0] + th / 2 for r in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.tick_params(length=0)
    fig.suptitle(
        f"{title + ': ' if title else ''}feature maps of {len(images)} image(s) by depth, "
        f"the {channels} most variable channels per layer\n"
        "(each map scaled to its own range, magma: dark low, bright high)",
        fontsize=9,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# top-activating patches, cropped to the exact receptive field
# ---------------------------------------------------------------------------------------------
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
    layers = resolve_view_layers(model, layers, patch_layers)
    device = _device_of(model)
    n = len(images)
    k = max(1, min(k, n))
    state = {}
    masks = {layer: _interior_mask(model, layer) if interior else None for layer in layers}
    bar = _bar(progress, n, "patches")
    try:
        for start, batch in _batches(images, np.arange(n), batch_size):
            outs = model.forward_intermediates(_to_input(batch, device), layers)
            for layer in layers:
                a = outs[layer].float()
                if a.ndim == 2:
                    a = a[:, :, None, None]  # vector units: one "position"
                b, c, h, w = a.shape
                flat = a.flatten(2)  # (B, C, h*w)
                if masks[layer] is not None:
                    flat = flat.masked_fill(~masks[layer].to(flat.device), -math.inf)
                best, pos = flat.max(2)  # each image's strongest unit per channel
                s = state.get(layer)
                if s is None:
                    s = state[layer] = dict(
                        sum=torch.zeros(c, dtype=torch.float64), sq=torch.zeros(c, dtype=torch.float64), count=0,
                        val=torch.full((c, 0), -math.inf), idx=torch.zeros((c, 0), dtype=torch.long),
                        pos=torch.zeros((c, 0), dtype=torch.long), w=w, spatial=outs[layer].ndim == 4,
                    )
                s["sum"] += a.double().sum((0, 2, 3)).cpu()
                s["sq"] += a.double().pow(2).sum((0, 2, 3)).cpu()
                s["count"] += b * h * w
                ids = torch.arange(start, start + b).expand(c, b)
                val = torch.cat([s["val"], best.T.cpu()], 1)
                idx = torch.cat([s["idx"], ids], 1)
                ps = torch.cat([s["pos"], pos.T.cpu()], 1)
                keep = val.topk(min(k, val.shape[1]), dim=1).indices
                s["val"], s["idx"], s["pos"] = val.gather(1, keep), idx.gather(1, keep), ps.gather(1, keep)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    result = []
    for layer in layers:
        s, info = state[layer], _info(model, layer)
        mean = (s["sum"] / s["count"]).numpy()
        var = np.maximum((s["sq"] / s["count"]).numpy() - mean**2, 0)
        chosen = [int(c) for c in np.argsort(-var, kind="stable")[:channels]]
        lp = LayerPatches(
            layer=layer, receptive_field=int(info["receptive_field"]), stride=info["reduction"],
            spatial=s["spatial"], variance=var, mean=mean, channels=chosen,
        )
        for c in chosen:
            row = []
            for v, i, p in zip(s["val"][c].tolist(), s["idx"][c].tolist(), s["pos"][c].tolist()):
                y, x = divmod(int(p), s["w"])
                box = model.receptive_box(layer, y, x) if s["spatial"] else model.receptive_box(layer)
                row.append(Patch(index=int(i), y=y, x=x, activation=float(v), box=tuple(int(b) for b in box)))
            lp.patches.append(row)
        result.append(lp)
    return result


def _interior_mask(model: nn.Module, layer: str) -> torch.Tensor | None:
    """(h*w,) True where the unit's whole receptive field lies inside the image; None if no unit's does."""
    info = _info(model, layer)
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
    H, W, _ = _image_shape(model)
    blocks = []
    for lp in results:
        k = max((len(r) for r in lp.patches), default=1)
        rf = lp.receptive_field if lp.spatial else max(H, W)
        scale = _scale_for(min(rf, H), min(rf, W), target=56)
        tiles = []
        for row in lp.patches:
            for p in row:
                crop = _rgb(_as_float(crop_patch(np.asarray(images[p.index]), p.box)))
                tiles.append(_upscale(_patch_canvas(crop, p.box, rf, (H, W)), scale))
            tiles += [None] * (k - len(row))
        mosaic, corners = _mosaic(tiles, k)
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
    fig, _ = _stacked_figure(blocks, heading)
    return fig


# ---------------------------------------------------------------------------------------------
# activation maximization
# ---------------------------------------------------------------------------------------------
@dataclass
class Maximized:
    layer: str
    channels: list[int]
    images: np.ndarray  # (n, H, W, C) float in [0, 1], one per channel
    start: np.ndarray  # each channel's mean activation on the starting image
    final: np.ndarray  # ... on the synthesized image (no jitter)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows, then columns: separable
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _channel_activation(model, x, layer, channels):
    a = model.forward_intermediates(x, [layer])[layer]
    sel = a[torch.arange(len(channels), device=a.device), torch.as_tensor(channels, device=a.device)]
    return sel.flatten(1).mean(1) if sel.ndim > 1 else sel  # a map's mean, or the unit itself


class _LeakyGradient:
    """While active, ReLUs pass a tenth of the gradient where they are off (values unchanged).

    A channel that is zero on the starting image would otherwise get no gradient and stay dead.
    """

    def __init__(self, model: nn.Module):
        self.relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        self.handles, self.inplace = [], []

    @staticmethod
    def _hook(module, inputs, output):
        neg = inputs[0].clamp(max=0)
        return output + 0.1 * (neg - neg.detach())

    def __enter__(self):
        for m in self.relus:
            self.inplace.append(m.inplace)
            m.inplace = False  # the hook needs the input as it was
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m, flag in zip(self.relus, self.inplace):
            m.inplace = flag


def maximize_activation(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    *,
    steps: int = 128,
    lr: float = 0.08,
    jitter: int | None = None,
    blur_every: int = 4,
    blur_sigma: float = 0.6,
    tv_weight: float = 0.2,
    l2_weight: float = 1.0,
    seed: int = 0,
) -> Maximized:
    """Synthesize, for each channel, the input that drives its mean activation up.

    Regularized gradient ascent on the image, kept in [0, 1] through a sigmoid and started at
    mid-gray with a little noise: random jitter each step, a Gaussian blur every `blur_every`
    steps, a total-variation penalty and an L2 pull towards gray keep the pattern smooth and
    bounded instead of adversarial noise or saturation. The objective is the channel's mean over
    its map (the pattern it prefers, wherever it is; the unit itself for vector layers). ReLUs
    leak a little gradient meanwhile, so a channel silent on gray still finds its way up. The
    model is left untouched.
    """
    info = _info(model, layer)
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < info["num_chs"]]
    if bad:
        raise ConfigError(f"{layer} has {info['num_chs']} channels; channel(s) {bad} do not exist")
    if not channels:
        raise ConfigError("maximize: give at least one channel")
    if steps < 1:
        raise ConfigError(f"maximize steps must be at least 1, got {steps}")
    h, w, c = _image_shape(model)
    jitter = max(1, round(min(h, w) / 16)) if jitter is None else jitter
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    z = (0.1 * torch.randn((len(channels), c, h, w), generator=gen)).to(device).requires_grad_(True)
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            start = _channel_activation(model, torch.sigmoid(z), layer, channels)
        opt = torch.optim.Adam([z], lr=lr)
        with _LeakyGradient(model):
            for step in range(steps):
                x = torch.sigmoid(z)
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                    x = torch.roll(x, (dy, dx), (2, 3))
                act = _channel_activation(model, x, layer, channels)
                tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
                tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))
                l2 = (x - 0.5).pow(2).mean((1, 2, 3))
                loss = (-act + tv_weight * tv + l2_weight * l2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if blur_every and (step + 1) % blur_every == 0 and step < steps - 1:
                    with torch.no_grad():
                        z.copy_(_gaussian_blur(z, blur_sigma))
        with torch.no_grad():
            x = torch.sigmoid(z)
            final = _channel_activation(model, x, layer, channels)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return Maximized(
        layer=layer, channels=channels, images=x.permute(0, 2, 3, 1).cpu().numpy(),
        start=start.cpu().numpy(), final=final.cpu().numpy(),
    )


def maximize_figure(model: nn.Module, results: Sequence[Maximized], title: str = ""):
    """A row per layer: the synthesized input of each chosen channel."""
    h, w, _ = _image_shape(model)
    scale = _scale_for(h, w, target=64)
    cols = max(len(r.channels) for r in results)
    tiles = []
    for r in results:
        tiles += [_upscale(_rgb(np.clip(img, 0, 1)), scale) for img in r.images]
        tiles += [None] * (cols - len(r.channels))
    mosaic, corners = _mosaic(tiles, cols, pad=16)
    th = h * scale
    fig, ax = _image_axes(mosaic, margins=(1.3, 0.2, 0.55, 0.1), min_width=5.0)
    ax.set_yticks([corners[row * cols][0] + th / 2 for row in range(len(results))])
    ax.tick_params(length=0)
    ax.set_yticklabels(
        [f"{r.layer}\nRF {_info(model, r.layer)['receptive_field']}" for r in results], fontsize=7
    )
    i = 0
    for r in results:
        for ch, fin in zip(r.channels, r.final):
            top, left = corners[i]
            ax.text(left + w * scale / 2, top + th + 1, f"ch {ch}  ({fin:.2g})", ha="center", va="top", fontsize=6)
            i += 1
        i += cols - len(r.channels)
    fig.suptitle(
        f"{title + ': ' if title else ''}activation maximization: the input each channel prefers\n"
        "(gradient ascent from gray with jitter, blur, TV and L2 penalties; the channel's mean activation in brackets)",
        fontsize=9,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# receptive fields
# ---------------------------------------------------------------------------------------------
def receptive_field_table(model: nn.Module) -> list[dict]:
    """Per encoder layer: stride, receptive field and the share of the image it covers."""
    h, w, _ = _image_shape(model)
    rows = []
    for depth, f in enumerate(model.feature_info, start=1):
        rf = f["receptive_field"]
        rows.append(
            dict(
                depth=depth,
                layer=f["module"],
                shape="x".join(str(s) for s in f["shape"]),
                stride=f["reduction"] if f["reduction"] is not None else "-",
                receptive_field=rf,
                covers=min(rf, h) * min(rf, w) / (h * w),  # share of the image one unit sees
            )
        )
    return rows


def receptive_field_figure(model: nn.Module, image: np.ndarray | None = None, title: str = ""):
    """Receptive-field size by depth, against the image size; with an image, the centre unit's field at each depth."""
    if not _is_conv(model):
        raise ViewNotApplicable(
            "receptive fields: every unit of the dense autoencoder sees the whole image from its first "
            "layer on, so there is no growth with depth to show"
        )
    rows = receptive_field_table(model)
    h, w, _ = _image_shape(model)
    panels = 2 if image is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(10 if panels == 2 else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    depth = [r["depth"] for r in rows]
    ax.plot(depth, [r["receptive_field"] for r in rows], "o-", label="receptive field (px)")
    strides = [r["stride"] for r in rows]
    ax.plot(depth, strides, "s--", color="tab:green", label="stride (px)")
    ax.axhline(max(h, w), color="tab:red", ls=":", label=f"image size ({h}x{w})")
    ax.set_xticks(depth)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("pixels")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("receptive field and stride by depth", fontsize=9)
    if image is not None:
        ax2 = axes[0, 1]
        _show(ax2, np.asarray(image))
        layers = hierarchy_layers(model)
        if model.layer_names[0] not in layers:
            layers = [model.layer_names[0], *layers]
        colors = matplotlib.colormaps["autumn"](np.linspace(0, 0.85, len(layers)))
        for layer, color in zip(layers, colors):
            info = _info(model, layer)
            cy, cx = (info["shape"][1] - 1) // 2, (info["shape"][2] - 1) // 2
            top, left, bottom, right = model.receptive_box(layer, cy, cx)
            ax2.add_patch(
                matplotlib.patches.Rectangle(
                    (left - 0.5, top - 0.5), right - left, bottom - top, fill=False, lw=2, ec=color,
                    label=f"{layer}: {info['receptive_field']} px",
                )
            )
        ax2.set_xlim(-0.5, w - 0.5)
        ax2.set_ylim(h - 0.5, -0.5)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        ax2.set_title("the centre unit's field (clipped to the image)", fontsize=9)
    fig.suptitle(f"{title + ': ' if title else ''}receptive-field growth", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# reconstructions and training curves
# ---------------------------------------------------------------------------------------------
def reconstruction_figure(
    originals: np.ndarray, reconstructions: np.ndarray, title: str = "", show_error: bool = False
):
    """Originals (top row) above their reconstructions, each with its MSE and PSNR.

    With `show_error`, a third row shows the absolute error per pixel (mean over channels).
    """
    originals = originals.astype(np.float32) / 255 if originals.dtype == np.uint8 else originals
    n = len(originals)
    cols = min(n, 16)
    rows = int(np.ceil(n / cols))
    per = 3 if show_error else 2
    fig, axes = plt.subplots(per * rows, cols, figsize=(cols * 1.0 + 0.4, per * rows * 1.15 + 0.6), squeeze=False)
    mse = ((originals - reconstructions) ** 2).reshape(n, -1).mean(1)
    psnr = 10 * np.log10(1 / np.maximum(mse, 1e-10))
    error = np.abs(originals - reconstructions).mean(-1)
    vmax = max(float(error.max()), 1e-6)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[per * r, c], axes[per * r + 1, c]
        for ax, img in ((top, originals[i]), (bottom, reconstructions[i])):
            ax.axis("on")
            _show(ax, np.clip(img, 0, 1))
        bottom.set_xlabel(f"{psnr[i]:.1f} dB", fontsize=7)
        if show_error:
            ax = axes[per * r + 2, c]
            ax.axis("on")
            ax.imshow(error[i], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("recon", fontsize=8)
    if show_error:
        axes[2, 0].set_ylabel(f"|error|\n0-{vmax:.2f}", fontsize=7)
    fig.suptitle(f"{title}  MSE {mse.mean():.5f}  PSNR {psnr.mean():.2f} dB".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(history: Sequence[dict], title: str = ""):
    """Training curves from history.csv: loss, PSNR, SSIM and learning rate by epoch."""
    if not history:
        raise ViewNotApplicable("training curves: the run has no history.csv rows (it has not finished an epoch)")
    nan = float("nan")
    keys = ("epoch", "step", "train_loss", "val_mse", "val_psnr", "val_ssim", "lr", "seconds")
    history = [{k: r.get(k, nan) for k in keys} for r in history]  # older runs may lack a column
    epoch = [r["epoch"] for r in history]
    marker = "o" if len(history) < 30 else None
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    ax = axes[0, 0]
    ax.plot(epoch, [r["train_loss"] for r in history], marker=marker, ms=3, label="train loss")
    ax.plot(epoch, [r["val_mse"] for r in history], marker=marker, ms=3, label="validation MSE")
    losses = np.array([r[k] for r in history for k in ("train_loss", "val_mse")], dtype=float)
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if len(losses) and losses.max() / losses.min() > 10:  # log only where it spans a decade, else no tick is labelled
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("loss", fontsize=9)
    panels = (
        (axes[0, 1], "val_psnr", "validation PSNR (dB)"),
        (axes[1, 0], "val_ssim", "validation SSIM"),
        (axes[1, 1], "lr", "learning rate"),
    )
    for ax, key, name in panels:
        colour = "tab:purple" if key == "lr" else "tab:green"
        ax.plot(epoch, [r[key] for r in history], marker=marker, ms=3, color=colour)
        ax.set_title(name, fontsize=9)
    for ax in axes.flat:
        if len(epoch) <= 12:
            ax.set_xticks(epoch)
            ax.set_xlim(min(epoch) - 0.5, max(epoch) + 0.5)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    seconds = np.nansum([r["seconds"] for r in history])
    steps = history[-1]["step"]
    fig.suptitle(
        f"{title + ': ' if title else ''}{len(history)} epoch{'s' if len(history) > 1 else ''}, {'?' if steps != steps else int(steps)} steps, "
        f"{seconds:.1f} s of training",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# embedding of the bottleneck
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def layer_features(
    model: nn.Module, images, layer: str = "bottleneck", batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """One flattened row of `layer`'s activations per image."""
    check_images(model, images)
    device = _device_of(model)
    out = None
    bar = _bar(progress, len(images), "features")
    try:
        for start, batch in _batches(images, np.arange(len(images)), batch_size):
            a = model.forward_intermediates(_to_input(batch, device), [layer])[layer].flatten(1).float().cpu().numpy()
            if out is None:
                out = np.empty((len(images), a.shape[1]), dtype=np.float32)
            out[start : start + len(a)] = a
            if bar is not None:
                bar.update(len(a))
    finally:
        if bar is not None:
            bar.close()
    return out


def embed(
    features: np.ndarray, method: str = "pca", *, max_points: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (at most `max_points`, sampled with `seed`) rows, and which rows they are.

    t-SNE runs on the first 50 principal components, the usual denoising and speed-up.
    """
    from sklearn.decomposition import PCA

    rows = sample_indices(len(features), max_points, seed)
    x = np.asarray(features[rows], dtype=np.float64)
    x = x - x.mean(0)
    if method == "pca":
        n = min(2, *x.shape)
        coords = PCA(n_components=n, random_state=seed).fit_transform(x) if n else np.zeros((len(x), 0))
        if coords.shape[1] < 2:  # one image or one feature: pad, so the plot still has two axes
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        return coords, rows
    if method == "tsne":
        from sklearn.manifold import TSNE

        if len(x) < 5:
            raise ViewNotApplicable(f"t-SNE needs at least 5 images, got {len(x)}")
        d = min(50, x.shape[0], x.shape[1])
        if d < x.shape[1]:
            x = PCA(n_components=d, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=750)
        return tsne.fit_transform(x.astype(np.float32)), rows
    raise ConfigError(f"embedding method {method!r}: use pca or tsne")


def embedding_figure(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray | None,
    classes: Sequence[str] | None = None,
    title: str = "",
    notes: dict[str, str] | None = None,
):
    """Scatter plots of 2-D embeddings (name -> (n, 2)), coloured by label when there are labels."""
    notes = notes or {}
    names = list(embeddings) + [n for n in notes if n not in embeddings]
    width = 5.2 * len(names) + (1.6 if labels is not None else 0)  # room for the legend
    fig, axes = plt.subplots(1, len(names), figsize=(width, 5), squeeze=False)
    handles = None
    for ax, name in zip(axes[0], names):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=10)
        if name not in embeddings:
            ax.text(0.5, 0.5, notes[name], ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
            continue
        xy = embeddings[name]
        size = float(np.clip(12000 / len(xy), 4, 24))
        if labels is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c="tab:blue", alpha=0.6, linewidths=0)
            continue
        values = np.unique(labels)
        cmap = matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"]
        handles = []
        for j, v in enumerate(values):
            sel = labels == v
            name_v = classes[int(v)] if classes is not None and 0 <= int(v) < len(classes) else str(v)
            handles.append(
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(j % cmap.N), alpha=0.7, linewidths=0, label=name_v)
            )
    if handles and len(handles) <= 20:
        scale = max(1, 6 / max(1, handles[0].get_sizes()[0]) ** 0.5)  # legend dots readable however small the points
        fig.legend(handles=handles, loc="center right", fontsize=8, markerscale=scale, frameon=False)
    note = "coloured by label" if labels is not None else "no labels: points are not coloured"
    fig.suptitle(f"{title + ': ' if title else ''}bottleneck codes in 2-D ({note})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 0.95))
    return fig


# ---------------------------------------------------------------------------------------------
# probe results
# ---------------------------------------------------------------------------------------------
def load_probe_results(path: str | Path) -> list[dict]:
    """The rows of a `convae probe` results.json, checked for the keys the views need."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--probe {path}: no such file (write one with `convae probe RUN_DIR --train ... --test ... -o {path.name}`)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--probe {path}: not valid JSON ({e})") from e
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"--probe {path}: no \"rows\" list; pass the results.json `convae probe` writes")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"features", "classifier", "accuracy"} <= set(r):
            raise ConfigError(f"--probe {path}: row {i} lacks features, classifier or accuracy")
        if not isinstance(r["accuracy"], (int, float)):
            raise ConfigError(f"--probe {path}: row {i} accuracy {r['accuracy']!r} is not a number")
    return rows


def _split_feature_name(name: str) -> tuple[str, str, str]:
    """'stage2/grid4' -> ('', 'stage2', 'grid4'); 'random/stage2/grid4' -> ('random', 'stage2', 'grid4');
    'pixels' -> ('pixels', '', '')."""
    parts = str(name).split("/")
    if len(parts) == 1:
        return parts[0], "", ""
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "/".join(parts[:-2]), parts[-2], parts[-1]


def probe_figure(rows: Sequence[dict], layer_order: Sequence[str] | None = None, title: str = ""):
    """Test accuracy by layer: a line per classifier and pooling (dashed: random weights, other runs
    dotted), the pixel and PCA baselines as horizontal lines; a panel per labels-per-class."""
    groups = list(dict.fromkeys(str(r.get("labels_per_class", "all")) for r in rows))
    layers: list[str] = []
    for r in rows:
        _, layer, _ = _split_feature_name(r["features"])
        if layer and layer not in layers:
            layers.append(layer)
    if layer_order:
        order = {n: i for i, n in enumerate(layer_order)}
        layers.sort(key=lambda n: order.get(n, len(order)))
    pos = {n: i for i, n in enumerate(layers)}
    width = max(5.0, 1.0 * len(layers) + 2.4) * len(groups) + 0.6
    fig, axes = plt.subplots(1, len(groups), figsize=(width, 5.6), squeeze=False, sharey=True)
    colours = matplotlib.colormaps["tab10"]
    series_colour: dict[str, int] = {}
    for ax, group in zip(axes[0], groups):
        sel = [r for r in rows if str(r.get("labels_per_class", "all")) == group]
        lines: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
        flat = []
        for r in sel:
            source, layer, pool = _split_feature_name(r["features"])
            if layer:
                lines.setdefault((source, r["classifier"], pool), []).append((pos[layer], float(r["accuracy"])))
            else:
                dim = r.get("dim")
                label = f"{source} ({dim})" if source == "pca" and dim else source
                flat.append((label, r["classifier"], float(r["accuracy"])))
        for (source, clf, pool), pts in lines.items():
            pts.sort()
            key = f"{clf}/{pool}"
            colour = colours(series_colour.setdefault(key, len(series_colour)) % 10)
            style = "-" if not source else "--" if source == "random" else ":"
            label = f"{source + ' ' if source else ''}{clf}, {pool}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, color=colour, label=label)
        greys = iter(["0.25", "0.5", "0.65", "0.75", "0.4", "0.55"])
        for name, clf, acc in flat:
            ax.axhline(acc, color=next(greys, "0.5"), lw=1, ls="-.", label=f"{name}, {clf}: {acc:.3f}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.4, len(layers) - 0.6)
        ax.set_title(f"{group} labels per class", fontsize=9)
        ax.grid(alpha=0.3)
        # outside the plot, so no line hides behind it
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    axes[0, 0].set_ylabel("test accuracy")
    fig.suptitle(
        f"{title + ': ' if title else ''}probe accuracy by layer "
        "(frozen features; dashed: the same network with random weights)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# one view by name (what `convae show` draws)
# ---------------------------------------------------------------------------------------------
def render_view(
    view: str,
    model: nn.Module,
    *,
    data=None,
    history: Sequence[dict] | None = None,
    probe_rows: Sequence[dict] | None = None,
    layers=None,
    channels: int = 8,
    top_k: int = 8,
    count: int = 8,
    indices: Sequence[int] | None = None,
    max_images: int = 3000,
    steps: int = 128,
    seed: int = 0,
    progress: bool = False,
    title: str = "",
):
    """The figure of one view (see VIEWS). `data` is an ImageData (or anything with .images,
    .labels, .classes) of the model's image shape; views that need it say so when it is None."""
    if view not in VIEWS:
        raise ConfigError(f"--view {view!r}: choose one of {', '.join(VIEWS)}")
    needs_data = {"maps", "patches", "recon", "embedding"}
    if view in needs_data and data is None:
        raise ConfigError(
            f"--view {view} needs DATA (images to show), e.g. `convae show RUN_DIR digits:test --view {view}`"
        )
    if data is not None:
        check_images(model, data.images, getattr(data, "name", "data"))
    if view == "filters":
        return filters_figure(model, title=title)
    if view == "receptive":
        image = np.asarray(data.images[(indices or [0])[0]]) if data is not None else None
        return receptive_field_figure(model, image, title=title)
    if view == "curves":
        return curves_figure(history or [], title=title)
    if view == "probe":
        if not probe_rows:
            raise ConfigError("--view probe needs --probe results.json (written by `convae probe`)")
        from .features import feature_layer_names

        return probe_figure(probe_rows, feature_layer_names(model), title=title)
    if view == "maximize":
        chosen = resolve_view_layers(model, layers, hierarchy_layers)
        picks = {}
        if data is not None:
            sample = data.images[sample_indices(len(data.images), max_images, seed)]
            for lp in top_patches(model, sample, chosen, channels=channels, k=1, progress=progress):
                picks[lp.layer] = lp.channels
        results = []
        for layer in chosen:
            first = list(range(min(channels, _info(model, layer)["num_chs"])))  # without data: the first channels
            results.append(maximize_activation(model, layer, picks.get(layer, first), steps=steps, seed=seed))
        return maximize_figure(model, results, title=title)
    n = len(data.images)
    pick = _pick(n, indices, count)
    if view == "maps":
        shown = data.images[pick[:3] if indices is None else pick]  # maps of more than 3 images get unwieldy
        return feature_maps_figure(model, shown, layers, channels, title=title)
    if view == "recon":
        originals = np.asarray(data.images[pick])
        with torch.inference_mode():
            recon = model(_to_input(originals, _device_of(model))).float().permute(0, 2, 3, 1).cpu().numpy()
        return reconstruction_figure(originals, recon, title or getattr(data, "name", ""), show_error=True)
    rows = sample_indices(n, max_images, seed)
    sample = data.images[rows]
    if view == "patches":
        results = top_patches(model, sample, layers, channels=channels, k=top_k, progress=progress)
        return patches_figure(model, sample, results, title=title)
    # embedding
    feats = layer_features(model, sample, "bottleneck", progress=progress)
    labels = None if data.labels is None else np.asarray(data.labels)[rows]
    coords, notes = {}, {}
    for method, name in (("pca", "PCA"), ("tsne", "t-SNE")):
        try:
            xy, which = embed(feats, method, max_points=2000, seed=seed)
            coords[name] = xy
        except ViewNotApplicable as e:
            notes[name] = str(e)
    which_labels = None if labels is None else labels[which]
    return embedding_figure(coords, which_labels, getattr(data, "classes", None), title=title, notes=notes)


def _pick(n: int, indices: Sequence[int] | None, count: int) -> np.ndarray:
    if indices is None:
        return np.arange(min(max(count, 1), n))
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--index {bad[0]}: out of range for {n} images (0..{n - 1})")
    return np.asarray(indices, dtype=np.int64)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save as PNG atomically, then close the figure."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for inlining into HTML), then closed."""
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
    return buf.getvalue()
