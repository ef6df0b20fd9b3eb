"""8-bit codes of feature columns: a feature matrix in half the memory of float16.

Each column's values are held as ``round((x - low) / step)`` in 0..255, its `low` and `step` taken
from a sample of rows (the sample's range widened by half of it either way, never below zero for
a column that is never negative there: the sign-split, pooled features the hierarchical models'
probes read start at zero); values past the range are clipped. A column's codes are then an
affine map of its values up to rounding, so a classifier that standardizes its columns, as every
probe classifier does, fits the codes as it would the values: the probe never decodes them.

Why not a library's: scikit-learn and numpy have no per-column 8-bit storage, and torch's
quantized tensors quantize per channel of a weight, not per column of a growing matrix written
batch by batch from a range known before the first batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

LEVELS = 255  # the largest code
# the sample's range widened by this fraction of it on each side: rows past the sample's range
# are clipped there, not lost (the mnist preset's validation features, coded from 1,024 rows:
# 2.5e-6 of the values of other rows clipped at twice the sample's largest value)
HEADROOM = 0.5
NOT_FINITE = "the features hold NaN or infinite values (a diverged model?): they have no 8-bit codes"


class FeatureCodes:
    """Per-column 8-bit codes: `low` (the value of code 0) and `step` (a code's width), float32."""

    def __init__(self, low: np.ndarray, step: np.ndarray):
        self.low = np.ascontiguousarray(low, dtype=np.float32)
        self.step = np.ascontiguousarray(step, dtype=np.float32)
        if self.low.shape != self.step.shape or self.low.ndim != 1 or not np.all(self.step > 0):
            raise ConfigError("feature codes need one low value and one positive step per column")
        self._low = torch.from_numpy(self.low)
        self._inverse_step = torch.from_numpy(1.0 / self.step)
        # code + 1/2 = x / step + (1/2 - low / step): one fused multiply-add, then a cast to uint8,
        # which truncates (rounds half up). With the check below, encode ran 3x as fast as
        # subtracting, scaling and rounding in turn (256 x 32,000 rows, 2 threads: 6.5-7.5 ms
        # against 19-21; 1.7e-6 of the codes one apart). float32 keeps x / step within 1e-3 of a
        # code where |low / step| < 2^14; columns past that (a narrow range far from zero) subtract first.
        offset = 0.5 - self.low.astype(np.float64) / self.step
        self._offset = torch.from_numpy(offset.astype(np.float32))
        self._fused = bool(np.all(np.abs(offset) < 2**14))

    @classmethod
    def fitted(cls, sample: np.ndarray) -> FeatureCodes:
        """Codes for columns whose values look like `sample`'s (rows x columns)."""
        sample = np.asarray(sample, dtype=np.float64)
        if sample.ndim != 2 or len(sample) == 0:
            raise ConfigError("feature codes need a sample of at least one row")
        if not np.isfinite(sample).all():
            raise ConfigError(NOT_FINITE)
        lo, hi = sample.min(0), sample.max(0)
        margin = HEADROOM * (hi - lo)
        low = np.where(lo >= 0, np.maximum(lo - margin, 0.0), lo - margin)
        span = hi + margin - low
        step = np.where(span > 0, span / LEVELS, 1.0)  # a column constant on the sample: steps of 1
        return cls(low, step)

    def encode(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Write the codes of `rows` (n x dim values) into `out` (n x dim, uint8)."""
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        # NaN would cast to some code: silently wrong, not refused. min and max carry any NaN or
        # infinity, in one read (isfinite(x).all(): 17x as long, 256 x 32,000 rows)
        if not torch.isfinite(torch.stack(torch.aminmax(x))).all():
            raise ConfigError(NOT_FINITE)
        if self._fused:
            codes = torch.addcmul(self._offset, x, self._inverse_step)
        else:
            codes = x.sub(self._low).mul_(self._inverse_step).add_(0.5)
        codes.clamp_(0.0, LEVELS + 0.5)  # truncated by the cast below
        if out.flags.writeable and out.flags.c_contiguous:
            torch.from_numpy(out).copy_(codes)  # the float -> uint8 cast in torch's vectorized copy
        else:
            out[...] = codes.to(torch.uint8).numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The values `codes` stand for (float32), up to rounding and clipping."""
        return np.asarray(codes, dtype=np.float32) * self.step + self.low
