"""Typed dataclass configs that round-trip to JSON, with strict validation.

Unknown, missing or wrongly typed fields are errors that name the field,
so a hand-edited or foreign config.json never loads half-right.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ._version import __version__
from .errors import ConfigError
from .limits import TRAIN_LIMITS, check_model_limits, check_numbers
from .models.config import ModelConfig

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass (tuples become lists, nested dataclasses dicts)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message, cut short (hostile configs hold huge values)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a huge integer"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = type(value).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from JSON) as the type `hint` says, or a ConfigError naming `where`."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), where)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{where}: {_short(value)} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(typing.cast(type, hint), _expect(value, dict, where, "an object"), where=where)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), where)
    if origin is dict:
        return dict(_expect(value, dict, where, "an object"))
    scalar = _SCALARS.get(hint)
    if scalar is None:
        raise ConfigError(f"{where}: unsupported field type {hint!r}")
    return scalar(value, where)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__}")
    return value


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {_short(value)}")


def _coerce_tuple(value: Any, args: tuple, where: str) -> tuple:
    _expect(value, (list, tuple), where, "a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    return value


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: {_short(value)} is out of range (a 64-bit integer)")
    return value


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {_short(value)}")
    return number


def _coerce_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    return value


_SCALARS: dict[Any, Any] = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown, missing and mistyped fields."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        shown = ", ".join(_short(k, 40).strip("'") for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ConfigError(f"{where}: unknown field(s) {shown}")
    kwargs = {}
    legacy = getattr(cls, "LEGACY_DEFAULTS", {})
    for name, spec in fields.items():
        if name not in data and name in legacy:  # written before the field existed
            kwargs[name] = legacy[name]
            continue
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing field '{name}'")
            continue
        kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check of the dataclass itself: say where
        raise ConfigError(f"{where}: {e}") from e
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, MemoryError) as e:
        message = " ".join((str(e) or type(e).__name__).split())
        raise ConfigError(f"{where}: {message[:200]}") from e


#: What a loss that is NaN or infinite does (see convae.train.fit).
NanPolicy = Literal["stop", "skip", "reduce-lr"]
NAN_POLICIES: tuple[str, ...] = typing.get_args(NanPolicy)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 0  # 0: chosen from the dataset size (unlimited when max_time is set)
    max_time: float = 0.0  # wall-clock budget in seconds; 0: none
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05  # fraction of the run spent warming the learning rate up
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    loss: Literal["mse", "bce"] = "mse"
    noise: float = 0.0  # denoising: std of gaussian noise added to the input
    mask_ratio: float = 0.0  # masking: fraction of input patches zeroed
    mask_patch: int = 0  # masking patch side in pixels; 0: about 1/7 of the image side
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads; 0: torch's default
    amp: bool = (
        True  # bf16 autocast where the device computes bf16 natively (CUDA from Ampere on; CPUs with AVX512-BF16/AMX)
    )
    channels_last: bool = True
    on_nan: NanPolicy = "stop"  # a NaN/inf loss: stop, skip the step, or halve the lr

    def __post_init__(self) -> None:
        check_numbers(self)  # finite, 64-bit: what config.json can hold and its loader reads back
        check_model_limits(self, TRAIN_LIMITS)
        checks = [
            (
                self.on_nan in NAN_POLICIES,
                f"on_nan must be one of {', '.join(NAN_POLICIES)}, got {_short(self.on_nan)}",
            ),
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.seed >= 0, f"seed must be >= 0 (numpy's generators take no negative seed), got {self.seed}"),
            (self.max_time >= 0, f"max_time must be >= 0, got {self.max_time}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.noise >= 0, f"noise must be >= 0, got {self.noise}"),
            (0 <= self.mask_ratio < 1, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (self.mask_patch >= 0, f"mask_patch must be >= 0, got {self.mask_patch}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (-(2**63) <= self.seed < 2**63, "seed must be a 64-bit integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    spec: str = ""  # the dataset as given to `convae fit` ("" when fitted from an array)
    image_size: tuple[int, int] = (28, 28)
    channels: int = 1
    num_images: int = 0


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    convae_version: str = __version__
