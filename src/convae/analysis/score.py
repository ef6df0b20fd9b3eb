"""Per-image anomaly scores: how badly the model reconstructs an image, and how far its features
are from the training images'.

Three scores, larger is stranger: ``mse`` (reconstruction MSE), ``ssim_error`` (1 - SSIM of the
reconstruction) and ``knn`` (mean distance to the k nearest training images in feature space,
cosine or euclidean). A threshold is a quantile of the training images' own scores: their
reconstruction errors and their k-NN distances with each image itself left out.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_open
from ..data.index import SourceIndex
from ..errors import ConfigError
from ..features import FeatureExtractor, auto_batch_size
from ..metrics import mse_per_image, ssim_per_image
from ..progress import progress_bar
from ..tensors import allow_bf16, device_of, evenly_spaced, iter_uint8_batches, to_float_nchw
from .knn import knn_distance, nearest
from .options import SCORES, ScoreOptions, middle_layer


@torch.inference_mode()
def reconstruction_errors(
    model, images, *, batch_size: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(MSE, 1 - SSIM) of each image's reconstruction, float64 arrays of len(images)."""
    model.eval()
    device = device_of(model)
    batch_size = batch_size or auto_batch_size(model, device)
    mse, ssim = np.empty(len(images)), np.empty(len(images))
    row = 0
    with progress_bar(progress, len(images), desc="reconstructing") as bar:
        for batch in iter_uint8_batches(images, np.arange(len(images)), batch_size):
            x = to_float_nchw(batch, device)
            recon = model(x).float()
            n = len(x)
            mse[row : row + n] = mse_per_image(recon, x).double().cpu().numpy()
            ssim[row : row + n] = 1.0 - ssim_per_image(recon, x).double().cpu().numpy()
            row += n
            bar.update(n)
    return mse, ssim


def feature_matrix(
    extractor: FeatureExtractor, images, work_dir: str | os.PathLike | None = None, *, name="features", progress=False
):
    """Features of `images`: in memory, or (with `work_dir`) in a .npy file there, returned as a
    read-only memmap, so a large index never sits in this process's memory."""
    if work_dir is None:
        return extractor.transform(images, progress=progress)
    path = Path(work_dir) / f"{name}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(images), extractor.dim))
    with progress_bar(progress, len(images), desc=name) as bar:
        for row, feats in extractor.batches(images):
            out[row : row + len(feats)] = feats
            bar.update(len(feats))
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


@dataclass
class ScoreResult:
    """Scores of every image (`scores`: name -> (N,) array), their sources, and what the
    thresholds were measured on."""

    scores: dict[str, np.ndarray]
    index: SourceIndex
    options: ScoreOptions
    reference_scores: dict[str, np.ndarray] = field(default_factory=dict)  # the training images' own
    thresholds: dict[str, float] = field(default_factory=dict)

    def order(self) -> np.ndarray:
        """Rows, worst first by the `by` score (ties: in data order)."""
        return np.argsort(-self.scores[self.options.by], kind="stable")

    def flagged(self) -> np.ndarray | None:
        """Whether each image's `by` score is above its threshold (None without one)."""
        t = self.thresholds.get(self.options.by)
        return None if t is None else self.scores[self.options.by] > t


def score_images(model, data, reference=None, options: ScoreOptions | None = None, *, work_dir=None,
                 batch_size: int | None = None, progress: bool = False, **settings) -> ScoreResult:  # fmt: skip
    """Anomaly scores of every image of `data` under `model` (a net, e.g. from :func:`convae.load_model`).

    Parameters
    ----------
    data : ImageData
        Images of the model's shape.
    reference : ImageData or array, optional
        The training images: the k-NN distance is measured to them, and thresholds are quantiles
        of their own scores. Without it only the reconstruction scores are computed.
    options : ScoreOptions, optional
        Or its fields as keywords: layers, pool, k, metric, by, threshold_quantile,
        calibration_images, precision.
    work_dir : path, optional
        Where the reference features are kept on disk while searching (default: in memory).

    Returns
    -------
    ScoreResult
        ``order()`` gives the rows worst first; ``flagged()`` the images above the threshold.
    """
    options = ScoreOptions(**settings) if options is None else options
    if reference is None and options.by == "knn":
        raise ConfigError("the knn score needs the training images (--train); or sort --by mse or ssim_error")
    with allow_bf16(options.precision == "auto"):  # the reconstructions' products too
        return _scored(model, data, reference, options, work_dir, batch_size, progress)


def _scored(model, data, reference, options: ScoreOptions, work_dir, batch_size, progress) -> ScoreResult:
    images = getattr(data, "images", data)
    mse, ssim = reconstruction_errors(model, images, batch_size=batch_size, progress=progress)
    scores = {"mse": mse, "ssim_error": ssim}
    index = data.source_index() if hasattr(data, "source_index") else SourceIndex.of_rows(len(images))
    result = ScoreResult(scores, index, options)
    if reference is None:
        if options.threshold_quantile is not None:
            raise ConfigError("--threshold-quantile needs the training images (--train) to measure it on")
        return result
    ref_images = getattr(reference, "images", reference)
    layers = options.layers or middle_layer(model)
    extractor = FeatureExtractor(
        model,
        layers,
        options.pool,
        device=device_of(model),
        batch_size=batch_size,
        precision=options.precision,
        compile=options.compile,
    )
    ref = feature_matrix(extractor, ref_images, work_dir, name="reference", progress=progress)
    query = extractor.transform(images, progress=progress)
    scores["knn"] = knn_distance(
        nearest(query, ref, options.k, metric=options.metric, progress=progress), options.metric
    )
    result.reference_scores = _own_scores(model, ref_images, ref, options, batch_size, progress)
    if options.threshold_quantile is not None:
        q = options.threshold_quantile
        result.thresholds = {name: float(np.quantile(v, q)) for name, v in result.reference_scores.items()}
    return result


def _own_scores(model, images, ref, options: ScoreOptions, batch_size, progress) -> dict[str, np.ndarray]:
    """The training images' own scores, on up to `calibration_images` of them (evenly spaced):
    reconstruction errors, and k-NN distances to the others (each image itself left out)."""
    rows = evenly_spaced(np.arange(len(images)), options.calibration_images)
    sample = take_images(images, rows)
    mse, ssim = reconstruction_errors(model, sample, batch_size=batch_size, progress=progress)
    found = nearest(np.asarray(ref[rows]), ref, options.k, metric=options.metric, exclude=rows, progress=progress)
    return {"mse": mse, "ssim_error": ssim, "knn": knn_distance(found, options.metric)}


def take_images(images, rows: np.ndarray):
    """images[rows] without decoding a lazily read folder (LazyImages.subset), else as an array."""
    if hasattr(images, "subset"):
        return images.subset(rows)
    return images[rows] if isinstance(images, np.ndarray) else np.asarray(images[rows])


def write_scores(path: str | os.PathLike, result: ScoreResult) -> Path:
    """The scores as CSV, worst first: rank, index, path, label, class, each score, and `outlier`
    when there is a threshold."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--output {path}: name it .csv")
    cols = result.index.columns()
    names = [s for s in SCORES if s in result.scores]
    flags = result.flagged()
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["rank", "index", "path", "label", "class", *names, *(["outlier"] if flags is not None else [])]
        )
        for rank, i in enumerate(result.order(), start=1):
            meta = ["" if cols[c][i] is None else cols[c][i] for c in ("index", "path", "label", "class")]
            values = [f"{result.scores[s][i]:.6g}" for s in names]
            writer.writerow([rank, *meta, *values, *([bool(flags[i])] if flags is not None else [])])
    return path
