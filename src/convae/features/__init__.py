"""Features from any encoder layer: pooled, concatenated, streamed to memory or to disk.

    plan.py        layer names, poolings, and the blocks of columns they give
    extractor.py   FeatureExtractor: one forward pass per batch, stopping after the deepest layer
    files.py       extract_to_file (resumable, sharded under torchrun, each row's source in
                   OUT.index.csv) and load_features
    parquet.py     the same as one Parquet file (--format parquet)
    codes.py       FeatureCodes: 8-bit codes of each column (the probe's --dtype uint8)

``stage1.conv1.split`` (any conv block's name plus ``.split``) is that block's sign-split maps:
its normalized pre-activation z as [relu(z - t), relu(-z - t)], 2C channels, pooled like any
layer; ``all`` leaves them out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

if TYPE_CHECKING:
    from .codes import FeatureCodes
    from .extractor import MAX_BATCH, FeatureExtractor, auto_batch_size, pool_features
    from .files import (
        DTYPES,
        FORMATS,
        ExtractResult,
        LoadedFeatures,
        RowRange,
        extract_to_file,
        index_path_of,
        is_feature_file,
        load_features,
        model_digest,
        output_format,
        partial_paths,
        shard_images,
        shard_path,
        shard_range,
    )
    from .plan import (
        POOLS,
        Block,
        block_feature_names,
        layer_table,
        plan_blocks,
        pooled_shape,
        resolve_layers,
        resolve_pools,
        split_names,
    )

__all__ = [
    "DTYPES",
    "FORMATS",
    "MAX_BATCH",
    "POOLS",
    "Block",
    "ExtractResult",
    "FeatureCodes",
    "FeatureExtractor",
    "LoadedFeatures",
    "RowRange",
    "auto_batch_size",
    "block_feature_names",
    "extract_to_file",
    "index_path_of",
    "is_feature_file",
    "layer_table",
    "load_features",
    "model_digest",
    "output_format",
    "partial_paths",
    "plan_blocks",
    "pool_features",
    "pooled_shape",
    "resolve_layers",
    "resolve_pools",
    "shard_images",
    "shard_path",
    "shard_range",
    "split_names",
]

_EXPORTS = {
    "Block": ".plan",
    "DTYPES": ".files",
    "FORMATS": ".files",
    "LoadedFeatures": ".files",
    "index_path_of": ".files",
    "output_format": ".files",
    "ExtractResult": ".files",
    "FeatureCodes": ".codes",
    "FeatureExtractor": ".extractor",
    "MAX_BATCH": ".extractor",
    "POOLS": ".plan",
    "RowRange": ".files",
    "auto_batch_size": ".extractor",
    "block_feature_names": ".plan",
    "extract_to_file": ".files",
    "is_feature_file": ".files",
    "layer_table": ".plan",
    "load_features": ".files",
    "model_digest": ".files",
    "partial_paths": ".files",
    "plan_blocks": ".plan",
    "pool_features": ".extractor",
    "pooled_shape": ".plan",
    "resolve_layers": ".plan",
    "resolve_pools": ".plan",
    "shard_images": ".files",
    "shard_path": ".files",
    "shard_range": ".files",
    "split_names": ".plan",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS, globals())
