"""One stage of patch coding: a k-sparse tied-weight autoencoder of whitened p x p patches of a map.

A :class:`PatchCoder` sees every p x p x C patch of its input map (channels-last), optionally
contrast-normalized (each patch less its mean, over its floored standard deviation), ZCA-whitened
with statistics measured on training data, and multiplied by K unit filters: its responses z
(N, H-p+1, W-p+1, K). Training rebuilds random whitened patches from their `k` strongest
responses through the same filters (k = 1: gradient-descent spherical k-means, as in Coates and
Ng's dictionaries and Makhzani and Frey's k-sparse autoencoders). The hierarchical sparse net
(:mod:`convae.models.hsparse`) stacks these; the single-layer sparse net keeps its own copy of the
same arithmetic for its saved weights' names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import k_sparse


def unfold_nhwc(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, H-p+1, W-p+1, p*p*C) patches (order dy, dx, c), one view and one copy."""
    n, h, w, c = x.shape
    u = x.unfold(1, p, 1).unfold(2, p, 1)  # (N, h', w', C, p, p)
    return u.permute(0, 1, 2, 4, 5, 3).reshape(n, h - p + 1, w - p + 1, p * p * c)


class PatchCoder(nn.Module):
    """K unit filters over whitened (optionally contrast-normalized) p x p x C patches.

    Buffers (measured by :meth:`fit_statistics`, saved with the weights): the normalized
    patches' mean, the whitening and un-whitening matrices, and the contrast floor (the
    variance added before dividing by a patch's standard deviation).
    """

    mean: torch.Tensor
    whiten: torch.Tensor
    unwhiten: torch.Tensor
    floor: torch.Tensor

    def __init__(self, channels: int, patch: int, filters: int, *, contrast: bool, eps: float, k: int = 1):
        super().__init__()
        self.channels, self.patch, self.contrast, self.eps, self.k = channels, patch, contrast, eps, k
        d = channels * patch * patch
        self.dim = d
        self.filters = nn.Parameter(torch.randn(filters, d) / math.sqrt(d))
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("whiten", torch.eye(d))
        self.register_buffer("unwhiten", torch.eye(d))
        self.register_buffer("floor", torch.tensor(1.0))

    def normalized(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., d) -> each patch less its mean, over its floored standard deviation (if contrast)."""
        if not self.contrast:
            return patches
        centred = patches - patches.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.var(-1, keepdim=True, correction=0) + self.floor)

    def whitened(self, patches: torch.Tensor) -> torch.Tensor:
        return (self.normalized(patches) - self.mean) @ self.whiten

    def unit_filters(self) -> torch.Tensor:
        return self.filters / self.filters.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fit_statistics(self, patches: torch.Tensor, floor: float, generator: torch.Generator) -> None:
        """Whitening from raw patches (M, d), then the filters started at random whitened patches
        (Coates et al.'s initialisation: every filter starts where data is)."""
        self.floor.fill_(floor)
        p = self.normalized(patches.float()).double()
        mean = p.mean(0)
        cov = (p - mean).T @ (p - mean) / len(p)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(0) + self.eps
        self.mean.copy_(mean.float())
        self.whiten.copy_(((eigvecs * eigvals.rsqrt()) @ eigvecs.T).float())
        self.unwhiten.copy_(((eigvecs * eigvals.sqrt()) @ eigvecs.T).float())
        picks = torch.randint(0, len(patches), (self.filters.shape[0],), generator=generator)
        start = self.whitened(patches[picks].float())
        start = start + 0.01 * torch.randn(start.shape, generator=generator)  # duplicates part at once
        self.filters.copy_(start / start.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) map -> z (N, H-p+1, W-p+1, K): each normalized, whitened patch times each filter."""
        with torch.autocast(x.device.type, enabled=False):  # normalization divides by small stds: fp32
            detectors = self.unit_filters() @ self.whiten  # (K, d): the whitening folded into the filters
            patches = self.normalized(unfold_nhwc(x.float(), self.patch))
            return patches @ detectors.T - (self.mean @ detectors.T)

    def loss(self, patches: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE of the whitened `target` patches rebuilt from the `patches`' k strongest responses."""
        with torch.autocast(patches.device.type, enabled=False):  # whitened statistics want fp32
            filters = self.unit_filters()
            code = k_sparse(self.whitened(patches.float()) @ filters.T, self.k)  # (M, K)
            return F.mse_loss(code @ filters, self.whitened(target.float()))

    def decode_patches(self, code: torch.Tensor) -> torch.Tensor:
        """Codes (..., K) -> the normalized patches they stand for (..., d), un-whitened."""
        return (code @ self.unit_filters()) @ self.unwhiten + self.mean
