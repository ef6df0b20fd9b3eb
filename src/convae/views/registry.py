"""Every view by name: what ``convae show`` draws one of and ``convae report`` draws all of.

A :class:`View` draws from a :class:`ViewContext` (the model, the data, the run's history and
probe rows, the user's options) and returns a :class:`Shown`: the figure, and the tables and
notes that go beside it in the report. Work shared between views (the image sample, the
channels the patches view picked, which the maximize view reuses) is cached on the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import ConfigError
from ..features.plan import check_precision
from ..tensors import allow_bf16, device_of, to_float_nchw
from . import VIEWS
from .common import ViewNotApplicable, check_images, hierarchy_layers, sample_indices, view_layers
from .depth import depth_figure, depth_rows
from .embedding import embed, embedding_figure, layer_features
from .filters import filters_figure
from .interpolate import interpolate_codes, interpolation_figure
from .maps import feature_maps_figure
from .maximize import maximize_activation, maximize_figure
from .outliers import outliers_figure, worst_reconstructed
from .patches import patches_figure, top_patches
from .probe import probe_figure
from .receptive import receptive_field_figure, receptive_field_table
from .training import curves_figure, reconstruction_figure


@dataclass
class Shown:
    """A drawn view: the figure, and what goes beside it in the report."""

    figure: Figure
    alt: str
    tables: list[tuple[list[dict], list[str], list[str]]] = field(default_factory=list)  # rows, columns, headers
    notes: list[str] = field(default_factory=list)  # plain text (escaped where shown)


@dataclass
class ViewContext:
    """What a view draws from. `data` is an ImageData (or anything with .images, .labels, .classes)
    of the model's image shape; views that need it say so when it is None."""

    model: Any
    data: Any = None
    history: Sequence[dict] | None = None
    probe_rows: Sequence[dict] | None = None
    layers: str | Sequence[str] | None = None
    channels: int = 8
    top_k: int = 8
    count: int = 8
    indices: Sequence[int | str] | None = None  # rows, or files of a folder (relative paths or unique names)
    max_images: int = 3000
    steps: int = 128
    seed: int = 0
    tsne_points: int = 2000
    progress: bool = False
    title: str = ""
    # "auto": the hierarchical models' products in bf16 where the device computes it natively, as
    # extraction does; "float32": every product fp32 (a figure to compare with an fp32 run's)
    precision: str = "auto"
    picks: dict[str, list[int]] = field(default_factory=dict)  # layer -> channels shown (patches, maximize)
    _sample: tuple[np.ndarray, np.ndarray] | None = None

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, images) of at most `max_images` images, drawn with `seed`; computed once."""
        if self._sample is None:
            rows = sample_indices(len(self.data.images), self.max_images, self.seed)
            self._sample = rows, np.asarray(self.data.images[rows])
        return self._sample

    def picked(self) -> np.ndarray:
        """The images to show one by one: `indices`, else the first `count`."""
        n = len(self.data.images)
        if self.indices is None:
            return np.arange(min(max(self.count, 1), n))
        rows = [self._row(i) for i in self.indices]
        bad = [i for i in rows if not 0 <= i < n]
        if bad:
            raise ConfigError(f"--index {bad[0]}: out of range for {n} images (0..{n - 1})")
        return np.asarray(rows, dtype=np.int64)

    def _row(self, pick: int | str) -> int:
        """A row from an index, or from a file's path relative to the folder (or its unique name)."""
        if isinstance(pick, (int, np.integer)):
            return int(pick)
        paths = getattr(self.data, "paths", None)
        if not paths:
            raise ConfigError(f"--index {pick}: images can be chosen by path only in a folder of images; give a number")
        wanted = str(pick).replace("\\", "/")
        found = [i for i, p in enumerate(paths) if p == wanted]
        found = found or [i for i, p in enumerate(paths) if p.rsplit("/", 1)[-1] == wanted.rsplit("/", 1)[-1]]
        if len(found) != 1:
            what = "no image" if not found else f"{len(found)} images"
            raise ConfigError(
                f"--index {pick}: {what} of {self.data.name} by that path; give the path relative to the folder"
            )
        return found[0]

    def name_of(self, row: int) -> str:
        """Image `row` as figures name it: its path in a folder, else dataset[index]."""
        describe = getattr(self.data, "describe", None)
        return describe(int(row)) if describe else f"#{int(row)}"


@dataclass(frozen=True)
class View:
    name: str
    title: str  # the report section's heading
    about: str  # what it shows and how to read it
    draw: Callable[[ViewContext], Shown]
    needs_data: bool = False


def _filters(ctx: ViewContext) -> Shown:
    return Shown(filters_figure(ctx.model, title=ctx.title), "first-layer filters")


def _maps(ctx: ViewContext) -> Shown:
    pick = ctx.picked()
    shown = ctx.data.images[pick[:3] if ctx.indices is None else pick]  # maps of more than 3 images get unwieldy
    return Shown(feature_maps_figure(ctx.model, shown, ctx.layers, ctx.channels, title=ctx.title), "feature maps")


def _patches(ctx: ViewContext) -> Shown:
    _, sample = ctx.sample()
    results = top_patches(ctx.model, sample, ctx.layers, channels=ctx.channels, k=ctx.top_k, progress=ctx.progress)
    ctx.picks.update({lp.layer: lp.channels for lp in results})
    return Shown(patches_figure(ctx.model, sample, results, title=ctx.title), "top-activating patches")


def _maximize(ctx: ViewContext) -> Shown:
    model = ctx.model
    chosen = view_layers(model, ctx.layers, hierarchy_layers)
    missing = [layer for layer in chosen if layer not in ctx.picks]
    if missing and ctx.data is not None:  # the same choice as the patches view: the most variable channels
        _, sample = ctx.sample()
        for lp in top_patches(model, sample, missing, channels=ctx.channels, k=1, progress=ctx.progress):
            ctx.picks[lp.layer] = lp.channels
    results = []
    for layer in chosen:
        first = list(range(min(ctx.channels, model.layer_info(layer).num_chs)))  # without data: the first channels
        results.append(maximize_activation(model, layer, ctx.picks.get(layer, first), steps=ctx.steps, seed=ctx.seed))
    gain = ", ".join(f"{r.layer}: {np.mean(r.start):.3g} \u2192 {np.mean(r.final):.3g}" for r in results)
    note = f"Mean activation of the chosen channels, starting image \u2192 synthesized: {gain}."
    return Shown(maximize_figure(model, results, title=ctx.title), "activation maximization", notes=[note])


def _receptive(ctx: ViewContext) -> Shown:
    image = np.asarray(ctx.data.images[(ctx.indices or [0])[0]]) if ctx.data is not None else None
    fig = receptive_field_figure(ctx.model, image, title=ctx.title)
    table = (
        receptive_field_table(ctx.model),
        ["depth", "layer", "shape", "stride", "receptive_field", "covers"],
        ["depth", "layer", "output (CxHxW)", "stride (px)", "receptive field (px)", "share of the image one unit sees"],
    )
    return Shown(fig, "receptive-field growth", tables=[table])


def _recon(ctx: ViewContext) -> Shown:
    originals = np.asarray(ctx.data.images[ctx.picked()])
    model = ctx.model
    with torch.inference_mode():
        recon = model(to_float_nchw(originals, device_of(model))).float().permute(0, 2, 3, 1).cpu().numpy()
    title = ctx.title or getattr(ctx.data, "name", "")
    return Shown(reconstruction_figure(originals, recon, title, show_error=True), "reconstructions")


def _outliers(ctx: ViewContext) -> Shown:
    rows, sample = ctx.sample()
    found = worst_reconstructed(ctx.model, sample, ctx.count)
    names = [ctx.name_of(rows[r]) for r in found.rows]
    title = (
        ctx.title or f"{getattr(ctx.data, 'name', '')}: the {len(found.rows)} worst reconstructed of {len(rows)} images"
    )
    note = (
        f"Ranked by reconstruction MSE over {len(rows)} images; `convae score` ranks every image by MSE, "
        "1 - SSIM or the k-NN distance to the training images, with thresholds."
    )
    return Shown(outliers_figure(found, names, title), "worst reconstructed images", notes=[note])


def _interpolate(ctx: ViewContext) -> Shown:
    if ctx.indices is not None:
        picks = ctx.picked()
        if len(picks) != 2:
            raise ConfigError(f"--view interpolate takes two images (--index A,B), got {len(picks)}")
        a, b = (int(i) for i in picks)
    else:
        a, b = 0, _other_image(ctx.data)
    steps = max(ctx.count, 3)
    found = interpolate_codes(ctx.model, np.asarray(ctx.data.images[a]), np.asarray(ctx.data.images[b]), steps)
    names = (ctx.name_of(a), ctx.name_of(b))
    return Shown(interpolation_figure(found, names, ctx.title), "interpolation between two images")


def _other_image(data) -> int:
    """The first image of another class than the first image's (with labels), else the second image."""
    if len(data.images) < 2:
        raise ViewNotApplicable("interpolation needs two images")
    if data.labels is not None:
        other = np.flatnonzero(np.asarray(data.labels) != data.labels[0])
        if len(other):
            return int(other[0])
    return 1


def _curves(ctx: ViewContext) -> Shown:
    return Shown(curves_figure(ctx.history or [], title=ctx.title), "training curves")


def _embedding(ctx: ViewContext) -> Shown:
    rows, sample = ctx.sample()
    feats = layer_features(ctx.model, sample, "bottleneck", progress=ctx.progress)
    coords, notes, which = {}, {}, None
    for method, name in (("pca", "PCA"), ("tsne", "t-SNE")):
        try:
            coords[name], which = embed(feats, method, max_points=ctx.tsne_points, seed=ctx.seed)
        except ViewNotApplicable as e:
            notes[name] = str(e)
    labels = None if ctx.data.labels is None else np.asarray(ctx.data.labels)[rows][which]
    fig = embedding_figure(coords, labels, getattr(ctx.data, "classes", None), title=ctx.title, notes=notes)
    pcs = min(50, feats.shape[1], len(which))
    shown = [
        f"{len(which)} images; bottleneck codes of {feats.shape[1]} values; t-SNE on their first {pcs} principal components."
    ]
    if labels is None:
        shown.insert(0, "The data has no labels, so the points are not coloured by class.")
    return Shown(fig, "embedding of the bottleneck", notes=shown)


def _probe(ctx: ViewContext) -> Shown:
    if not ctx.probe_rows:
        raise ViewNotApplicable(
            "no probe results given: run `convae probe RUN_DIR --train DATA:train --test DATA:test "
            "-o results.json` (it needs labelled data) and pass `--probe results.json`"
        )
    fig = probe_figure(ctx.probe_rows, ctx.model.feature_layer_names(), title=ctx.title)
    columns = [c for c in PROBE_COLUMNS if c in ctx.probe_rows[0]]
    return Shown(fig, "probe accuracy by layer", tables=[(list(ctx.probe_rows), columns, columns)])


def _depth(ctx: ViewContext) -> Shown:
    if not ctx.probe_rows:
        raise ViewNotApplicable(
            "no probe results given: run `convae probe RUN_DIR --train DATA:train --test DATA:test "
            "-o results.json` with its random baseline (the default) and pass `--probe results.json`"
        )
    fig = depth_figure(ctx.probe_rows, ctx.model, title=ctx.title)
    columns = ["setting", "depth", "trained", "random", "margin", "trained_features", "random_features"]
    headers = ["setting", "depth", "trained", "random weights", "trained - random", "trained set", "random set"]
    return Shown(fig, "accuracy by depth", tables=[(depth_rows(ctx.probe_rows, ctx.model), columns, headers)])


PROBE_COLUMNS = (
    "features", "classifier", "normalize", "augment", "dim", "labels_per_class", "seeds", "accuracy", "accuracy_std",
    "macro_f1", "fit_seconds", "iterations",
)  # fmt: skip

#: Every view, in the report's order.
REGISTRY: dict[str, View] = {
    v.name: v
    for v in (
        View("curves", "Training curves",
             "Loss, validation PSNR and SSIM and the learning rate, epoch by epoch (history.csv).", _curves),
        View("recon", "Reconstructions",
             "Originals (top), reconstructions (middle) and the absolute error per pixel (bottom).", _recon, True),
        View("outliers", "Worst reconstructed images",
             "The images the model reconstructs worst, worst first: original, reconstruction and the squared "
             "error per pixel (one colour scale). Outliers, defects, mislabelled or broken files tend to be here.",
             _outliers, True),
        View("filters", "First-layer filters",
             "The first layer's weights, strongest first: edge, corner and (for colour images) colour-gradient "
             "detectors.", _filters),
        View("receptive", "Receptive fields",
             "How much of the image one unit sees, layer by layer: it grows with depth, which is why deeper layers "
             "can respond to parts and objects.", _receptive),
        View("maps", "Feature maps",
             "Activations of the first images at every encoder layer, the most variable channels, each scaled to "
             "its own range.", _maps, True),
        View("patches", "Top-activating patches",
             "For each depth, the channels that vary most over the data and the image regions that excite each "
             "most, cropped to the unit's exact receptive field: edges first, then parts, then whole objects.",
             _patches, True),
        View("maximize", "Activation maximization",
             "For deeper layers, whose weights are not pictures: the input each channel prefers, found by "
             "regularized gradient ascent from gray.", _maximize),
        View("embedding", "Embedding of the bottleneck",
             "The bottleneck codes in 2-D: PCA (linear) and t-SNE (neighbourhoods); classes that separate here are "
             "easy to read off the code.", _embedding, True),
        View("interpolate", "Between two images",
             "Codes on the line between two images' codes, decoded (top), beside the pixel-space blend of the same "
             "two images (bottom): what the code space holds between them.", _interpolate, True),
        View("probe", "Probe accuracy by layer",
             "Linear (or other) classifiers on each layer's frozen features, beside pixel, PCA and random-weight "
             "baselines.", _probe),
        View("depth", "Accuracy by depth: trained vs random weights",
             "For each depth of the hierarchy, the best feature set reaching it, with the trained weights and with "
             "random ones (the same architecture, its data statistics measured, no training): what learning adds "
             "at each depth.", _depth),
    )
}  # fmt: skip


def draw(name: str, ctx: ViewContext) -> Shown:
    """View `name` drawn from `ctx`; ViewNotApplicable when it does not apply, saying why."""
    view = REGISTRY.get(name)
    if view is None:
        raise ConfigError(f"--view {name}: choose one of {', '.join(REGISTRY)}")
    if view.needs_data and ctx.data is None:
        raise ConfigError(
            f"--view {name} needs DATA (images to show), e.g. `convae show RUN_DIR digits:test --view {name}`"
        )
    if ctx.data is not None:
        check_images(ctx.model, ctx.data.images, getattr(ctx.data, "name", "data"))
    with allow_bf16(check_precision(ctx.precision) == "auto"):
        return view.draw(ctx)


def render_view(view: str, model, **options) -> Figure:
    """The figure of one view, as ``convae show`` draws it.

    Parameters
    ----------
    view : str
        One of ``convae.views.VIEWS``: curves, recon, outliers, filters, receptive, maps,
        patches, maximize, embedding, interpolate, probe.
    model : AutoencoderNet
    **options
        :class:`ViewContext`'s fields: data (an ImageData of the model's image shape), history,
        probe_rows, layers, channels, top_k, count, indices, max_images, steps, seed, progress,
        title, precision ("auto" or "float32", as for :class:`convae.FeatureExtractor`).

    Returns
    -------
    matplotlib.figure.Figure
        Save it with :func:`convae.views.save_figure`.

    Examples
    --------
    >>> fig = render_view("patches", model, data=convae.load_dataset("mnist", "test"))  # doctest: +SKIP
    >>> save_figure(fig, "patches.png")                                                # doctest: +SKIP
    """
    return draw(view, ViewContext(model, **options)).figure


if tuple(REGISTRY) != VIEWS:  # the CLI knows the names without importing the views
    raise ImportError("convae.views: REGISTRY and VIEWS disagree")
