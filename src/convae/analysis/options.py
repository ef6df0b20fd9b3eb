"""Options of `convae score` and `convae neighbors`, checked before any data is loaded (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..features.plan import check_compile, check_precision, resolve_pools

#: Per-image scores `convae score` writes: reconstruction MSE, 1 - SSIM, mean distance to the
#: k nearest training images in feature space.
SCORES: tuple[str, ...] = ("mse", "ssim_error", "knn")
METRICS: tuple[str, ...] = ("cosine", "euclidean")
#: Baselines of `convae neighbors`' precision@k.
NEIGHBOR_BASELINES: tuple[str, ...] = ("pixels", "random")


def middle_layer(model) -> str:
    """The default layer of k-NN features: the middle one of the net's depths (``stage2`` of the
    default three-stage ConvAE), the best on every one-class and retrieval validation measured
    (benchmarks/RESULTS.md)."""
    depths = model.hierarchy_layers()
    return depths[(len(depths) - 1) // 2]


def check_k(k: int, option: str = "--k") -> None:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"{option} must be a positive integer, got {k!r}")


@dataclass(frozen=True)
class ScoreOptions:
    """How `convae score` scores images.

    `layers`/`pool`: the features the k-NN distance is measured in (layers None: the middle
    depth, :func:`middle_layer`); `k` neighbours; `metric`
    cosine (1 - cosine similarity) or euclidean; `by`: the score rows are sorted by (worst
    first) and flagged on; `threshold_quantile`: flag images whose `by` score is above this
    quantile of the training images' own scores (None: no flags); `calibration_images`: how
    many training images (evenly spaced) give those own scores (their k-NN distances leave
    each image itself out); `precision` "float32" keeps every product of the model fp32 (the
    same scores on every machine), "auto" lets the hierarchical models use bf16 where native;
    `compile`: whether the feature extraction runs through ``torch.compile`` ("auto": for 10,000
    images or more, as :class:`convae.features.FeatureExtractor` decides; "always"; "never").
    """

    layers: str | None = None
    pool: str = "grid4"
    k: int = 5
    metric: str = "cosine"
    by: str = "knn"
    threshold_quantile: float | None = None
    calibration_images: int = 10_000
    precision: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check_k(self.k)
        check_precision(self.precision)
        check_compile(self.compile)
        if self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric}: choose from {', '.join(METRICS)}")
        if self.by not in SCORES:
            raise ConfigError(f"--by {self.by}: choose from {', '.join(SCORES)}")
        q = self.threshold_quantile
        if q is not None and not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q < 1):
            raise ConfigError(f"--threshold-quantile must be between 0 and 1 (e.g. 0.99), got {q!r}")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images must be at least 1, got {self.calibration_images}")
        resolve_pools(self.pool)
