"""One labelled dataset is enough: a stratified hold-out or stratified K folds of it, seeded, and
the rows of K folds averaged (mean and standard deviation over the folds in every row)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from ..errors import ConfigError
from .evaluate import mean_iterations
from .options import ProbeOptions, check_split


def probe_splits(labels: np.ndarray, options: ProbeOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) of each split `options` asks for: one stratified hold-out of
    `test_fraction`, or `cv` stratified folds; shuffled with `split_seed`, so a rerun splits alike."""
    check_split(options.test_fraction, options.cv)
    labels = np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if options.cv is not None:
        if counts.min() < options.cv:
            raise ConfigError(
                f"--cv {options.cv}: the smallest class has {counts.min()} images; every class needs one per fold"
            )
        folds = StratifiedKFold(options.cv, shuffle=True, random_state=options.split_seed)
        return [(np.sort(tr), np.sort(te)) for tr, te in folds.split(np.zeros(len(labels)), labels)]
    if options.test_fraction is None:
        raise ConfigError("give --test-fraction or --cv to split one dataset")
    try:
        split = StratifiedShuffleSplit(1, test_size=options.test_fraction, random_state=options.split_seed)
        train, test = next(split.split(np.zeros(len(labels)), labels))
    except ValueError as e:  # a class too small to be in both parts, a fraction that leaves no room
        raise ConfigError(f"--test-fraction {options.test_fraction}: {e}") from None
    return [(np.sort(train), np.sort(test))]


def aggregate_folds(folds: Sequence[list[dict]]) -> list[dict]:
    """One row per row of the first fold: each score's mean over the folds, with its standard
    deviation (`accuracy_std`, `macro_f1_std`) and `folds`; fit seconds and iterations are averaged."""
    out = []
    for i, first in enumerate(folds[0]):
        rows = [f[i] for f in folds]
        key = [(r["features"], r["classifier"], r["labels_per_class"]) for r in rows]
        if len(set(key)) != 1:
            raise ValueError(f"fold rows disagree: {key}")
        acc, f1 = np.array([r["accuracy"] for r in rows]), np.array([r["macro_f1"] for r in rows])
        out.append(
            {
                **first,
                "accuracy": float(acc.mean()),
                "accuracy_std": float(acc.std()),
                "macro_f1": float(f1.mean()),
                "macro_f1_std": float(f1.std()),
                "fit_seconds": float(np.mean([r["fit_seconds"] for r in rows])),
                "iterations": mean_iterations([r.get("iterations") for r in rows]),
                "folds": len(rows),
            }
        )
    return out
