"""Classifiers fitted on frozen features and scored: one row per feature set, labels per class
and classifier, averaged over label subsets."""

from __future__ import annotations

import time
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import ConfigError
from .classifiers import CLASSIFIERS, Whitener
from .options import WHITEN_BLOCK_COLUMNS, check_fit_options, check_whiten_block_columns

COLUMNS = (
    "features",
    "classifier",
    "normalize",
    "augment",
    "dim",
    "labels_per_class",
    "seeds",
    "accuracy",
    "accuracy_std",
    "macro_f1",
    "fit_seconds",
    "iterations",
)


class DeferredRows:
    """An array made on first use, once for all its column views (:meth:`columns`): a probe's test
    features, extracted after its first fit, so that they and the fit's working memory (the
    preconditioner's factors, L-BFGS's history, the workers' buffers) are never held at once. With
    both held, the cifar10 preset's probe peaked at 8.11 GB with its extraction compiled, 7.86
    without (benchmarks/RESULTS.md)."""

    def __init__(self, make: Callable[[], np.ndarray], n_rows: int):
        self._make: Callable[[], np.ndarray] | None = make
        self._value: np.ndarray | None = None
        self.n_rows = n_rows
        self._whole = self  # a view's: the rows it selects columns of
        self._selections: tuple[slice | np.ndarray, ...] = ()  # a view's column selections, in order

    @classmethod
    def _view(cls, whole: DeferredRows, selections: tuple[slice | np.ndarray, ...]) -> DeferredRows:
        """Columns of `whole`, made from it when first used; only the whole holds the maker (and
        what the maker holds)."""
        view = cls.__new__(cls)
        view._make, view._value, view.n_rows = None, None, whole.n_rows
        view._whole, view._selections = whole, selections
        return view

    def __len__(self) -> int:
        return self.n_rows

    def array(self) -> np.ndarray:
        whole = self._whole
        if whole._value is None:
            whole._value = typing.cast(Callable[[], np.ndarray], whole._make)()
            whole._make = None  # the images and the extractor it holds go with it (not before: a retry)
        out = whole._value
        for columns in self._selections:
            out = out[:, columns]
        return out

    def columns(self, columns: slice | np.ndarray) -> DeferredRows:
        return DeferredRows._view(self._whole, (*self._selections, columns))


def rows_of(x) -> np.ndarray:
    """`x` itself, or the array deferred rows stand for (made now if not yet)."""
    return x.array() if isinstance(x, DeferredRows) else x


@dataclass
class FeatureSet:
    """Train and test features of one row group, e.g. ``stage2/grid4`` or ``pixels``.

    `standardize`: put a StandardScaler before each classifier (False for features that are
    already on a common scale and must keep their relative variances, like PCA scores).
    """

    name: str
    train: np.ndarray
    test: np.ndarray | DeferredRows  # see rows_of
    standardize: bool = True
    # the train rows are the images' features, then their mirror images' (same labels, in order)
    mirrored: bool = False
    # the same for the test rows: each test image is scored as the mean of both rows' scores
    test_mirrored: bool = False
    # the widths of its layers' columns, in order (None: one block): what normalize="whiten-layers"
    # whitens each on its own
    layer_widths: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def label_subsets(y: np.ndarray, per_class: int | str, seeds: int) -> list[np.ndarray]:
    """Train indices with `per_class` labels of each class (all of a smaller class), one set per seed."""
    if per_class == "all":
        return [np.arange(len(y))]
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        picked = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
        out.append(np.sort(np.concatenate(picked)))
    return out


def evaluate_features(
    feature_sets: Iterable[FeatureSet],
    y_train: np.ndarray,
    y_test: np.ndarray,
    *,
    classifiers: Sequence[str] = ("logreg",),
    labels_per_class: Sequence[int | str] = ("all",),
    seeds: int = 3,
    normalize: str = "standard",
    c_scale: float = 1.0,
    max_iter: int | None = None,
    precondition: bool = False,
    whiten_block_columns: int = WHITEN_BLOCK_COLUMNS,
    on_fit: Callable[[], None] | None = None,
    device: str = "cpu",
) -> Iterator[dict]:
    """One row per (feature set, labels per class, classifier), averaged over the label subsets.

    `normalize`: "standard" puts a StandardScaler before each classifier. "whiten" standardizes
    and whitens (:class:`Whitener`) a feature set ("whiten-layers": each of its layers' columns,
    :attr:`FeatureSet.layer_widths`, on their own; "whiten-blocks": each layer's columns in
    even blocks of at most `whiten_block_columns`, on their own: each block's float32 factor,
    kept for the fit, is what the whitening's memory peaks on), fitted on all its train features
    (unsupervised, as the autoencoder; its seconds count in each whitened row's fit_seconds),
    for the rows fitted on all labels, when there are at least as many as the set has features:
    logreg and linsvm fold the whitening into their weights (the same solution, no whitened
    copy of the features), the other classifiers get a whitened copy made once per set.
    Label subsets stay standardized: a whitened L2 penalty lets few labels be fitted along
    noise axes (MNIST's 6,144 values, 10 labels a class: 0.86 standardized, 0.20 whitened; PCA
    of the pixels, 331 values, 100 a class: 0.86 and 0.80). Each row's `normalize` says which
    it got. A :attr:`FeatureSet.mirrored` set fits its classifiers on each chosen train image
    and its mirror image (`augment` "flip" in its rows); a :attr:`FeatureSet.test_mirrored` set
    scores each test image with its mirror image too (:func:`predict_with_mirrors`, "flip-tta").
    `c_scale` multiplies the C of logreg, linsvm and rbfsvm (above 1: less regularization);
    `max_iter` caps the iterations of logreg, linsvm and mlp (None: 300, 1000 and 300).
    `precondition`: logreg and linsvm take their L-BFGS steps in a block whitening's
    coordinates (their `precondition`: the same minimum, in fewer passes over the features).
    `device` ("cpu", "cuda"): where the classifiers that can (logreg, linsvm) fit.
    """
    check_fit_options(c_scale, max_iter)
    check_whiten_block_columns(whiten_block_columns)
    subsets = {k: label_subsets(y_train, k, seeds) for k in labels_per_class}
    for fs in feature_sets:
        _check_rows(fs, len(y_train), len(y_test))
        white = _Whitened(fs, normalize if normalize != "standard" else None, whiten_block_columns)
        for k in labels_per_class:
            whiten = white.mode if k == "all" and len(y_train) >= fs.dim else None
            blocks = white.widths if whiten else None
            for name in classifiers:
                # a streaming classifier whitens by itself (folded into its weights: no whitened copy)
                copied = whiten is not None and not _folds(name)
                train_x, test_x, prep_seconds = white.get() if copied else (fs.train, fs.test, 0.0)
                scores = []
                for seed, idx in enumerate(subsets[k]):
                    fit = (fs, train_x, test_x, y_train, y_test, name, seed, idx, k, whiten, c_scale, max_iter, device,
                           precondition, blocks)  # fmt: skip
                    scores.append(_fit_and_score(*fit))
                    if on_fit is not None:
                        on_fit()
                for mode in scores[0]:  # a flip-tta set: the test images alone, then with their mirror images
                    yield _row(fs, name, k, whiten, [s[mode] for s in scores], prep_seconds, mode)


def _check_rows(fs: FeatureSet, n_train: int, n_test: int) -> None:
    if fs.mirrored and len(fs.train) != 2 * n_train:
        raise ConfigError(f"{fs.name}: mirrored train features need 2 x {n_train} rows, got {len(fs.train)}")
    if fs.test_mirrored and len(fs.test) != 2 * n_test:
        raise ConfigError(f"{fs.name}: mirrored test features need 2 x {n_test} rows, got {len(fs.test)}")


class _Whitened:
    """A feature set standardized and whitened (`mode` "whiten"; "whiten-layers": each layer's
    columns on their own; "whiten-blocks": blocks of them, at most `block_columns` wide),
    computed on first use (once per set); `mode` None: not whitened. `widths`: the blocks'
    widths (None: one block), what a streaming classifier whitens by itself."""

    def __init__(self, fs: FeatureSet, mode: str | None, block_columns: int):
        self.fs, self.mode, self._cached = fs, mode, None
        self.widths = _whitened_widths(fs, mode, block_columns)

    def get(self) -> tuple[np.ndarray, np.ndarray, float]:
        if self._cached is None:
            t0 = time.perf_counter()
            whitener = _whitener(self.fs.standardize, self.widths).fit(self.fs.train)
            train, test = whitener.transform(self.fs.train), whitener.transform(rows_of(self.fs.test))
            self._cached = (train, test, time.perf_counter() - t0)
        return self._cached


def _whitener(standardize: bool, widths: Sequence[int] | None):
    """(StandardScaler +) Whitener, or one for each block of columns `widths` wide: a
    ColumnTransformer only then, since it stacks its parts into a copy."""
    scaler = [StandardScaler()] if standardize else []
    if widths is None:
        return make_pipeline(*scaler, Whitener())
    edges = np.cumsum([0, *widths]).tolist()
    blocks = [
        (f"block{i}", make_pipeline(*scaler, Whitener()), slice(a, b)) for i, (a, b) in enumerate(pairwise(edges))
    ]
    return ColumnTransformer(blocks)


def _fit_and_score(
    fs: FeatureSet,
    train_x,
    test_x,
    y_train,
    y_test,
    name: str,
    seed: int,
    idx: np.ndarray,
    per_class,
    whiten: str | None,
    c_scale: float,
    max_iter: int | None,
    device: str = "cpu",
    precondition: bool = False,
    whiten_blocks: Sequence[int] | None = None,
) -> dict[str, tuple[float, float, float, int | None]]:
    """{augment: (accuracy, macro-F1, fit seconds, optimizer iterations or None)} of classifier
    `name` fitted on the train rows `idx` (all: every row), whitened (`whiten`) in blocks
    `whiten_blocks` wide (None: one block)."""
    n_images = len(y_train)
    y_fit = np.concatenate([y_train, y_train]) if fs.mirrored else y_train
    if per_class == "all":
        rows = slice(None)  # a view, not a copy
    else:
        rows = np.concatenate([idx, idx + n_images]) if fs.mirrored else idx
    clf = _classifier(name, seed, len(idx), fs.dim, c_scale, max_iter, fs.standardize, whiten is not None, device,
                      precondition, whiten_blocks)  # fmt: skip
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # an unconverged probe is still a fair, if slightly low, measurement
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x[rows], y_fit[rows])
    seconds, iterations = time.perf_counter() - t0, _iterations(clf)
    test_x = rows_of(test_x)  # made only now, if deferred: after the fit's working memory is freed
    augment = "flip" if fs.mirrored else "none"
    if not fs.test_mirrored:
        pred = clf.predict(test_x)
        return {augment: (accuracy_score(y_test, pred), f1_score(y_test, pred, average="macro"), seconds, iterations)}
    # The same classifier scores the test images alone and with their mirror images: what test-time
    # augmentation adds is told apart at no cost (the headline number is the first).
    preds = {augment: clf.predict(test_x[: len(y_test)]), "flip-tta": predict_with_mirrors(clf, test_x)}
    return {
        m: (accuracy_score(y_test, p), f1_score(y_test, p, average="macro"), seconds, iterations)
        for m, p in preds.items()
    }


def _iterations(clf) -> int | None:
    """The iterations a fitted classifier's optimizer took (a pipeline's last step's; the most
    over one-vs-rest fits), or None for one without an iterative fit (k-NN, random forest).

    The probe hides ConvergenceWarning (an unconverged fit is still a fair measurement): this
    column is where a user sees a fit that stopped at max_iter."""
    n_iter = getattr(clf[-1] if isinstance(clf, Pipeline) else clf, "n_iter_", None)
    return None if n_iter is None else int(np.max(n_iter))


def _folds(name: str) -> bool:
    """Whether classifier `name` folds standardization and whitening into its weights (a streaming one)."""
    return "whiten" in CLASSIFIERS[name](0, 1, 1, 1.0, None).get_params()


def _classifier(name: str, seed: int, n: int, dim: int, c_scale: float, max_iter: int | None, standardize: bool,
                whiten: bool = False, device: str = "cpu", precondition: bool = False,
                whiten_blocks: Sequence[int] | None = None):  # fmt: skip
    """The classifier `name` for a feature set that is standardized when `standardize` and then
    whitened when `whiten` (each block of columns `whiten_blocks` wide on its own; None: all
    together). A streaming classifier does both by itself, folded into its weights (no copy of
    the features; it fits on `device`); any other gets a StandardScaler, and its features come
    whitened already (:class:`_Whitened`)."""
    clf = CLASSIFIERS[name](seed, n, dim, c_scale, max_iter)
    if _folds(name):
        whitening = Whitener().eps if whiten else None
        return clf.set_params(
            standardize=standardize, whiten=whitening, whiten_blocks=whiten_blocks,
            precondition=precondition, device=device,
        )  # fmt: skip
    return make_pipeline(StandardScaler(), clf) if standardize and not whiten else clf


def _whitened_widths(fs: FeatureSet, whiten: str | None, block_columns: int) -> tuple[int, ...] | None:
    """The widths of the blocks of `fs`'s columns whitened each on its own (None: all together,
    as for a set of one layer); "whiten-blocks" cuts each layer into blocks of at most `block_columns`."""
    widths = None
    if whiten == "whiten-layers":
        widths = fs.layer_widths
    elif whiten == "whiten-blocks":
        widths = tuple(w for layer in fs.layer_widths or (fs.dim,) for w in _even_parts(layer, block_columns))
    return widths if widths is not None and len(widths) > 1 else None


def _even_parts(width: int, most: int) -> list[int]:
    """`width` cut into the fewest parts of at most `most`, as even as can be."""
    parts = -(-width // most)
    return [width // parts + (i < width % parts) for i in range(parts)]


def _row(fs: FeatureSet, name: str, per_class, whiten: str | None, scores, prep_seconds: float, augment: str) -> dict:
    accs, f1s, secs = (np.array(v) for v in list(zip(*scores))[:3])
    return dict(
        features=fs.name,
        classifier=name,
        normalize=whiten or "standard",
        augment=augment,
        dim=fs.dim,
        labels_per_class=per_class,
        seeds=len(accs),
        accuracy=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        macro_f1=float(np.mean(f1s)),
        fit_seconds=float(np.mean(secs + prep_seconds)),
        iterations=mean_iterations([s[3] for s in scores]),
    )


def mean_iterations(counts: Sequence[int | None]) -> int | None:
    """The mean of fits' iteration counts, rounded; None if any fit has none."""
    return None if None in counts else round(float(np.mean(counts)))


def predict_with_mirrors(clf, x: np.ndarray) -> np.ndarray:
    """Labels of the images whose features are x's first half, their mirror images' the second:
    the class with the highest mean score over both (decision_function, else predict_proba)."""
    n = len(x) // 2
    scores = clf.decision_function if hasattr(clf, "decision_function") else clf.predict_proba
    mean = (scores(x[:n]) + scores(x[n:])) / 2
    if mean.ndim == 1:  # binary decision_function: the second class's margin
        return clf.classes_[(mean > 0).astype(int)]
    return clf.classes_[mean.argmax(1)]
