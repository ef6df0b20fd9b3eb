"""Which values a feature vector holds: layers by name, poolings, and the blocks they make.

Layer names are those of the model's ``feature_info`` (``stage1.conv1`` ... ``stage2``,
``bottleneck``; ``fc1`` ... ``bottleneck`` for the dense autoencoder), a block's sign split
(``stage1.conv1.split``), or ``all`` (every layer but the splits). A pooling turns a layer's
(C, H, W) maps into a vector:

    flatten   the maps as they are: C*H*W values, channel-major
    avg, max  global average / maximum of each channel: C values
    grid2/4   average over a 2x2 / 4x4 grid of regions, concatenated (spatial-pyramid style):
              C*4 / C*16 values; a map smaller than the grid keeps its own size

The outputs of dense layers are already global vectors, and every pooling leaves them as they
are. Blocks are concatenated layer by layer in network order, and within a layer in the order
of ``POOLS``, so a feature set is the same whatever order it was asked for in. Torch-free:
option checks use it before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

POOLS: tuple[str, ...] = ("flatten", "avg", "max", "grid2", "grid4")
GRIDS = {"grid2": 2, "grid4": 4}
# "auto": products in bf16 where the device computes bf16 natively; "float32": always fp32
PRECISIONS: tuple[str, ...] = ("auto", "float32")
# whether extraction runs the forward pass through torch.compile: "auto" for large extractions
COMPILE_MODES: tuple[str, ...] = ("auto", "always", "never")


def check_precision(precision: str) -> str:
    """`precision` when it is one of PRECISIONS, else a ConfigError naming them."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def check_compile(mode: str) -> str:
    """`mode` when it is one of COMPILE_MODES, else a ConfigError naming them."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def split_names(value: str | Iterable[str], what: str) -> list[str]:
    """Names from "a,b" or a list, stripped; none at all is an error naming option `what`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise ConfigError(f"{what}: give at least one name")
    return out


def resolve_layers(
    model,
    layers: str | Iterable[str] | None = "bottleneck",
    default: Callable[[], Sequence[str]] | None = None,
    option: str = "layers",
    keep_order: bool = False,
) -> list[str]:
    """Layer names in network order (`keep_order`: as asked), from "all", "a,b", a list, or None (`default()`).

    The one place layer names from users are checked: an unknown name lists the valid ones, in
    a message that starts with `option` (what the user gave them as).
    """
    if layers is None:
        if default is None:
            raise ConfigError("layers: give at least one name")
        return list(default())
    asked = split_names(layers, "layers")
    if asked == ["all"]:
        return list(model.layer_names)
    valid = model.feature_layer_names()
    unknown = [name for name in asked if name not in valid]
    if unknown:
        raise ConfigError(
            f"{option}: unknown layer(s) {', '.join(unknown)}: choose from all, {', '.join(valid)} "
            "(`convae layers RUN_DIR` lists them)"
        )
    if keep_order:
        return list(dict.fromkeys(asked))
    return [name for name in valid if name in asked]


def resolve_pools(pool: str | Iterable[str] = "flatten") -> list[str]:
    """Pooling names in the order of POOLS, from "avg", "avg,grid2" or a list."""
    asked = split_names(pool, "pool")
    unknown = [name for name in asked if name not in POOLS]
    if unknown:
        raise ConfigError(f"pool: unknown pooling {', '.join(unknown)}: choose from {', '.join(POOLS)}")
    return [name for name in POOLS if name in asked]


def pooled_shape(shape: Sequence[int], pool: str) -> tuple[int, ...]:
    """Shape of one layer's pooled features, given its output shape [C, H, W] (or [D] for dense layers)."""
    if len(shape) == 1:
        return (int(shape[0]),)
    c, h, w = (int(s) for s in shape)
    if pool == "flatten":
        return (c, h, w)
    if pool in ("avg", "max"):
        return (c,)
    g = GRIDS[pool]
    return (c, min(g, h), min(g, w))


def block_feature_names(layer: str, pool: str, shape: tuple[int, ...]) -> list[str]:
    """Column names of one block: ``layer/pool/c{k}`` plus the grid cell or (y, x) position."""
    prefix = f"{layer}/{pool}"
    if len(shape) == 1:
        return [f"{prefix}/c{c}" for c in range(shape[0])]
    cell = "y{}_x{}" if pool == "flatten" else "g{}_{}"
    c, h, w = shape
    return [f"{prefix}/c{k}_{cell.format(i, j)}" for k in range(c) for i in range(h) for j in range(w)]


@dataclass(frozen=True)
class Block:
    """One layer's pooled features, at columns start:stop of the concatenated vector."""

    layer: str
    pool: str
    shape: tuple[int, ...]
    start: int

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.pool}"

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stop(self) -> int:
        return self.start + self.dim

    @property
    def columns(self) -> slice:
        """This block's columns of the concatenated features: ``X[:, block.columns]``."""
        return slice(self.start, self.stop)


def plan_blocks(model, layers="bottleneck", pool="flatten", keep_order: bool = False) -> list[Block]:
    """The blocks a (layers, pool) request gives on `model`, in concatenation order: the layers in
    network order, each under every pooling; with `keep_order`, every pooling's blocks together,
    the layers as `layers` lists them (so layers listed side by side stay side by side at each pooling)."""
    names, pools = resolve_layers(model, layers, keep_order=keep_order), resolve_pools(pool)
    pairs = [(n, p) for p in pools for n in names] if keep_order else [(n, p) for n in names for p in pools]
    blocks, start = [], 0
    for layer, p in pairs:
        blocks.append(Block(layer, p, pooled_shape(model.layer_shape(layer), p), start))
        start = blocks[-1].stop
    return blocks


def layer_table(model) -> list[dict]:
    """One row per feature layer with its channels, stride, receptive field and each pooling's size."""
    rows = []
    for name in model.feature_layer_names():
        f = model.layer_info(name)
        row = dict(
            layer=name,
            shape="x".join(str(s) for s in f.shape),
            channels=f.shape[0],
            stride=f.reduction if f.reduction is not None else "-",
            receptive_field=f.receptive_field,
        )
        for p in POOLS:
            row[p] = int(np.prod(pooled_shape(f.shape, p)))
        rows.append(row)
    return rows
