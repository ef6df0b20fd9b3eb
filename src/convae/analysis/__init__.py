"""What to do with a trained model besides probing it: find the images it finds strange, and the
images most like a given one.

    options.py     ScoreOptions and the score and metric names (torch-free, for the CLI)
    knn.py         exact k nearest neighbours in chunks (memory bounded for millions of rows)
    score.py       per-image anomaly scores: reconstruction MSE, 1 - SSIM, k-NN distance; thresholds
    neighbors.py   similar images by cosine similarity of any layer's features; precision@k
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

if TYPE_CHECKING:
    from .knn import Neighbours, knn_distance, nearest
    from .neighbors import (
        NeighborResult,
        PixelFeatures,
        find_neighbors,
        neighbors_grid,
        precision_at_k,
        untrained_extractor,
        write_neighbors,
    )
    from .options import METRICS, NEIGHBOR_BASELINES, SCORES, ScoreOptions, middle_layer
    from .score import ScoreResult, feature_matrix, reconstruction_errors, score_images, take_images, write_scores

__all__ = [
    "METRICS",
    "NEIGHBOR_BASELINES",
    "SCORES",
    "NeighborResult",
    "PixelFeatures",
    "Neighbours",
    "ScoreOptions",
    "ScoreResult",
    "feature_matrix",
    "find_neighbors",
    "knn_distance",
    "middle_layer",
    "nearest",
    "neighbors_grid",
    "precision_at_k",
    "reconstruction_errors",
    "score_images",
    "take_images",
    "untrained_extractor",
    "write_neighbors",
    "write_scores",
]

_EXPORTS = {
    "Neighbours": ".knn",
    "knn_distance": ".knn",
    "nearest": ".knn",
    "NeighborResult": ".neighbors",
    "find_neighbors": ".neighbors",
    "neighbors_grid": ".neighbors",
    "PixelFeatures": ".neighbors",
    "untrained_extractor": ".neighbors",
    "precision_at_k": ".neighbors",
    "write_neighbors": ".neighbors",
    "METRICS": ".options",
    "NEIGHBOR_BASELINES": ".options",
    "SCORES": ".options",
    "ScoreOptions": ".options",
    "middle_layer": ".options",
    "ScoreResult": ".score",
    "feature_matrix": ".score",
    "reconstruction_errors": ".score",
    "score_images": ".score",
    "take_images": ".score",
    "write_scores": ".score",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS, globals())
