"""The probe itself: features of a run (and of its baselines) fitted and scored, source by source.

Sources, each held in memory alone: the run's feature sets; the same architecture with random,
untrained weights (``random/``; its data statistics measured as training would, no gradient
step); other runs (``--compare``); raw pixels and PCA of the pixels. Unsupervised parts see all
train images, as the autoencoder did: PCA and the Whitener are fitted on every train image, and
only the classifiers are limited to the labelled subset. The PCA baseline is the standardized
pixels projected on their first principal axes, not standardized again: that would whiten the
scores, raising noise axes to the scale of the signal, and make PCA a straw man.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .._memory import release_freed_memory
from ..data import ImageData
from ..errors import ConfigError
from ..estimator import ConvAutoencoder
from ..features import FeatureCodes, FeatureExtractor, load_features, resolve_layers, split_names
from ..models import build_model
from ..progress import make_bar
from ..run import load_config, load_model
from ..tensors import allow_bf16, evenly_spaced
from .evaluate import DeferredRows, FeatureSet, evaluate_features, label_subsets
from .options import ProbeOptions
from .split import aggregate_folds, probe_splits

#: The random-weight baseline's data statistics are measured on up to this many train images.
CALIBRATION_IMAGES = 10_000
#: dtype "uint8": each column's code range is fitted to this many train images' features.
CODE_SAMPLE_IMAGES = 1024


def calibrate(
    model: nn.Module, images, layers: Sequence[str], *, max_images: int = CALIBRATION_IMAGES, batch_size: int = 256
) -> None:
    """Give an untrained `model` the data statistics training would (batch-norm statistics of the
    encoder up to `layers`; a sparse net's patch whitening) from up to `max_images` of `images`,
    evenly spaced, without a gradient step; leaves `model` in eval mode.

    An untrained model's running statistics are the identity (mean 0, variance 1), so its
    normalized maps are on whatever scale the random weights give: a strawman next to a trained
    model, and meaningless for sign splits, whose threshold is in standard deviations.
    """
    model.calibrate(images, evenly_spaced(np.arange(len(images)), max_images), layers, batch_size)
    model.eval()


def _model_of(source) -> tuple[nn.Module, str]:
    """(model, short name) of a run directory, a fitted ConvAutoencoder or a model."""
    if isinstance(source, ConvAutoencoder):
        check_is_fitted(source, "model_")
        return source.model_, "model"
    if isinstance(source, nn.Module):
        return source, "model"
    model, _ = load_model(source, device="cpu")  # the extractor moves it to the device
    return model, Path(source).name


def _images_labels(data, which: str):
    """(images, labels) of an ImageData or an (images, labels) pair; labels are required."""
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    name = getattr(data, "name", which)
    if labels is None:
        raise ConfigError(f"{which} data {name}: has no labels; the probe needs labelled train and test data")
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ConfigError(f"{which} data {name}: {len(labels)} labels for {len(images)} images")
    return images, labels


def layer_groups(model: nn.Module, layers: str | Iterable[str] | None) -> list[tuple[str, ...]]:
    """The feature sets a probe's `layers` asks for, each a tuple of layers in network order.

    "stage2,bottleneck" is two sets; "stage2+bottleneck" is one, both layers' pooled features
    concatenated (depths combined); "all" is every layer; None, every stage and the bottleneck.
    """
    if layers is None:
        return [(name,) for name in model.hierarchy_layers()]
    items = split_names(layers, "layers")
    if items == ["all"]:
        return [(name,) for name in model.layer_names]
    groups = [tuple(resolve_layers(model, [n.strip() for n in item.split("+")])) for item in items]
    return list(dict.fromkeys(groups))


def column_order(groups: Sequence[tuple[str, ...]]) -> list[str]:
    """Every layer of the groups once, in order of first use: each group's columns then lie side by
    side in the feature matrix wherever they can, and a set is a view of it rather than a copy
    (MNIST's preset: "stage2,bottleneck,stage2.conv1.split+stage3.conv1.split" in network order
    made the last set a 737 MB copy)."""
    return list(dict.fromkeys(n for g in groups for n in g))


def check_layers(run_dir, options: ProbeOptions) -> None:
    """The probe's layers exist in the run at `run_dir` (before any data is loaded); a preset's
    layers that do not fit the run say so."""
    if not options.layers:
        return
    with torch.device("meta"):  # only the layer names are needed: no weights allocated
        model = build_model(load_config(run_dir).model)
    try:
        layer_groups(model, options.layers)
    except ConfigError as e:
        if options.preset_layers:
            raise ConfigError(f"--preset {options.preset} does not fit {run_dir}: {e}; give --layers instead") from e
        raise


def _group_blocks(extractor: FeatureExtractor, groups: Sequence[tuple[str, ...]]) -> list[tuple[str, list]]:
    """(name, blocks) of each feature set: every group at every pooling, "a+b/pool" for a group."""
    out = []
    for group in groups:
        for pool in extractor.pools:
            blocks = [b for b in extractor.blocks if b.layer in group and b.pool == pool]
            out.append(("+".join(group) + f"/{pool}", blocks))  # the group's network order, whatever the columns
    return out


class MirroredImages:
    """uint8 images (N, H, W, C) seen mirrored left to right, read on access (arrays or LazyImages)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, images):
        self.images = images

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.images[idx])[..., ::-1, :])


def mirrored(images):
    """`images` mirrored left to right: a view of an array, else :class:`MirroredImages`."""
    if isinstance(images, np.ndarray):
        return images[:, :, ::-1]
    return MirroredImages(images)


def _features(
    extractor: FeatureExtractor,
    images,
    mirror: bool,
    progress: bool,
    dtype=np.float32,
    codes: FeatureCodes | None = None,
) -> np.ndarray:
    """Features of the images, then (with `mirror`) of their mirror images, in one `dtype` array
    (uint8: their `codes`), filled batch by batch: the only copy of them the probe holds."""
    n = len(images)
    out = np.empty(((2 if mirror else 1) * n, extractor.dim), dtype=dtype)
    extractor.fill(out, images, progress=progress, codes=codes)
    if mirror:
        extractor.fill(out, mirrored(images), offset=n, progress=progress, codes=codes)
    return out


def _codes_for(extractor: FeatureExtractor, images, dtype) -> FeatureCodes | None:
    """The 8-bit codes of the features of `images` when `dtype` is uint8 (else None), from
    CODE_SAMPLE_IMAGES of them evenly spaced: extracted twice, 1.7% more of MNIST's extraction."""
    if np.dtype(dtype) != np.uint8:
        return None
    rows = evenly_spaced(np.arange(len(images)), CODE_SAMPLE_IMAGES)
    return FeatureCodes.fitted(extractor.transform(images[rows]))


def _layer_sets(
    extractor: FeatureExtractor,
    groups: Sequence[tuple[str, ...]],
    train,
    test,
    prefix: str,
    progress: bool,
    mirror: bool = False,
    test_mirror: bool = False,
    dtype=np.float32,
    defer_test: bool = False,
) -> list[FeatureSet]:
    """The feature sets of `groups`: views of one extracted matrix a split. `defer_test`: the test
    features are extracted when a fit first scores them (:class:`DeferredRows`). `dtype` uint8:
    every split's features in the 8-bit codes fitted to the train images' (FeatureCodes)."""
    codes = _codes_for(extractor, train, dtype)
    xtr = _features(extractor, train, mirror, progress, dtype, codes)
    xte: np.ndarray | DeferredRows
    if defer_test:

        def extract_test() -> np.ndarray:
            release_freed_memory()  # what the fit freed (keep_freed_memory kept it) goes back first
            return _features(extractor, test, test_mirror, progress, dtype, codes)

        xte = DeferredRows(extract_test, len(test) * (1 + test_mirror))
    else:
        xte = _features(extractor, test, test_mirror, progress, dtype, codes)
    # the fits come next: hand back the batch buffers extraction kept for reuse (here, not after
    # every extraction: a trim costs the next call its buffers, 25-40 ms a small transform)
    release_freed_memory()
    sets = []
    for name, blocks in _group_blocks(extractor, groups):
        if all(a.stop == b.start for a, b in zip(blocks, blocks[1:])):
            columns = slice(blocks[0].start, blocks[-1].stop)  # a view: wide sets take GBs to copy
        else:
            columns = np.concatenate([np.arange(b.start, b.stop) for b in blocks])
        test_part = xte.columns(columns) if isinstance(xte, DeferredRows) else xte[:, columns]
        flips = dict(mirrored=mirror, test_mirrored=test_mirror)
        sets.append(FeatureSet(prefix + name, xtr[:, columns], test_part, **flips, layer_widths=_layer_widths(blocks)))
    return sets


def _layer_widths(blocks) -> tuple[int, ...]:
    """The widths of the columns of each layer among `blocks` (an extractor's, in column order:
    a layer's poolings side by side)."""
    return tuple(sum(b.stop - b.start for b in same) for _, same in groupby(blocks, key=lambda b: b.layer))


def _pixels(images, mirror: bool = False, batch: int = 4096) -> np.ndarray:
    """Pixels in [0, 1], one row per image (then one per mirror image, with `mirror`)."""
    n = len(images)
    out = np.empty(((2 if mirror else 1) * n, int(np.prod(images.shape[1:]))), dtype=np.float32)
    for offset, source in ((0, images), (n, mirrored(images)))[: 2 if mirror else 1]:
        for s in range(0, n, batch):
            rows = np.asarray(source[s : s + batch]).reshape(-1, out.shape[1]) / np.float32(255)
            out[offset + s : offset + s + len(rows)] = rows
    return out


def _pca_dims(dims: Iterable[int], pixels_shape: tuple[int, int]) -> list[int | float]:
    """PCA sizes to compare with: those below the pixel count and the train size.

    A PCA as large as the pixel count only rotates the standardized pixels, which the pixels
    row already measures. When no size is left, keep 95% of the variance.
    """
    n, pixels = pixels_shape
    kept = sorted({int(d) for d in dims if 0 < int(d) < min(pixels, n)})
    return kept or [0.95]


def run_probe(
    run,
    train,
    test,
    options: ProbeOptions | None = None,
    *,
    compare: Sequence = (),
    random_seed: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    **settings,
) -> list[dict]:
    """Probe the features of `run` (a run directory, a fitted ConvAutoencoder or a model).

    Parameters
    ----------
    run : path, ConvAutoencoder or AutoencoderNet
    train, test : ImageData or (images, labels)
        Labelled images of the model's image shape.
    options : ProbeOptions, optional
        What to probe; or give its fields as keywords (`settings`): ``layers`` (default every
        stage and the bottleneck; "stage2+bottleneck" probes those layers' features
        concatenated), ``pool`` ("grid4"), ``classifiers``, ``baselines``, ``labels_per_class``,
        ``seeds``, ``normalize`` ("standard", "whiten", "whiten-layers" or "whiten-blocks", see :func:`evaluate_features`),
        ``augment`` ("flip" fits every classifier on the train images and their mirror images
        too, baselines alike; "flip-tta" also scores each test image by the mean of the
        classifier's scores for it and its mirror image), ``c_scale``, ``max_iter`` and
        ``pca_dims`` (the PCA baseline's sizes; by default one per distinct dimension of the
        compared feature sets below the pixel count, else 95% of the variance).
    compare : sequence
        Other runs (e.g. the dense autoencoder), probed at the requested layers they have, or
        at their own default layers.

    Returns
    -------
    list of dict
        One row per feature set, labels per class and classifier (keys ``COLUMNS``), grouped
        by labels per class.

    Examples
    --------
    >>> rows = run_probe("runs/mnist", train, test, layers="stage2,stage2+bottleneck",   # doctest: +SKIP
    ...                  labels_per_class=[10, "all"], normalize="whiten")
    """
    options = ProbeOptions(**settings) if options is None else options.replace(**settings)
    probe, model, y_train, y_test = _prepared(run, train, test, options, device, batch_size, progress)
    sources = probe.sources(model, compare, random_seed, device, batch_size)
    with allow_bf16(options.precision == "auto"):  # the whitening's covariance, the random net's statistics
        return probe.evaluate(sources, y_train, y_test)


def probe_feature_sets(
    run, train, test, options: ProbeOptions | None = None, *, device: str = "auto", batch_size: int | None = None,
    progress: bool = False, **settings,
) -> list[FeatureSet]:  # fmt: skip
    """The feature sets of `run` that :func:`run_probe` fits (its own layers, no baselines),
    extracted once, to be fitted with :func:`evaluate_feature_sets` as often as wanted (e.g. once
    per iteration cap, as ``benchmarks/validate.py`` chooses it). Arguments as :func:`run_probe`'s."""
    options = ProbeOptions(**settings) if options is None else options.replace(**settings)
    probe, *_ = _prepared(run, train, test, options, device, batch_size, progress)
    return probe.layer_sets(probe.extractor, probe.groups, "")


def _prepared(run, train, test, options: ProbeOptions, device, batch_size, progress: bool):
    """(the probe of `run`'s layers, its model, the train labels, the test labels), the images checked."""
    train_images, y_train = _images_labels(train, "train")
    test_images, y_test = _images_labels(test, "test")
    model, _ = _model_of(run)
    groups = layer_groups(model, options.layers)
    extractor = FeatureExtractor(model, column_order(groups), options.pool, device=device, batch_size=batch_size,
                                 keep_order=True, precision=options.precision,
                                 compile=options.compile)  # fmt: skip
    for name, images in (("train", train_images), ("test", test_images)):
        extractor.check_images(images, f"{name} images")
    return _Probe(extractor, groups, train_images, test_images, options, progress), model, y_train, y_test


class _Probe:
    """One probe's feature sources, and their evaluation one source at a time."""

    def __init__(self, extractor, groups, train_images, test_images, options: ProbeOptions, progress: bool):
        self.extractor, self.groups, self.options, self.progress = extractor, groups, options, progress
        self.train, self.test = train_images, test_images

    def layer_sets(
        self, extractor: FeatureExtractor, groups, prefix: str, defer_test: bool = False
    ) -> list[FeatureSet]:
        o = self.options
        return _layer_sets(extractor, groups, self.train, self.test, prefix, self.progress, o.mirror, o.test_mirror,
                           np.dtype(o.dtype), defer_test)  # fmt: skip

    def sources(self, model, compare, random_seed: int, device, batch_size) -> Iterator[list[FeatureSet]]:
        """Feature sets, one source at a time, so only one source's features are held in memory."""
        yield self.layer_sets(self.extractor, self.groups, "", defer_test=True)
        if "random" in self.options.baselines:
            yield self.layer_sets(
                self._random_extractor(model, random_seed, device, batch_size), self.groups, "random/", defer_test=True
            )
        used = {"random", "pixels", "pca"}
        for i, other in enumerate(compare, start=1):
            other_model, name = _model_of(other)
            name = name if name not in used else f"compare{i}"
            used.add(name)
            valid = set(other_model.feature_layer_names())
            theirs = [g for g in self.groups if set(g) <= valid] or layer_groups(other_model, None)
            ex = FeatureExtractor(other_model, column_order(theirs), self.extractor.pools, device=device,
                                  batch_size=batch_size, keep_order=True, precision=self.options.precision,
                                  compile=self.options.compile)  # fmt: skip
            yield self.layer_sets(ex, theirs, f"{name}/", defer_test=True)
        yield from self._pixel_sources()

    def _random_extractor(self, model, random_seed: int, device, batch_size) -> FeatureExtractor:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(random_seed)
            untrained = type(model)(model.config)  # the same architecture, default initialisation
        ex = FeatureExtractor(untrained, self.extractor.layers, self.extractor.pools, device=device,
                              batch_size=batch_size, keep_order=True, precision=self.options.precision,
                              compile=self.options.compile)  # fmt: skip
        calibrate(untrained, self.train, self.extractor.layers, batch_size=ex.batch_size)
        return ex

    def _pixel_sources(self) -> Iterator[list[FeatureSet]]:
        o = self.options
        if "pixels" not in o.baselines and "pca" not in o.baselines:
            return
        flips = dict(mirrored=o.mirror, test_mirrored=o.test_mirror)
        xtr, xte = _pixels(self.train, o.mirror), _pixels(self.test, o.test_mirror)
        if "pixels" in o.baselines:
            yield [FeatureSet("pixels", xtr, xte, **flips)]
        if "pca" in o.baselines:
            dims = (
                o.pca_dims
                if o.pca_dims is not None
                else [sum(b.dim for b in blocks) for _, blocks in _group_blocks(self.extractor, self.groups)]
            )
            for d in _pca_dims(dims, xtr.shape):
                # The standardized pixels on their first d principal axes. Standardizing the
                # scores again would whiten them: noise axes blown up to the signal's scale.
                pca = make_pipeline(StandardScaler(), PCA(n_components=d, random_state=0)).fit(xtr)
                yield [FeatureSet("pca", pca.transform(xtr), pca.transform(xte), standardize=False, **flips)]

    def evaluate(self, sources: Iterator[list[FeatureSet]], y_train, y_test) -> list[dict]:
        o = self.options
        fits_per_set = len(o.classifiers) * sum(len(label_subsets(y_train, k, o.seeds)) for k in o.labels_per_class)
        bar = make_bar(self.progress, 0, unit="fit")
        rows: list[dict] = []
        try:
            for sets in sources:
                bar.total += fits_per_set * len(sets)
                bar.refresh()
                rows += evaluate_feature_sets(sets, y_train, y_test, o, on_fit=lambda: bar.update(1),
                                  device=self.extractor.device.type)  # fmt: skip
        finally:
            bar.close()
        order = {k: i for i, k in enumerate(o.labels_per_class)}
        return sorted(rows, key=lambda r: order[r["labels_per_class"]])  # stable: sources keep their order


def probe_feature_files(train_path, test_path, options: ProbeOptions | None = None, **settings) -> list[dict]:
    """Probe features `convae extract` already wrote (sharded or not), with their labels.

    `options` (or its fields as keywords): classifiers, labels_per_class, seeds, normalize,
    c_scale and max_iter apply; layers, pooling, baselines and augmentation need images.
    """
    o = ProbeOptions(**settings) if options is None else options.replace(**settings)
    (xtr, ytr), (xte, yte) = load_features(train_path), load_features(test_path)
    for path, x, y in ((train_path, xtr, ytr), (test_path, xte, yte)):
        check_probe_features(path, x, y)
    if len(np.unique(ytr)) < 2:
        raise ConfigError(f"{train_path}: every row has label {int(ytr[0])}; a classifier needs two classes or more")
    if xtr.shape[1] != xte.shape[1]:
        raise ConfigError(f"{train_path} has {xtr.shape[1]} features per image but {test_path} has {xte.shape[1]}")
    name = Path(train_path).stem.split(".rank")[0]
    # The files' own arrays (a memmap of a single .npy): the streaming classifiers read float16 or
    # float32 in place, so the probe makes no copy of them.
    xtr, xte = (x if x.dtype in (np.float16, np.float32) else np.asarray(x, dtype=np.float32) for x in (xtr, xte))
    return evaluate_feature_sets([FeatureSet(name, xtr, xte)], ytr, yte, o)


# Rows checked a chunk at a time, so a check of a memory-mapped file costs no copy of it.
_CHECK_ROWS = 4096


def check_probe_features(path, x: np.ndarray, y: np.ndarray | None) -> None:
    """Refuse, naming `path`, features a classifier cannot fit: no labels, labels that are not
    class indices or do not match the rows, no rows, or NaN or infinite values."""
    if y is None:
        raise ConfigError(f"{path}: no labels beside these features; extract labelled data to probe it")
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"{path}: no rows of features (shape {tuple(x.shape)}); extract some images first")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{path}: {len(y)} labels for {len(x)} rows of features; extract again")
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise ConfigError(f"{path}: labels must be class indices 0..K-1 (integers), got dtype {y.dtype}")
    for start in range(0, len(x), _CHECK_ROWS):
        finite = np.isfinite(x[start : start + _CHECK_ROWS]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise ConfigError(f"{path}: row {row} holds NaN or infinite values; extract it again or drop it")


def evaluate_feature_sets(sets: list[FeatureSet], y_train, y_test, o: ProbeOptions, **extra) -> list[dict]:
    """:func:`evaluate_features` with the options' classifiers, label subsets, fit settings and
    precision (the whitening's covariance in bf16 only under "auto"): the rows :func:`run_probe`
    gives for these sets. `extra`: ``on_fit``, ``device``."""
    with allow_bf16(o.precision == "auto"):
        return list(evaluate_features(
            sets, y_train, y_test, classifiers=o.classifiers, labels_per_class=o.labels_per_class, seeds=o.seeds,
            normalize=o.normalize, c_scale=o.c_scale, max_iter=o.max_iter, precondition=o.precondition,
            whiten_block_columns=o.whiten_block_columns, **extra,
        ))  # fmt: skip


def run_probe_on(run, data, options: ProbeOptions, **kwargs) -> list[dict]:
    """Probe one labelled dataset (an ImageData), split by `options`: a stratified hold-out
    (`test_fraction`) or stratified K folds (`cv`, the rows averaged over the folds with their
    standard deviation); `kwargs` go to :func:`run_probe`.

    Each split is probed as a train and a test set would be: the unsupervised parts (PCA, the
    random baseline's statistics) see its train images only.
    """
    images, labels = _images_labels(data, "the")
    if not hasattr(data, "subset"):  # an (images, labels) pair
        data = ImageData(images, labels, None, "data")
    folds = [
        run_probe(run, data.subset(tr), data.subset(te), options, **kwargs) for tr, te in probe_splits(labels, options)
    ]
    return folds[0] if options.cv is None else aggregate_folds(folds)
