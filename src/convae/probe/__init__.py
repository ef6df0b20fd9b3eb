"""How good the features are, layer by layer: simple classifiers on frozen features.

    options.py       ProbeOptions: what to probe, checked before any data is loaded (torch-free)
    classifiers.py   the classifiers by name; LinearSVM and Whitener for wide features
    evaluate.py      fit and score one feature set: rows averaged over label subsets
    driver.py        run_probe: the run's features and its baselines, one source at a time;
                     probe_feature_sets / evaluate_feature_sets: the same in two steps;
                     run_probe_on: one labelled dataset, held out or in K folds (split.py)
    split.py         stratified hold-out and K-fold splits; fold rows averaged
    output.py        results.json and its Markdown copy

For each feature set (an encoder layer under a pooling) and classifier, fit
``StandardScaler -> classifier`` on the train features (with ``normalize="whiten"``, the rows
fitted on all labels get them whitened by :class:`Whitener` as well, baselines alike) and report
test accuracy and macro-F1, beside baselines given the same classifier: raw pixels, PCA of the
pixels with the same dimension as the compared features, the same architecture with random
untrained weights (what training adds) and other runs. With few labels per class, the label
subsets are drawn per seed (the same subsets for every feature set) and the scores averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

if TYPE_CHECKING:
    from .classifiers import CLASSIFIERS, LinearSVM, Whitener, linsvm_c, logreg_c
    from .driver import (
        CALIBRATION_IMAGES,
        MirroredImages,
        calibrate,
        check_layers,
        evaluate_feature_sets,
        layer_groups,
        mirrored,
        probe_feature_files,
        probe_feature_sets,
        run_probe,
        run_probe_on,
    )
    from .evaluate import COLUMNS, FeatureSet, evaluate_features, label_subsets, predict_with_mirrors
    from .options import (
        AUGMENTATIONS,
        BASELINES,
        CLASSIFIER_NAMES,
        NORMALIZATIONS,
        ProbeOptions,
        parse_labels_per_class,
        parse_list,
    )
    from .output import markdown_table, write_results
    from .split import aggregate_folds, probe_splits

__all__ = [
    "AUGMENTATIONS",
    "BASELINES",
    "CALIBRATION_IMAGES",
    "CLASSIFIERS",
    "CLASSIFIER_NAMES",
    "COLUMNS",
    "FeatureSet",
    "LinearSVM",
    "MirroredImages",
    "NORMALIZATIONS",
    "ProbeOptions",
    "Whitener",
    "aggregate_folds",
    "calibrate",
    "check_layers",
    "evaluate_feature_sets",
    "evaluate_features",
    "label_subsets",
    "layer_groups",
    "linsvm_c",
    "logreg_c",
    "markdown_table",
    "mirrored",
    "parse_labels_per_class",
    "parse_list",
    "predict_with_mirrors",
    "probe_feature_files",
    "probe_feature_sets",
    "probe_splits",
    "run_probe",
    "run_probe_on",
    "write_results",
]

_EXPORTS = {
    "CLASSIFIERS": ".classifiers",
    "LinearSVM": ".classifiers",
    "Whitener": ".classifiers",
    "linsvm_c": ".classifiers",
    "logreg_c": ".classifiers",
    "CALIBRATION_IMAGES": ".driver",
    "MirroredImages": ".driver",
    "calibrate": ".driver",
    "check_layers": ".driver",
    "evaluate_feature_sets": ".driver",
    "layer_groups": ".driver",
    "mirrored": ".driver",
    "probe_feature_files": ".driver",
    "probe_feature_sets": ".driver",
    "run_probe": ".driver",
    "run_probe_on": ".driver",
    "aggregate_folds": ".split",
    "probe_splits": ".split",
    "COLUMNS": ".evaluate",
    "FeatureSet": ".evaluate",
    "evaluate_features": ".evaluate",
    "label_subsets": ".evaluate",
    "predict_with_mirrors": ".evaluate",
    "AUGMENTATIONS": ".options",
    "BASELINES": ".options",
    "CLASSIFIER_NAMES": ".options",
    "NORMALIZATIONS": ".options",
    "ProbeOptions": ".options",
    "parse_labels_per_class": ".options",
    "parse_list": ".options",
    "markdown_table": ".output",
    "write_results": ".output",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS, globals())
