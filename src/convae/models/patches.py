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
import typing
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import bf16_products, full_precision, weights_key
from .blocks import k_sparse, normalized_patches


def fold_nhwc(patches: torch.Tensor, p: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w, p*p*C) patches (order dy, dx, c) -> the (N, H, W, C) map, overlaps averaged."""
    n, h, w, _ = patches.shape
    cols = patches.reshape(n, h * w, p, p, channels).permute(0, 4, 2, 3, 1).reshape(n, channels * p * p, h * w)
    summed = F.fold(cols, size, p)
    overlaps = F.fold(torch.ones_like(cols[:1]), size, p)
    return (summed / overlaps).permute(0, 2, 3, 1)


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
        return normalized_patches(patches, self.floor)

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
        """(N, H, W, C) map -> z (N, H-p+1, W-p+1, K): each normalized, whitened patch times each filter.

        In inference mode (extraction) where the device computes bf16 natively, the product runs in
        bf16 and z comes back bf16 (the normalization stays fp32): z is 16x the patches' size on
        MNIST (K = 400, d = 25), and writing it, splitting and pooling it took half the time in
        fp32 (the mnist preset's stage 1: 8.1 -> 3.9 ms a batch of 24 on an AVX512-BF16 host;
        the probe's accuracy: benchmarks/RESULTS.md). Training and its no-grad stage inputs stay
        fp32, as the presets were measured."""
        with full_precision(x.device.type):  # normalization divides by small stds: fp32
            detectors = self.unit_filters() @ self.whiten  # (K, d): the whitening folded into the filters
            patches = self.normalized(unfold_nhwc(x.float(), self.patch))  # (N, h, w, d)
            # the mean taken from the d-value patches, not from the K responses (addmm's bias was
            # a copy of the whole (N, h, w, K) output: 12% of a CIFAR-10 extraction, K = 800, d = 75)
            fresh = self.contrast and not torch.is_grad_enabled()  # normalized() made a new tensor
            centered = patches.sub_(self.mean) if fresh else patches - self.mean
            if torch.is_inference_mode_enabled() and bf16_products(x.device):
                centered, detectors = centered.bfloat16(), detectors.bfloat16()
            return torch.mm(centered.flatten(0, 2), detectors.T).view(*patches.shape[:3], -1)

    @property
    def n_filters(self) -> int:
        return self.filters.shape[0]

    def loss(self, patches: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE of the whitened `target` patches rebuilt from the `patches`' k strongest responses
        (patches (M, d), or windows (M, p, p, C))."""
        patches, target = patches.reshape(len(patches), -1), target.reshape(len(target), -1)
        with full_precision(patches.device.type):  # whitened statistics want fp32
            filters = self.unit_filters()
            code = k_sparse(self.whitened(patches.float()) @ filters.T, self.k)  # (M, K)
            return F.mse_loss(code @ filters, self.whitened(target.float()))

    def decode_patches(self, code: torch.Tensor) -> torch.Tensor:
        """Codes (..., K) -> the normalized patches they stand for (..., d), un-whitened."""
        return (code @ self.unit_filters()) @ self.unwhiten + self.mean

    def decode_map(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Codes (N, h, w, K) -> the (N, H, W, C) map of the normalized patches they stand for."""
        return fold_nhwc(self.decode_patches(z), self.patch, self.channels, size)


CORRELATION_ROWS = 4096  # sample rows made float64 at a time


def _seed_correlations(locations: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """(G, C) float64 correlations of the `seeds` channels of (M, C) samples with every channel,
    from a few thousand rows in float64 at a time. The whole sample in float64 and all C x C
    correlations were 5.1 GB and 8 TFLOP for a third stage over 6,400 channels; only the seeds'
    rows are ever read (the groups chosen are the same on the presets: RESULTS.md)."""
    n = len(locations)
    total = torch.zeros(locations.shape[1], dtype=torch.float64, device=locations.device)
    for part in locations.split(CORRELATION_ROWS):
        total += part.double().sum(0)
    mean = total / n
    squares = torch.zeros_like(mean)
    for part in locations.split(CORRELATION_ROWS):
        squares += (part.double() - mean).square_().sum(0)
    std = (squares / max(n - 1, 1)).sqrt_().clamp_min(1e-6)
    products = mean.new_zeros((len(seeds), len(mean)))
    for part in locations.split(CORRELATION_ROWS):
        z = (part.double() - mean).div_(std)
        products.addmm_(z[:, seeds].T, z)
    return products / n


class GroupedPatchCoder(nn.Module):
    """G patch coders, each over p x p patches of its own Gs channels of the input map: Coates and
    Ng's receptive-field groups ("Selecting Receptive Fields in Deep Networks", 2011). A group is a
    random seed channel and the Gs channels that co-vary with it most (:meth:`choose_groups`), so
    each coder sees a few hundred values that belong together instead of the whole map's
    thousands; the stage's responses are the groups' side by side (G * Kg channels).
    """

    members: torch.Tensor
    _folded_key: tuple | None = None  # see _folded
    _folded_value: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    def __init__(self, channels: int, patch: int, filters_per_group: int, groups: int, group_size: int, *,
                 eps: float, k: int = 1):  # fmt: skip
        super().__init__()
        self.channels, self.patch, self.group_size = channels, patch, group_size
        self.coders = nn.ModuleList(
            PatchCoder(group_size, patch, filters_per_group, contrast=True, eps=eps, k=k) for _ in range(groups)
        )
        # until choose_groups: the input's channels dealt out in turn (an untrained net runs too)
        self.register_buffer("members", torch.arange(groups * group_size).view(groups, group_size) % channels)

    def group_coders(self) -> list[PatchCoder]:
        return [typing.cast(PatchCoder, c) for c in self.coders]

    @property
    def n_filters(self) -> int:
        return sum(c.n_filters for c in self.group_coders())

    @property
    def filters(self) -> list[torch.Tensor]:
        return [c.filters for c in self.group_coders()]

    @torch.no_grad()
    def choose_groups(self, locations: torch.Tensor, generator: torch.Generator) -> None:
        """Groups from (M, C) samples of the input map: each a random seed channel and the channels
        most correlated with it (itself first)."""
        seeds = torch.randperm(locations.shape[1], generator=generator)[: len(self.coders)]
        similarity = _seed_correlations(locations, seeds)  # (G, C)
        self.members.copy_(torch.stack([row.argsort(descending=True)[: self.group_size] for row in similarity]))

    def group_patches(self, windows: torch.Tensor) -> Iterator[torch.Tensor]:
        """(M, p, p, C) windows of the input map -> each group's (M, p*p*Gs) patches (order dy, dx, c),
        one group at a time (all of CIFAR-10's 64 at once were 1.5 GB beside the windows)."""
        for idx in self.members:
            yield windows[..., idx].reshape(len(windows), -1)

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H-p+1, W-p+1, G * Kg): every group's coder on its channels, in one batch.

        The contrast normalization is moved past the filters, W (x - m) / s = (W x - m W 1) / s, so
        the filters run as one grouped convolution and each patch's mean m and standard deviation
        s come from box filters of its group's channel means: the (G, positions, p*p*Gs) patch
        matrix is never built. Building and normalizing it was three quarters of a CIFAR-10
        extraction (32 groups x 288 values a position, 5.8x the 1,600 responses).

        Where no gradient is wanted and the device computes bf16 natively, the channels are
        gathered and convolved in bf16 (the statistics summed in fp32 from the same values, and
        everything after fp32): the cifar10 preset's extraction 1.1-1.3x as fast on an AMX CPU,
        its probed features moved by 0.4% of their standard deviation on average
        (benchmarks/hsparse_extraction.py; RESULTS.md has the probe's accuracy with and without)."""
        n, h, w, _ = x.shape
        g, p = self.members.shape[0], self.patch
        h2, w2 = h - p + 1, w - p + 1
        with full_precision(x.device.type):
            weight, offsets, rowsums, floors = self._folded()
            low = not torch.is_grad_enabled() and bf16_products(x.device)
            if low:  # the maps as stage 1 hands them over in inference: half the bytes gathered
                x, weight = x.bfloat16(), weight.bfloat16()
            sub, mean, square = self._gathered(x if low else x.float())
            kg = offsets.shape[1]
            # each patch's mean and mean square over p x p by a box filter of its group's channel means
            mean = F.avg_pool2d(mean.permute(0, 3, 1, 2), p, 1)  # (N, G, h', w')
            square = F.avg_pool2d(square.permute(0, 3, 1, 2), p, 1)
            std = torch.sqrt((square - mean.square()).clamp_min(0) + floors)
            raw = F.conv2d(sub.permute(0, 3, 1, 2), weight, groups=g)  # W x of every patch, channels-last
            raw = raw.permute(0, 2, 3, 1).view(n, h2, w2, g, kg)
            # z = raw / s - offset - (m / s) W1: two fused passes over the responses (the
            # elementwise form, (raw - m W1) / s - offset, made four, each with a new full-size tensor)
            inverse = std.reciprocal().permute(0, 2, 3, 1)[..., None]  # (N, h', w', G, 1)
            shift = mean.permute(0, 2, 3, 1)[..., None] * inverse
            z = torch.addcmul(-offsets, raw, inverse)  # fp32 whatever raw's precision
            z.addcmul_(shift, rowsums, value=-1)
        return z.view(n, h2, w2, g * kg)

    def _gathered(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, H, W, C) -> the groups' channels (N, H, W, G*Gs) in x's dtype, by ``torch.gather``
        (half the time of indexing the last dimension), and each group's channel mean and mean
        square at every location (N, H, W, G), summed in float32 from those gathered values,
        the ones the convolution sees. (Products with a membership matrix over all C channels in
        float32 did this before: on the mnist preset's model, a batch of 48, they and the gather
        took 14 ms of stage 2's 25; benchmarks/RESULTS.md.)"""
        n, h, w, c = x.shape
        g, gs = self.members.shape
        rows = x.reshape(n * h * w, c)
        sub = torch.gather(rows, 1, self.members.flatten().expand(len(rows), -1)).view(n, h, w, g, gs)
        mean = sub.sum(-1, dtype=torch.float32) / gs
        wide = sub.float()
        square = (wide.square_() if wide is not sub else wide.square()).sum(-1) / gs  # sub: the convolution's input
        return sub.view(n, h, w, g * gs), mean, square

    # run uncompiled under torch.compile: a cache lookup (dynamo guarded on the cache attribute,
    # so the compiled extraction compiled again when the first batch filled it: 4-9 s, RESULTS.md)
    @torch.compiler.disable
    def _folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The groups' whitening folded into their unit filters, as the grouped convolution's
        weight (G*Kg, Gs, p, p), with each filter's offset (its response to the mean patch, (G, Kg))
        and row sum (G, Kg), and the contrast floors (1, G, 1, 1).

        Kept between calls while no gradient is wanted and no weight has changed (extraction
        recomputed it every batch: 32 small products, 9% of a CIFAR-10 batch's time)."""
        key = None if torch.is_grad_enabled() else weights_key(self)
        if key is not None and key == self._folded_key:
            return self._folded_value
        coders = self.group_coders()
        detectors = torch.stack([c.unit_filters() @ c.whiten for c in coders])  # (G, Kg, d), d: (dy, dx, c)
        g, kg = detectors.shape[:2]
        p, gs = self.patch, self.group_size
        weight = detectors.view(g, kg, p, p, gs).permute(0, 1, 4, 2, 3).reshape(g * kg, gs, p, p)
        offsets = torch.einsum("gd,gkd->gk", torch.stack([c.mean for c in coders]), detectors)
        floors = torch.stack([c.floor for c in coders]).view(1, g, 1, 1)
        folded = (weight, offsets, detectors.sum(-1), floors)
        if key is not None:  # never a tensor that holds an autograd graph
            self._folded_key, self._folded_value = key, folded
        return folded

    def loss(self, windows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The groups' patch losses, averaged: each rebuilds its channels of the target windows.

        Every group's :meth:`PatchCoder.loss` in one batched pass (a loop over 32 groups spent
        more time dispatching small ops than multiplying)."""
        coders = self.group_coders()
        with full_precision(windows.device.type):
            filters = torch.stack([c.unit_filters() for c in coders])  # (G, Kg, d)
            whiten = torch.stack([c.whiten for c in coders])  # (G, d, d)
            mean = torch.stack([c.mean for c in coders])[:, None, :]  # (G, 1, d)
            floors = torch.stack([c.floor for c in coders]).view(-1, 1, 1)

            def whitened(w: torch.Tensor) -> torch.Tensor:  # (M, p, p, C) -> (G, M, d)
                return torch.bmm(normalized_patches(self._stacked(w.float()), floors) - mean, whiten)

            a = whitened(windows)
            b = a if target is windows else whitened(target)
            code = k_sparse(torch.bmm(a, filters.transpose(1, 2)), coders[0].k, dim=-1)  # (G, M, Kg)
            return F.mse_loss(torch.bmm(code, filters), b)

    def _stacked(self, windows: torch.Tensor) -> torch.Tensor:
        """(M, p, p, C) windows -> (G, M, p*p*Gs): :meth:`group_patches` as one tensor."""
        m, p = windows.shape[0], self.patch
        g, gs = self.members.shape
        picked = windows[..., self.members.flatten()].view(m, p, p, g, gs)
        return picked.permute(3, 0, 1, 2, 4).reshape(g, m, p * p * gs)

    def decode_map(self, z: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
        """Codes (N, h, w, G * Kg) -> the (N, H, W, C) map they stand for: each group's patches folded
        onto its channels, channels in several groups averaged (those in none stay 0)."""
        n = z.shape[0]
        groups = z.reshape(*z.shape[:3], len(self.coders), -1)
        out = z.new_zeros(n, *size, channels)
        count = z.new_zeros(channels)
        for g, coder in enumerate(self.group_coders()):
            folded = coder.decode_map(groups[..., g, :], size)  # (N, H, W, Gs)
            out.index_add_(3, self.members[g], folded)
            count.index_add_(0, self.members[g], torch.ones(self.group_size, device=z.device))
        return out / count.clamp_min(1)
