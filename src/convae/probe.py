"""How good the features are, layer by layer: simple classifiers on frozen features.

For each feature set (an encoder layer under a pooling) and classifier, fit
``StandardScaler -> classifier`` on the train features (with ``normalize="whiten"``, the rows
fitted on all labels get them whitened by :class:`Whitener` as well, baselines alike) and report
test accuracy and macro-F1, beside baselines given the same classifier: raw pixels, PCA of the
pixels with the same dimension as the compared features, the same architecture with random untrained
weights (what training adds; its batch-norm statistics measured on the train images, no
gradient step), and other runs. The PCA baseline is the standardized pixels projected on their
first principal axes, not standardized again: that would whiten the scores, raising noise axes
to the scale of the signal, and make PCA a straw man (the Whitener floors weak axes for the
same reason). With few labels per class, the label subsets are drawn per seed (the same subsets
for every feature set) and the scores averaged over seeds.

Unsupervised parts see all train images, as the autoencoder did: PCA and the Whitener are
fitted on every train image, and only the classifiers are limited to the labelled subset.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from ._io import atomic_write_text
from ._version import __version__
from .errors import ConfigError
from .features import FeatureExtractor, _progress_bar, feature_layer_names, resolve_layers, resolve_pools, split_names

def logreg_c(dim: int) -> float:
    """The logistic regression's C for `dim` standardized features: 64 / dim (at most 1).

    Standardized features make a weight vector's logits grow like sqrt(dim), so a fixed C
    regularizes wide features less than narrow ones; scaling C by 1/dim (as SVC's gamma="scale"
    does for its kernel) keeps it even. Measured best on MNIST's 2048-value code (C ~0.03) and on
    digits' 256-value code (C >= 0.1): see benchmarks/RESULTS.md.
    """
    return min(1.0, 64.0 / max(int(dim), 1))


def linsvm_c(dim: int) -> float:
    """The linear SVM's C for `dim` standardized features: 8 / dim (at most 0.1), by logreg_c's reasoning.

    Picked on validation splits (the last 10,000 train images): C = 0.001 was best on MNIST's
    6,144 values (0.01 and 0.1 lower) and 0.0003-0.001 on CIFAR-10's 12,288 (0.01: -2.8 points,
    0.1: -5); see benchmarks/RESULTS.md.
    """
    return min(0.1, 8.0 / max(int(dim), 1))


class LinearSVM(ClassifierMixin, BaseEstimator):
    """One-vs-rest linear SVM with the squared hinge loss (an L2-SVM), fitted in the primal by L-BFGS.

    It minimizes ``0.5 * ||w_k||^2 + C * sum_i max(0, 1 - y_ik (x_i . w_k + b_k))^2`` per class,
    LinearSVC's default objective except that the intercept is not penalized. LinearSVC's
    liblinear is single-threaded and copies dense features into a sparse format; on 60,000
    images of 6,144 features its dual solver did not finish in 15 minutes. Here every
    iteration is two dense matrix products, in the features' own dtype, on every core (the
    L2-SVM that Coates et al. fitted to their CIFAR-10 features the same way).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-5):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("LinearSVM needs at least 2 classes in y; got 1 class")
        n, d = X.shape
        # +1 for the class, -1 for the rest; two classes need one column
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        if k == 1:
            targets = np.where(codes == 1, 1.0, -1.0).astype(X.dtype)[:, None]
        else:
            targets = -np.ones((n, k), dtype=X.dtype)
            targets[np.arange(n), codes] = 1.0
        # the objective divided by C * n: the same minimum, gradients on a scale tol can judge
        ridge = 1.0 / (2.0 * self.C * n)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[: d * k].reshape(d, k), theta[d * k:]
            margin = np.maximum(0.0, 1.0 - targets * (X @ w.astype(X.dtype) + b.astype(X.dtype)))  # (n, k)
            loss = float(np.sum(margin.astype(np.float64) ** 2)) / n + ridge * float(np.sum(w**2))
            dscore = (-2.0 / n) * targets * margin  # d loss / d score
            grad_w = (X.T @ dscore).astype(np.float64) + 2.0 * ridge * w
            return loss, np.concatenate([grad_w.ravel(), dscore.sum(axis=0, dtype=np.float64)])

        result = minimize(loss_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                          options=dict(maxiter=self.max_iter, gtol=self.tol, ftol=1e-12))
        self.coef_ = result.x[: d * k].reshape(d, k).T.copy()  # (k, d), as scikit-learn's linear models
        self.intercept_ = result.x[d * k:].copy()
        self.n_iter_ = int(result.nit)
        if self.n_iter_ >= self.max_iter:
            warnings.warn(
                f"LinearSVM stopped at max_iter={self.max_iter} before converging (tol={self.tol}); "
                "raise max_iter for the exact optimum", ConvergenceWarning, stacklevel=2,
            )
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        picked = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[picked]


class Whitener(TransformerMixin, BaseEstimator):
    """Regularized PCA whitening: features decorrelated, each principal axis scaled to unit variance.

    ``(x - mean) @ U / sqrt(eigenvalue + eps * mean eigenvalue)``, rescaled so the whitened
    features' variance averages 1 (the scale logreg_c assumes). `eps` keeps the weakest axes,
    mostly noise, from being raised all the way to the signal's scale. A linear classifier's L2
    penalty then weighs every direction by its variance in the data instead of by its units:
    on MNIST's preset features, logistic regression went from 0.9900 to 0.9933 on a validation
    split (eps 0.1; 0.9925-0.9933 for eps 0.03-0.3), while Fashion-MNIST's and CIFAR-10's lost
    0.9 and 2.4 points; see benchmarks/RESULTS.md.
    No rotation back (ZCA): L2-penalized linear models do not see a rotation.
    """

    def __init__(self, eps: float = 0.1, batch_size: int = 4096):
        self.eps = eps
        self.batch_size = batch_size

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=(np.float32, np.float64))
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        n, d = X.shape
        self.mean_ = X.mean(axis=0, dtype=np.float64)
        mean, cov = self.mean_.astype(X.dtype), np.zeros((d, d))
        for start in range(0, n, self.batch_size):  # bounded extra memory, float64 sums
            centered = X[start:start + self.batch_size] - mean
            cov += centered.T @ centered
        eigenvalues, axes = np.linalg.eigh(cov / max(n - 1, 1))
        eigenvalues, axes = np.clip(eigenvalues[::-1], 0.0, None), axes[:, ::-1]  # strongest first
        floor = self.eps * max(float(eigenvalues.mean()), np.finfo(np.float64).tiny)
        variance = eigenvalues / (eigenvalues + floor)  # of each whitened axis
        scale = 1.0 / np.sqrt((eigenvalues + floor) * max(float(variance.mean()), np.finfo(np.float64).tiny))
        self.eigenvalues_ = eigenvalues
        self.projection_ = (axes * scale).astype(X.dtype)  # (d, d): column j is axis j, scaled
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=(np.float32, np.float64), reset=False)
        return (X - self.mean_.astype(X.dtype)) @ self.projection_.astype(X.dtype, copy=False)


NORMALIZATIONS: tuple[str, ...] = ("standard", "whiten")


# name -> classifier for (seed, number of labelled train images, feature dimension, C scale,
# iteration cap or None for the classifier's own)
CLASSIFIERS: dict[str, Callable[[int, int, int, float, int | None], BaseEstimator]] = {
    "logreg": lambda seed, n, dim, c, it: LogisticRegression(C=c * logreg_c(dim), max_iter=it or 300),
    "linsvm": lambda seed, n, dim, c, it: LinearSVM(C=c * linsvm_c(dim), max_iter=it or 1000),
    "rbfsvm": lambda seed, n, dim, c, it: SVC(kernel="rbf", C=10.0 * c),
    "rf": lambda seed, n, dim, c, it: RandomForestClassifier(n_estimators=200, random_state=seed),
    "knn": lambda seed, n, dim, c, it: KNeighborsClassifier(n_neighbors=min(5, n)),
    "mlp": lambda seed, n, dim, c, it: MLPClassifier(
        hidden_layer_sizes=(256,), alpha=1e-3, max_iter=it or 300, random_state=seed
    ),
}
BASELINES: tuple[str, ...] = ("pixels", "pca", "random")
# "flip": the classifiers also see every train image mirrored left to right, with its label
# (features of the mirror image, from the same frozen encoder). "flip-tta" also scores each test
# image as the average of the classifier's scores for it and its mirror image (test-time
# augmentation); the test images themselves are never altered.
AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "flip-tta")
COLUMNS = (
    "features", "classifier", "normalize", "augment", "dim", "labels_per_class", "seeds", "accuracy", "accuracy_std",
    "macro_f1", "fit_seconds",
)


@dataclass
class FeatureSet:
    """Train and test features of one row group, e.g. ``stage2/grid4`` or ``pixels``.

    `standardize`: put a StandardScaler before each classifier (False for features that are
    already on a common scale and must keep their relative variances, like PCA scores).
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    standardize: bool = True
    # the train rows are the images' features, then their mirror images' (same labels, in order)
    mirrored: bool = False
    # the same for the test rows: each test image is scored as the mean of both rows' scores
    test_mirrored: bool = False

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def parse_list(
    value: str | Iterable[str] | None, option: str, choices: Sequence[str], *, allow_none: bool = False
) -> list[str]:
    """Names from "a,b" or a list, checked against `choices`, in the order given ("none": [] if allowed)."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    items = [str(v).strip() for v in items if str(v).strip()]
    if allow_none and items == ["none"]:
        return []
    unknown = [v for v in items if v not in choices]
    if unknown or not (items or allow_none):
        also = " (or none)" if allow_none else ""
        what = f"unknown {', '.join(unknown)}" if unknown else "give at least one"
        raise ConfigError(f"{option}: {what}: choose from {', '.join(choices)}{also}")
    return list(dict.fromkeys(items))


def parse_labels_per_class(value: str | int | Iterable[str | int]) -> list[int | str]:
    """"10,100,all" -> [10, 100, "all"]."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    out: list[int | str] = []
    for v in items:
        v = str(v).strip()
        if not v:
            continue
        if v == "all":
            out.append("all")
            continue
        try:
            k = int(v)
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"labels per class {v!r}: give positive integers or all, e.g. 10,100,all")
        out.append(k)
    if not out:
        raise ConfigError("labels per class: give at least one value, e.g. 10,100,all")
    return list(dict.fromkeys(out))


def check_options(
    classifiers, baselines, labels_per_class, seeds: int, pool, normalize: str = "standard", augment: str = "none",
    c_scale: float = 1.0, max_iter: int | None = None,
) -> tuple[list, list, list]:
    """The probe's options parsed: classifiers, baselines, labels per class (`pool`, `normalize`,
    `augment`, `c_scale` and `max_iter` checked). Needs no data, so a caller can say what is
    wrong before loading any."""
    checked = (
        parse_list(classifiers, "classifiers", list(CLASSIFIERS)),
        parse_list(baselines, "baselines", BASELINES, allow_none=True),
        parse_labels_per_class(labels_per_class),
    )
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    check_normalize(normalize)
    check_fit_options(c_scale, max_iter)
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    resolve_pools(pool)
    return checked


def check_fit_options(c_scale: float, max_iter: int | None) -> None:
    if not (isinstance(c_scale, (int, float)) and math.isfinite(c_scale) and c_scale > 0):
        raise ConfigError(f"C scale must be a positive number, got {c_scale!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ConfigError(f"max iterations must be a positive integer, got {max_iter!r}")


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")


def default_layers(model: nn.Module) -> list[str]:
    """Every stage's output and the bottleneck (see :func:`convae.model.depth_layers`)."""
    from .model import depth_layers

    return depth_layers(model)


class _EncoderUpTo(nn.Module):
    """`model`'s forward pass up to `layers` as a module's forward (for torch's update_bn)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, x: torch.Tensor):
        return self.model.forward_intermediates(x, self.layers)


def calibrate_batchnorm(model: nn.Module, images, layers: Sequence[str], *, max_images: int = 10_000,
                        batch_size: int = 256) -> None:
    """Set the batch-norm statistics of `model`'s encoder, up to `layers`, from `images` (no gradient step).

    An untrained model's running statistics are the identity (mean 0, variance 1), so its
    normalized maps are on whatever scale the random weights give: a strawman next to a trained
    model, and meaningless for sign splits, whose threshold is in standard deviations. Up to
    `max_images` images, evenly spaced (a class-sorted file still gives every class), feed a
    cumulative average (torch's ``update_bn``). A sparse autoencoder (no batch norm) gets its
    patch whitening measured on them instead, as its training does. Leaves `model` in eval mode.
    """
    from torch.optim.swa_utils import update_bn

    from .train import iter_uint8_batches, to_input

    device = next(model.parameters()).device
    indices = np.unique(np.linspace(0, len(images) - 1, min(len(images), max_images)).astype(np.int64))
    if hasattr(model, "fit_whitening"):
        from .train import fit_patch_whitening

        fit_patch_whitening(model, images, indices, device, batch_size)
    else:
        batches = (to_input(batch, device, False) for batch in iter_uint8_batches(images, indices, batch_size))
        update_bn(batches, _EncoderUpTo(model, layers))
    model.eval()


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
    on_fit: Callable[[], None] | None = None,
) -> Iterator[dict]:
    """One row per (feature set, labels per class, classifier), averaged over the label subsets.

    `normalize`: "standard" puts a StandardScaler before each classifier. "whiten" standardizes
    and whitens (:class:`Whitener`) a feature set, fitted once on all its train features
    (unsupervised, as the autoencoder; its seconds count in each whitened row's fit_seconds),
    for the rows fitted on all labels, when there are at least as many as the set has features.
    Label subsets stay standardized: a whitened L2 penalty lets few labels be fitted along
    noise axes (MNIST's 6,144 values, 10 labels a class: 0.86 standardized, 0.20 whitened; PCA
    of the pixels, 331 values, 100 a class: 0.86 and 0.80). Each row's `normalize` says which
    it got. A :attr:`FeatureSet.mirrored` set fits its classifiers on each chosen train image
    and its mirror image (`augment` "flip" in its rows); a :attr:`FeatureSet.test_mirrored` set
    scores each test image with its mirror image too (:func:`predict_with_mirrors`, "flip-tta").
    `c_scale` multiplies the C of logreg, linsvm and rbfsvm (above 1: less regularization);
    `max_iter` caps the iterations of logreg, linsvm and mlp (None: 300, 1000 and 300).
    """
    check_fit_options(c_scale, max_iter)
    subsets = {k: label_subsets(y_train, k, seeds) for k in labels_per_class}
    for fs in feature_sets:
        n_images = len(y_train)
        if fs.mirrored and len(fs.train) != 2 * n_images:
            raise ConfigError(f"{fs.name}: mirrored train features need 2 x {n_images} rows, got {len(fs.train)}")
        if fs.test_mirrored and len(fs.test) != 2 * len(y_test):
            raise ConfigError(f"{fs.name}: mirrored test features need 2 x {len(y_test)} rows, got {len(fs.test)}")
        y_fit = np.concatenate([y_train, y_train]) if fs.mirrored else y_train
        white: tuple[np.ndarray, np.ndarray] | None = None
        prep_seconds = 0.0
        for k in labels_per_class:
            whiten = normalize == "whiten" and k == "all" and len(y_train) >= fs.dim
            if whiten and white is None:
                t0 = time.perf_counter()
                whitener = make_pipeline(*([StandardScaler()] if fs.standardize else []), Whitener()).fit(fs.train)
                white = whitener.transform(fs.train), whitener.transform(fs.test)
                prep_seconds = time.perf_counter() - t0
            train_x, test_x = white if whiten else (fs.train, fs.test)
            for name in classifiers:
                accs, f1s, secs = [], [], []
                for seed, idx in enumerate(subsets[k]):
                    if k == "all":
                        rows = slice(None)  # a view, not a copy
                    else:
                        rows = np.concatenate([idx, idx + n_images]) if fs.mirrored else idx
                    scaler = [StandardScaler()] if fs.standardize and not whiten else []
                    clf = make_pipeline(*scaler, CLASSIFIERS[name](seed, len(idx), fs.dim, c_scale, max_iter))
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        # an unconverged probe is still a fair, if slightly low, measurement
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        clf.fit(train_x[rows], y_fit[rows])
                    secs.append(time.perf_counter() - t0 + (prep_seconds if whiten else 0.0))
                    pred = predict_with_mirrors(clf, test_x) if fs.test_mirrored else clf.predict(test_x)
                    accs.append(accuracy_score(y_test, pred))
                    f1s.append(f1_score(y_test, pred, average="macro"))
                    if on_fit is not None:
                        on_fit()
                yield dict(
                    features=fs.name,
                    classifier=name,
                    normalize="whiten" if whiten else "standard",
                    augment="flip-tta" if fs.test_mirrored else "flip" if fs.mirrored else "none",
                    dim=fs.dim,
                    labels_per_class=k,
                    seeds=len(accs),
                    accuracy=float(np.mean(accs)),
                    accuracy_std=float(np.std(accs)),
                    macro_f1=float(np.mean(f1s)),
                    fit_seconds=float(np.mean(secs)),
                )


def predict_with_mirrors(clf, x: np.ndarray) -> np.ndarray:
    """Labels of the images whose features are x's first half, their mirror images' the second:
    the class with the highest mean score over both (decision_function, else predict_proba)."""
    n = len(x) // 2
    scores = clf.decision_function if hasattr(clf, "decision_function") else clf.predict_proba
    mean = (scores(x[:n]) + scores(x[n:])) / 2
    if mean.ndim == 1:  # binary decision_function: the second class's margin
        return clf.classes_[(mean > 0).astype(int)]
    return clf.classes_[mean.argmax(1)]


def _model_of(source) -> tuple[nn.Module, str]:
    """(model, short name) of a run directory, a fitted ConvAutoencoder or a model."""
    from .estimator import ConvAutoencoder
    from .run import load_model

    if isinstance(source, ConvAutoencoder):
        from sklearn.utils.validation import check_is_fitted

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
        return [(name,) for name in default_layers(model)]
    items = split_names(layers, "layers")
    if items == ["all"]:
        return [(name,) for name in model.layer_names]
    groups = [tuple(resolve_layers(model, [n.strip() for n in item.split("+")])) for item in items]
    return list(dict.fromkeys(groups))


def _group_blocks(extractor: FeatureExtractor, groups: Sequence[tuple[str, ...]]) -> list[tuple[str, list]]:
    """(name, blocks) of each feature set: every group at every pooling, "a+b/pool" for a group."""
    out = []
    for group in groups:
        for pool in extractor.pools:
            blocks = [b for b in extractor.blocks if b.layer in group and b.pool == pool]
            out.append(("+".join(b.layer for b in blocks) + f"/{pool}", blocks))
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


def _features(extractor: FeatureExtractor, images, mirror: bool, progress: bool) -> np.ndarray:
    """Features of the images, then (with `mirror`) of their mirror images, in one array."""
    if not mirror:
        return extractor.transform(images, progress=progress)
    n = len(images)
    out = np.empty((2 * n, extractor.dim), dtype=np.float32)  # filled batch by batch: no second copy
    for offset, source in ((0, images), (n, mirrored(images))):
        with _progress_bar(progress, n, 0) as bar:
            for row, feats in extractor.batches(source):
                out[offset + row : offset + row + len(feats)] = feats
                bar.update(len(feats))
    return out


def _layer_sets(
    extractor: FeatureExtractor, groups: Sequence[tuple[str, ...]], train, test, prefix: str, progress: bool,
    mirror: bool = False, test_mirror: bool = False,
) -> list[FeatureSet]:
    xtr = _features(extractor, train, mirror, progress)
    xte = _features(extractor, test, test_mirror, progress)
    sets = []
    for name, blocks in _group_blocks(extractor, groups):
        if all(a.stop == b.start for a, b in zip(blocks, blocks[1:])):
            columns = slice(blocks[0].start, blocks[-1].stop)  # a view: wide sets take GBs to copy
        else:
            columns = np.concatenate([np.arange(b.start, b.stop) for b in blocks])
        sets.append(
            FeatureSet(prefix + name, xtr[:, columns], xte[:, columns], mirrored=mirror, test_mirrored=test_mirror)
        )
    return sets


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
    *,
    layers: str | Iterable[str] | None = None,
    pool: str | Iterable[str] = "grid4",
    classifiers: str | Iterable[str] = ("logreg",),
    baselines: str | Iterable[str] = BASELINES,
    compare: Sequence = (),
    labels_per_class: str | Iterable[int | str] = ("all",),
    seeds: int = 3,
    normalize: str = "standard",
    augment: str = "none",
    c_scale: float = 1.0,
    max_iter: int | None = None,
    pca_dims: Sequence[int] | None = None,
    random_seed: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Probe the features of `run` (a run directory, a fitted ConvAutoencoder or a model).

    `train` and `test` are :class:`convae.data.ImageData` with labels, or (images, labels)
    pairs, of the model's image shape. `layers` defaults to every stage and the bottleneck;
    "stage2+bottleneck" probes those layers' features concatenated (see :func:`layer_groups`).
    `compare` takes other runs (e.g. the dense autoencoder), probed at the requested layers
    they have, or at their own default layers. `pca_dims` sets the PCA baseline's dimensions,
    e.g. ``[code_size(config.model)]`` for the bottleneck's; by default one PCA per distinct
    dimension of the compared feature sets. Sizes not below the pixel count are left out, and
    when none is left the PCA keeps 95% of the pixel variance. `normalize`: "standard" or
    "whiten" (see :func:`evaluate_features`), the same for every row. `augment`: "flip" fits
    every classifier on the train images and their mirror images (baselines alike; twice the
    train features in memory), "none" on the images alone; "flip-tta" fits as "flip" and scores
    each test image by the mean of the classifier's scores for it and its mirror image.
    `c_scale` and `max_iter`: see :func:`evaluate_features`.
    Returns one dict per row (keys ``COLUMNS``), grouped by labels per class.
    """
    classifiers, baselines, lpc = check_options(
        classifiers, baselines, labels_per_class, seeds, pool, normalize, augment, c_scale, max_iter
    )
    mirror, test_mirror = augment in ("flip", "flip-tta"), augment == "flip-tta"
    train_images, y_train = _images_labels(train, "train")
    test_images, y_test = _images_labels(test, "test")

    model, _ = _model_of(run)
    groups = layer_groups(model, layers)
    # every layer of every group, once (the extractor puts them in network order)
    extractor = FeatureExtractor(model, {n for g in groups for n in g}, pool, device=device, batch_size=batch_size)
    for name, images in (("train", train_images), ("test", test_images)):
        shape = tuple(int(s) for s in images.shape[1:])
        if shape != extractor.image_shape:
            raise ConfigError(
                f"{name} images are {'x'.join(map(str, shape))} (HxWxC) but the model takes "
                f"{'x'.join(map(str, extractor.image_shape))}; load them at that size (--image-size, --channels)"
            )

    def sources() -> Iterator[list[FeatureSet]]:
        # One source at a time, so only one source's features are held in memory.
        yield _layer_sets(extractor, groups, train_images, test_images, "", progress, mirror, test_mirror)
        if "random" in baselines:
            with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
                torch.manual_seed(random_seed)
                untrained = type(model)(model.config)  # the same architecture, default initialisation
            random_ex = FeatureExtractor(
                untrained, extractor.layers, extractor.pools, device=device, batch_size=batch_size
            )
            calibrate_batchnorm(untrained, train_images, extractor.layers, batch_size=random_ex.batch_size)
            yield _layer_sets(random_ex, groups, train_images, test_images, "random/", progress, mirror, test_mirror)
        used = {"random", "pixels", "pca"}
        for i, other in enumerate(compare, start=1):
            other_model, name = _model_of(other)
            name = name if name not in used else f"compare{i}"
            used.add(name)
            theirs = [g for g in groups if set(g) <= set(feature_layer_names(other_model))] or layer_groups(other_model, None)
            ex = FeatureExtractor(other_model, {n for g in theirs for n in g}, extractor.pools, device=device,
                                  batch_size=batch_size)
            yield _layer_sets(ex, theirs, train_images, test_images, f"{name}/", progress, mirror, test_mirror)
        if "pixels" in baselines or "pca" in baselines:
            xtr, xte = _pixels(train_images, mirror), _pixels(test_images, test_mirror)
            if "pixels" in baselines:
                yield [FeatureSet("pixels", xtr, xte, mirrored=mirror, test_mirrored=test_mirror)]
            if "pca" in baselines:
                dims = pca_dims if pca_dims is not None else [
                    sum(b.dim for b in blocks) for _, blocks in _group_blocks(extractor, groups)
                ]
                for d in _pca_dims(dims, xtr.shape):
                    # The standardized pixels on their first d principal axes. Standardizing the
                    # scores again would whiten them: noise axes blown up to the signal's scale.
                    pca = make_pipeline(StandardScaler(), PCA(n_components=d, random_state=0)).fit(xtr)
                    yield [FeatureSet("pca", pca.transform(xtr), pca.transform(xte), standardize=False, mirrored=mirror,
                                      test_mirrored=test_mirror)]

    fits_per_set = len(classifiers) * sum(len(label_subsets(y_train, k, seeds)) for k in lpc)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="fit", dynamic_ncols=True)
    rows: list[dict] = []
    try:
        for sets in sources():
            if bar is not None:
                bar.total += fits_per_set * len(sets)
                bar.refresh()
            rows += evaluate_features(
                sets, y_train, y_test, classifiers=classifiers, labels_per_class=lpc, seeds=seeds,
                normalize=normalize, c_scale=c_scale, max_iter=max_iter,
                on_fit=(lambda: bar.update(1)) if bar is not None else None,
            )
    finally:
        if bar is not None:
            bar.close()
    order = {k: i for i, k in enumerate(lpc)}
    return sorted(rows, key=lambda r: order[r["labels_per_class"]])  # stable: sources keep their order


def probe_feature_files(
    train_path,
    test_path,
    *,
    classifiers: str | Iterable[str] = ("logreg",),
    labels_per_class: str | Iterable[int | str] = ("all",),
    seeds: int = 3,
    normalize: str = "standard",
    c_scale: float = 1.0,
    max_iter: int | None = None,
) -> list[dict]:
    """Probe features `convae extract` already wrote (sharded or not), with their labels."""
    from .features import load_features

    classifiers = parse_list(classifiers, "classifiers", list(CLASSIFIERS))
    lpc = parse_labels_per_class(labels_per_class)
    check_normalize(normalize)
    check_fit_options(c_scale, max_iter)
    (xtr, ytr), (xte, yte) = load_features(train_path), load_features(test_path)
    for path, x, y in ((train_path, xtr, ytr), (test_path, xte, yte)):
        if y is None:
            raise ConfigError(f"{path}: no labels beside these features; extract labelled data to probe it")
    if xtr.shape[1] != xte.shape[1]:
        raise ConfigError(f"{train_path} has {xtr.shape[1]} features per image but {test_path} has {xte.shape[1]}")
    name = Path(train_path).stem.split(".rank")[0]
    sets = [FeatureSet(name, np.asarray(xtr, dtype=np.float32), np.asarray(xte, dtype=np.float32))]
    return list(evaluate_features(
        sets, ytr, yte, classifiers=classifiers, labels_per_class=lpc, seeds=seeds, normalize=normalize,
        c_scale=c_scale, max_iter=max_iter,
    ))


def markdown_table(rows: list[dict]) -> str:
    """The rows as a GitHub Markdown table."""
    head = ["features", "classifier", "normalize", "augment", "dim", "labels/class", "accuracy", "± (seeds)", "macro-F1",
            "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6) + "|"]
    for r in rows:
        spread = f"{r['accuracy_std']:.4f} ({r['seeds']})" if r["seeds"] > 1 else "-"
        cells = [
            r["features"], r["classifier"], r.get("normalize", "standard"), r.get("augment", "none"), str(r["dim"]),
            str(r["labels_per_class"]),
            f"{r['accuracy']:.4f}", spread, f"{r['macro_f1']:.4f}", f"{r['fit_seconds']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], path: str | Path, **meta) -> tuple[Path, Path]:
    """Write ``{"rows": [...]}`` (plus `meta`) as JSON to `path`, and the table as Markdown beside it."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ConfigError(f"output {path}: name it .json (a Markdown copy is written beside it as .md)")
    md = path.with_suffix(".md")
    document = {"convae_version": __version__, **meta, "rows": rows}
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    title = ", ".join(f"{k} `{v}`" for k, v in meta.items() if v)
    atomic_write_text(md, (f"# convae probe\n\n{title}\n\n" if title else "") + markdown_table(rows))
    return path, md
