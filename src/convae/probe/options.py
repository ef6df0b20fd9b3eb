"""The probe's options: one typed record, checked before any data is loaded (torch-free).

:class:`ProbeOptions` is what ``convae probe`` parses its options into and what
:func:`convae.probe.run_probe` runs; :meth:`ProbeOptions.with_preset` is the one place a
preset's recommended probe fills the options a user did not give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ConfigError
from ..features.plan import check_compile, check_precision, resolve_pools
from ..limits import PROBE_SEEDS_MAX, check_seed
from ..presets import get_preset

#: Classifier names (convae.probe.classifiers.CLASSIFIERS builds them).
CLASSIFIER_NAMES: tuple[str, ...] = ("logreg", "linsvm", "rbfsvm", "rf", "knn", "mlp")
BASELINES: tuple[str, ...] = ("pixels", "pca", "random")
NORMALIZATIONS: tuple[str, ...] = ("standard", "whiten", "whiten-layers", "whiten-blocks")
# "flip": the classifiers also see every train image mirrored left to right, with its label
# (features of the mirror image, from the same frozen encoder). "flip-tta" also scores each test
# image as the average of the classifier's scores for it and its mirror image (test-time
# augmentation); the test images themselves are never altered.
AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "flip-tta")
FEATURE_DTYPES: tuple[str, ...] = ("float32", "float16", "uint8")
# normalize="whiten-blocks": the most columns a block whitened on its own, unless set. Each block
# keeps a float32 factor of its width squared for the whole fit: what the whitened probe's memory
# peaks on (the mnist preset's 12,800-column stage 3 whole: 655 MB; benchmarks/RESULTS.md)
WHITEN_BLOCK_COLUMNS = 4096
#: Options a preset's probe may set.
PRESET_FIELDS: tuple[str, ...] = (
    "layers", "pool", "normalize", "whiten_block_columns", "augment", "c_scale", "max_iter", "precondition", "dtype",
)  # fmt: skip


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
    """ "10,100,all" -> [10, 100, "all"]."""
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


def check_fit_options(c_scale: float, max_iter: int | None) -> None:
    if not (isinstance(c_scale, (int, float)) and math.isfinite(c_scale) and c_scale > 0):
        raise ConfigError(f"C scale must be a positive number, got {c_scale!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ConfigError(f"max iterations must be a positive integer, got {max_iter!r}")


def check_split(test_fraction: float | None, cv: int | None) -> None:
    """--test-fraction in (0, 1) or --cv of at least 2 folds, not both."""
    if test_fraction is not None and cv is not None:
        raise ConfigError("--test-fraction and --cv: give one (a hold-out or K folds)")
    if test_fraction is not None and not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ConfigError(f"--test-fraction must be between 0 and 1 (e.g. 0.2), got {test_fraction!r}")
    if cv is not None and (not isinstance(cv, int) or cv < 2):
        raise ConfigError(f"--cv must be at least 2 folds, got {cv!r}")


def check_whiten_block_columns(columns: int) -> None:
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise ConfigError(f"whiten block columns must be a positive integer, got {columns!r}")


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")


@dataclass(frozen=True)
class ProbeOptions:
    """What to probe and how; the constructor parses "a,b" strings and checks every value.

    `layers` None means every stage and the bottleneck; "a+b" joins layers into one feature
    set. `preset` names the preset whose recommended probe filled the unset options
    (:meth:`with_preset`), and `preset_layers` whether the layers came from it.
    """

    layers: str | None = None
    pool: str = "grid4"
    classifiers: tuple[str, ...] = ("logreg",)
    baselines: tuple[str, ...] = BASELINES
    labels_per_class: tuple[int | str, ...] = ("all",)
    seeds: int = 3
    normalize: str = "standard"
    whiten_block_columns: int = WHITEN_BLOCK_COLUMNS
    augment: str = "none"
    c_scale: float = 1.0
    max_iter: int | None = None
    # logreg and linsvm step in a block whitening's coordinates: the same minimum in fewer passes
    precondition: bool = False
    pca_dims: tuple[int, ...] | None = None
    # How the probe holds the features: float16 halves the memory of wide feature sets (the
    # streaming classifiers read it without a copy); uint8 halves it again, each column in 8-bit
    # codes of its range (convae.features.FeatureCodes: standardizing undoes them)
    dtype: str = "float32"
    # "float32": extraction multiplies in fp32 even where the device has native bf16 (tensors.allow_bf16)
    precision: str = "auto"
    # extraction's forward pass through torch.compile: "auto" for 10,000 images or more (FeatureExtractor)
    compile: str = "auto"
    preset: str | None = None
    preset_layers: bool = False
    # one labelled dataset: a stratified hold-out of this fraction, or stratified K-fold (seeded)
    test_fraction: float | None = None
    cv: int | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize the parsed forms once, here
        set_(self, "classifiers", tuple(parse_list(self.classifiers, "classifiers", CLASSIFIER_NAMES)))
        set_(self, "baselines", tuple(parse_list(self.baselines, "baselines", BASELINES, allow_none=True)))
        set_(self, "labels_per_class", tuple(parse_labels_per_class(self.labels_per_class)))
        if not isinstance(self.seeds, int) or not 1 <= self.seeds <= PROBE_SEEDS_MAX:
            raise ConfigError(f"seeds must be from 1 to {PROBE_SEEDS_MAX}, got {self.seeds}")
        check_normalize(self.normalize)
        check_whiten_block_columns(self.whiten_block_columns)
        check_fit_options(self.c_scale, self.max_iter)
        if not isinstance(self.precondition, bool):
            raise ConfigError(f"precondition must be true or false, got {self.precondition!r}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        resolve_pools(self.pool)
        check_split(self.test_fraction, self.cv)
        check_seed(self.split_seed, "split_seed")
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        check_precision(self.precision)
        check_compile(self.compile)

    @classmethod
    def with_preset(cls, preset: str | None = None, **given: Any) -> ProbeOptions:
        """Options from `given` (None: not given), the preset's recommended probe filling the
        rest of PRESET_FIELDS, the defaults filling what is still unset."""
        recommended = get_preset(preset).probe if preset else {}
        chosen = {k: v for k, v in given.items() if v is not None}
        for key in PRESET_FIELDS:
            if key not in chosen and key in recommended:
                chosen[key] = recommended[key]
        return cls(**chosen, preset=preset, preset_layers=bool(preset) and given.get("layers") is None)

    @property
    def mirror(self) -> bool:
        """Whether the classifiers also fit the train images' mirror images."""
        return self.augment in ("flip", "flip-tta")

    @property
    def test_mirror(self) -> bool:
        """Whether each test image is scored with its mirror image too."""
        return self.augment == "flip-tta"

    def fit_meta(self) -> dict[str, Any]:
        """How the rows were fitted, for results.json."""
        meta: dict[str, Any] = dict(
            c_scale=self.c_scale,
            max_iter=self.max_iter,
            precondition=self.precondition,
            dtype=self.dtype,
            precision=self.precision,
            compile=self.compile,
        )
        if self.normalize == "whiten-blocks":
            meta["whiten_block_columns"] = self.whiten_block_columns
        if self.test_fraction is not None:
            meta["split"] = dict(test_fraction=self.test_fraction, stratified=True, seed=self.split_seed)
        if self.cv is not None:
            meta["split"] = dict(cv=self.cv, stratified=True, seed=self.split_seed)
        return meta

    def replace(self, **changes: Any) -> ProbeOptions:
        return replace(self, **changes)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ProbeOptions))
