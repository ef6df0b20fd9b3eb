"""The hierarchical sparse autoencoder (arch "hsparse"): stages of whitened k-sparse patch coders.

Stage 1 codes the image's p x p patches (contrast-normalized, ZCA-whitened) with K1 unit filters,
as the single-layer sparse net does; its responses are sign-split at a soft threshold (Coates and
Ng's encoding) and average-pooled q x q, and each location's 2K1 pooled values are reduced to D
by PCA, whitened. Stage 2 codes p2 x p2 neighbourhoods of that map with K2 filters the same way,
and so on: each stage sees a larger part of the image (its units combine the parts below them).
Every stage learns by reconstruction alone, greedily: stage k rebuilds random whitened
neighbourhoods of stage k-1's output from their `sparse_k` strongest filters, the stages below
frozen (``training_stages``; the Trainer gives each stage an equal share of the run). Layers:

    stage1.conv1        (K1, H-p+1, W-p+1)   stage 1's responses z
    stage1.conv1.split  (2K1, ...)           [relu(z - t), relu(-z - t)]
    stage1              (2K1, h1, w1)        the split maps pooled q x q: what stage 2 reads (before PCA)
    stage2.conv1 ...                          likewise for every stage
    bottleneck          (Kn, ...)            the last stage's code: its sparse_k strongest responses

``forward`` rebuilds the image from stage 1's code (stage 2 and up reconstruct the stage below,
not pixels); ``decode`` takes a bottleneck code down through every stage's dictionary,
undoing the PCA, the pooling (nearest) and the split, so what the deepest code keeps is visible.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..tensors import bf16_products, evenly_spaced, iter_float_batches
from .base import SPLIT_SUFFIX, AutoencoderNet, FeatureInfo, LayerInfo, TrainStep
from .blocks import CONTRAST_FLOOR, k_sparse
from .config import ModelConfig
from .patches import CORRELATION_ROWS, GroupedPatchCoder, PatchCoder, fold_nhwc, unfold_nhwc

Coder = PatchCoder | GroupedPatchCoder

# Data statistics of each stage (its PCA, its whitening, its filters' starting points) are
# measured on this many patches from up to this many training images, evenly spaced.
STATISTICS_PATCHES = 100_000
STATISTICS_IMAGES = 10_000
# Grouped stages measure each group's whitening on this many windows (every group sees them all).
GROUPED_STATISTICS_PATCHES = 20_000
_SAMPLE_CHUNK = 32  # images whose maps the statistics' sampling computes at once
# Upper stages' contrast floor, relative to the mean variance of a patch's values (the pixel
# floor of stage 1 has no meaning on PCA-whitened maps).
UPPER_FLOOR = 0.1


class LocalPCA(nn.Module):
    """Each location's C values -> D, by PCA of the training maps, whitened (eps relative to the
    mean of the kept eigenvalues, so weak axes are not raised to the strong ones' scale)."""

    project: torch.Tensor
    back: torch.Tensor
    center: torch.Tensor

    def __init__(self, channels: int, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.register_buffer("project", torch.eye(channels, dim))  # (C, D)
        self.register_buffer("back", torch.eye(dim, channels))  # (D, C): un-whiten and rotate back
        self.register_buffer("center", torch.zeros(channels))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor) -> None:
        v = vectors.double()
        mean = v.mean(0)
        v.sub_(mean)  # in place: (v - mean) twice was two more float64 copies of the sample
        cov = v.T @ v / len(v)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals, eigvecs = eigvals.flip(0)[: self.dim].clamp_min(0), eigvecs.flip(1)[:, : self.dim]
        scale = torch.sqrt(eigvals + self.eps * eigvals.mean().clamp_min(1e-12))
        self.project.copy_((eigvecs / scale).float())
        self.back.copy_((eigvecs * scale).T.float())
        self.center.copy_(mean.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., D)
        return (x - self.center) @ self.project

    def inverse(self, t: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., C)
        return t @ self.back + self.center


class HierarchicalSparseNet(AutoencoderNet):
    description = "hierarchical sparse autoencoder (stages of whitened k-sparse patch coders, trained greedily)"
    size_options = ("--widths", "--reduce-dim", "--upper-kernel")
    activation_options = ("--batch-size", "--patches-per-image", "--widths")
    config_fields = (
        "channels", "kernel_size", "upper_kernel", "pool_size", "reduce_dim", "split_threshold", "sparse_k",
        "whiten_eps", "patches_per_image", "upper_image_fraction",
    )  # fmt: skip

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "hsparse":
            raise ConfigError(f"HierarchicalSparseNet needs arch='hsparse', got {config.arch!r}")
        self.config = config
        self.threshold = config.split_threshold
        self.coders = nn.ModuleList()
        self.reducers = nn.ModuleList()
        channels = config.in_channels
        for s, filters in enumerate(config.channels):
            self.coders.append(self._coder(config, s, channels, filters))
            if s + 1 < len(config.channels):
                if config.groups:  # the groups read the pooled split maps as they are
                    self.reducers.append(nn.Identity())
                    channels = 2 * filters
                else:
                    channels = config.reduce_dim or 2 * filters
                    self.reducers.append(LocalPCA(2 * filters, channels, config.whiten_eps))
        self.feature_info = FeatureInfo(self._layer_infos(), split_of=[f"stage{s}.conv1" for s in self._stage_ids()])

    @staticmethod
    def _coder(config: ModelConfig, stage: int, channels: int, filters: int) -> Coder:
        eps, k = config.whiten_eps, config.sparse_k
        if stage == 0:
            return PatchCoder(channels, config.kernel_size, filters, contrast=True, eps=eps, k=k)
        if config.groups:
            return GroupedPatchCoder(channels, config.upper_kernel, filters // config.groups, config.groups,
                                     config.group_size, eps=eps, k=k)  # fmt: skip
        return PatchCoder(channels, config.upper_kernel, filters, contrast=True, eps=eps, k=k)

    @property
    def stage_coders(self) -> list[Coder]:
        return [typing.cast(Coder, c) for c in self.coders]

    @property
    def stage_reducers(self) -> list[nn.Module]:
        return list(self.reducers)

    def hierarchy_layers(self) -> list[str]:
        """One layer per stage: its pooled split maps (the bottleneck is the last stage's code)."""
        return [f"stage{s}" for s in self._stage_ids()]

    def inference_map_bytes(self, name: str, device: torch.device) -> int:
        """A plain (ungrouped) stage's responses are bf16 in inference where native (PatchCoder.responses)."""
        size = super().inference_map_bytes(name, device)
        if name.endswith(".conv1") and bf16_products(device):
            if isinstance(self.stage_coders[self._depth_of(name) - 1], PatchCoder):
                return size // 2
        return size

    def _stage_ids(self) -> range:
        return range(1, len(self.config.channels) + 1)

    # -- configuration -----------------------------------------------------
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        if not config.channels or any(c < 1 for c in config.channels):
            raise ConfigError(
                f"channels: give each stage's number of filters, e.g. 1600,1600; got {list(config.channels)}"
            )
        checks = (
            (config.kernel_size >= 1 and config.upper_kernel >= 1, "kernel_size and upper_kernel must be at least 1"),
            (config.pool_size >= 1, f"pool_size must be at least 1, got {config.pool_size}"),
            (config.reduce_dim >= 0, f"reduce_dim must be >= 0 (0: no reduction), got {config.reduce_dim}"),
            (config.split_threshold >= 0, f"split_threshold must be >= 0, got {config.split_threshold}"),
            (config.whiten_eps > 0, f"whiten_eps must be positive, got {config.whiten_eps}"),
            (config.patches_per_image >= 1, f"patches_per_image must be at least 1, got {config.patches_per_image}"),
            (
                0 < config.upper_image_fraction <= 1,
                f"upper_image_fraction must be in (0, 1], got {config.upper_image_fraction}",
            ),
            (
                1 <= config.sparse_k <= min(config.channels),
                "sparse_k must be between 1 and the fewest filters of a stage",
            ),
            (not config.code_wta, "code_wta applies to arch conv; arch hsparse has its own sparsity (sparse_k)"),
            (config.groups >= 0 and config.group_size >= 1, "groups must be >= 0 and group_size at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if config.groups:
            cls._check_groups(config)
        h, w = config.image_size
        for s, (mh, mw) in enumerate(cls._map_sizes(config), start=1):
            if min(mh, mw) < 1:
                raise ConfigError(
                    f"images of {h}x{w} pixels are too small for {len(config.channels)} stages (stage {s} would get "
                    f"{mh}x{mw}): use fewer stages, smaller kernels or larger images"
                )

    @staticmethod
    def _check_groups(config: ModelConfig) -> None:
        for s in range(1, len(config.channels)):
            if config.channels[s] % config.groups:
                raise ConfigError(
                    f"channels: stage {s + 1}'s {config.channels[s]} filters must split evenly into {config.groups} groups"
                )
            if config.group_size > 2 * config.channels[s - 1]:
                raise ConfigError(
                    f"group_size {config.group_size} is more than the {2 * config.channels[s - 1]} channels stage {s} "
                    "gives the groups above it"
                )

    @classmethod
    def default_settings(cls, image_shape, settings: dict, overrides: dict) -> dict:
        smallest = min(image_shape[:2])
        return {**settings, "channels": (1600, 1600), "kernel_size": min(5, smallest)}

    @staticmethod
    def _map_sizes(config: ModelConfig) -> list[tuple[int, int]]:
        """Each stage's response map size (H, W); a stage's pooled map is ceil of it / pool_size."""
        h, w = config.image_size
        sizes = []
        for s in range(len(config.channels)):
            p = config.kernel_size if s == 0 else config.upper_kernel
            h, w = h - p + 1, w - p + 1
            sizes.append((h, w))
            h, w = math.ceil(h / config.pool_size), math.ceil(w / config.pool_size)
        return sizes

    @classmethod
    def code_shape(cls, config: ModelConfig) -> tuple[int, ...]:
        return (config.channels[-1], *cls._map_sizes(config)[-1])

    # -- layer bookkeeping -------------------------------------------------
    def _layer_infos(self) -> list[LayerInfo]:
        cfg = self.config
        q = cfg.pool_size
        rf, jump, start = 1, 1, 0.0  # receptive field, stride, centre of unit 0 (input pixels)
        infos = []
        for s, ((h, w), coder) in enumerate(zip(self._map_sizes(cfg), self.stage_coders), start=1):
            p = coder.patch
            rf, start = rf + (p - 1) * jump, start + (p - 1) / 2 * jump  # a valid p x p convolution
            k = coder.n_filters
            params = sum(p.numel() for p in coder.parameters())
            infos.append(LayerInfo(f"stage{s}.conv1", k, jump, rf, start, (k, h, w), params))
            rf, start, jump = rf + (q - 1) * jump, start + (q - 1) / 2 * jump, jump * q  # q x q pooling, stride q
            infos.append(LayerInfo(f"stage{s}", 2 * k, jump, rf, start, (2 * k, -(-h // q), -(-w // q)), 0))
        last = infos[-2]
        infos.append(LayerInfo("bottleneck", last.num_chs, last.reduction, last.receptive_field, last.rf_start,
                               last.shape, 0))  # fmt: skip
        return infos

    # -- passes ----------------------------------------------------------------
    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., 2K): [relu(z - t), relu(-z - t)]."""
        t = self.threshold
        return torch.cat([F.relu(z - t), F.relu(-z - t)], dim=-1)

    def _pool(self, split: torch.Tensor) -> torch.Tensor:
        """(N, h, w, C) -> (N, ceil(h/q), ceil(w/q), C): the average of each q x q block."""
        q = self.config.pool_size
        if q == 1:
            return split
        pooled = F.avg_pool2d(split.permute(0, 3, 1, 2), q, q, ceil_mode=True)
        return pooled.permute(0, 2, 3, 1)

    def _pooled_split(self, z: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``_pool(_split(z))`` with each half pooled before they are joined: the full-size split
        map is never written (on CIFAR-10's stage 1 it is 2 x 800 x 28 x 28 values an image, and
        building it took 40% of a stage-2 training step), and relu(-z - t) is -min(z + t, 0).
        (One softshrink, the negative half pooled by difference, made fewer passes but ran 3x
        slower on the CPU: torch's softshrink is not vectorized like sub and clamp.)
        `consume`: z is not needed after this and holds no graph, so the positive half is made in
        z's own memory (one full-size tensor fewer to allocate and fill: the split of CIFAR-10's
        800-channel stage 1 took 1.0 ms a batch of 4 instead of 2.1; the presets' extraction
        2-4% faster, benchmarks/RESULTS.md)."""
        t = self.threshold
        neg = self._pool(torch.add(z, t).clamp_max_(0)).neg_()
        pos = self._pool(z.sub_(t).clamp_min_(0) if consume else torch.sub(z, t).clamp_min_(0))
        return torch.cat([pos, neg], dim=-1)

    def _stages(self, x: torch.Tensor, last: int, keep: frozenset[int] = frozenset()):
        """Yield (stage number, z, pooled split) for stages 1..last; x (N, C, H, W) in [0, 1].

        Unless it holds a graph, z is yielded only for the stages in `keep` (else None): the
        others' z is spent making the pooled split. The pooled split is bf16 where z is (inference
        on a device with native bf16): the next stage's bf16 convolution takes it as it is."""
        inp = x.permute(0, 2, 3, 1)  # channels-last throughout: the patches are rows of a matmul
        for s in range(last):
            z = self.stage_coders[s].responses(inp)  # (N, h, w, K); bf16 in inference where native
            consume = s + 1 not in keep and not z.requires_grad
            pooled = self._pooled_split(z, consume)
            yield s + 1, None if consume else z.float(), pooled
            if s + 1 < last:
                inp = self.stage_reducers[s](pooled)  # (N, h', w', D)

    def _intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        deepest = max(self._depth_of(name) for name in wanted)
        out: dict[str, torch.Tensor] = {}
        nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  (N, h, w, C) -> an (N, C, h, w) view
        keep = frozenset(self._depth_of(name) for name in wanted if name == "bottleneck" or ".conv1" in name)
        for s, z, pooled in self._stages(x, deepest, keep):
            if f"stage{s}" in wanted:
                out[f"stage{s}"] = nchw(pooled.float())
            if s not in keep:
                continue
            z = typing.cast(torch.Tensor, z)
            if f"stage{s}.conv1" in wanted:
                out[f"stage{s}.conv1"] = nchw(z)
            if f"stage{s}.conv1{SPLIT_SUFFIX}" in wanted:
                out[f"stage{s}.conv1{SPLIT_SUFFIX}"] = nchw(self._split(z))
            if "bottleneck" in wanted and s == len(self.coders):
                out["bottleneck"] = nchw(k_sparse(z, self.config.sparse_k, dim=-1))
        return out

    def _depth_of(self, name: str) -> int:
        if name == "bottleneck":
            return len(self.coders)
        return int(name.split(".")[0].removeprefix("stage"))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._intermediates(x, {"bottleneck"})["bottleneck"]

    # -- reconstruction ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The image rebuilt from stage 1's code, each patch given back its mean and contrast."""
        coder = typing.cast(PatchCoder, self.stage_coders[0])
        z = coder.responses(x.permute(0, 2, 3, 1)).float()  # (N, h, w, K)
        patches = coder.decode_patches(k_sparse(z, self.config.sparse_k, dim=-1))  # normalized patches
        raw = unfold_nhwc(x.permute(0, 2, 3, 1).float(), coder.patch)
        mean = raw.mean(-1, keepdim=True)
        std = torch.sqrt(raw.var(-1, keepdim=True, correction=0) + coder.floor)
        image = fold_nhwc(patches * std + mean, coder.patch, coder.channels, self._input_size(0, []))
        return image.permute(0, 3, 1, 2).clamp(0, 1)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Bottleneck codes (N, Kn, h, w) -> images, down through every stage: each stage's
        dictionary rebuilds its input map; undoing a stage's PCA, pooling (nearest) and sign split
        (z = a - b, moved out by the threshold where either is active) gives the code below it."""
        z = code.permute(0, 2, 3, 1)  # (N, h, w, K)
        sizes = self._map_sizes(self.config)
        for s in reversed(range(len(self.coders))):
            rebuilt = self._decode_stage(s, z, self._input_size(s, sizes))  # stage s's input map
            if s == 0:
                mean, std = 0.5, 0.1  # a code carries no patch's mean or contrast: a typical one
                return (rebuilt * std + mean).permute(0, 3, 1, 2).clamp(0, 1)
            reducer = self.stage_reducers[s - 1]
            pooled = reducer.inverse(rebuilt) if isinstance(reducer, LocalPCA) else rebuilt  # (N, h', w', 2K)
            split = pooled.repeat_interleave(self.config.pool_size, 1).repeat_interleave(self.config.pool_size, 2)
            h, w = sizes[s - 1]
            split = split[:, :h, :w]
            k = split.shape[-1] // 2
            pos, neg = split[..., :k], split[..., k:]
            active = (pos > 0) | (neg > 0)
            z = (pos - neg) + self.threshold * torch.sign(pos - neg) * active
        raise AssertionError("unreachable")

    def _decode_stage(self, s: int, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        coder = self.stage_coders[s]
        if isinstance(coder, GroupedPatchCoder):
            return coder.decode_map(z, size, 2 * self.config.channels[s - 1])
        return coder.decode_map(z, size)

    def _input_size(self, s: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        if s == 0:
            return tuple(self.config.image_size)  # type: ignore[return-value]
        q, (h, w) = self.config.pool_size, sizes[s - 1]
        return -(-h // q), -(-w // q)

    # -- training ----------------------------------------------------------------
    def training_stages(self) -> int:
        return len(self.coders)

    def _stage_input(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """What stage `stage` (0-based) codes: the image, or the stage below's reduced pooled map (N, h, w, C)."""
        if stage == 0:
            return x.permute(0, 2, 3, 1)
        with torch.no_grad():
            *_, pooled = list(self._stages(x, stage))[-1]
            return self.stage_reducers[stage - 1](pooled)

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        """Stage `step.stage`'s loss on random windows of its input map, the stages below frozen."""
        coder = self.stage_coders[step.stage]
        same = x_in is target
        if step.stage > 0:  # the batch is shuffled: its first images are a random part of it
            keep = max(1, math.ceil(len(x_in) * self.config.upper_image_fraction))
            x_in, target = x_in[:keep], target[:keep]
        a = self._stage_input(x_in, step.stage)  # (N, h, w, C)
        b = a if same else self._stage_input(target, step.stage)  # uncorrupted: the same map
        n, h, w, _ = a.shape
        p, per = coder.patch, self.config.patches_per_image
        ys = torch.randint(0, h - p + 1, (n, per), generator=step.generator).to(a.device)
        xs = torch.randint(0, w - p + 1, (n, per), generator=step.generator).to(a.device)
        windows = _windows(a, p, ys, xs)
        return coder.loss(windows, windows if b is a else _windows(b, p, ys, xs))

    @torch.no_grad()
    def begin_stage(self, stage: int, images, indices: np.ndarray, device: torch.device,
                    init_filters: bool = True) -> None:  # fmt: skip
        """Stage `stage`'s data statistics from up to STATISTICS_IMAGES training images: the PCA
        (or the receptive-field groups) of the stage below's pooled maps, the whitening of its
        patches and (when training) its filters' starting points, random whitened patches."""
        picked = evenly_spaced(indices, STATISTICS_IMAGES)
        g = torch.Generator().manual_seed(1000 + stage)
        coder = self.stage_coders[stage]
        if stage > 0:
            locations = self._sample(images, picked, device, stage, g, pooled=True)
            reducer = self.stage_reducers[stage - 1]
            if isinstance(reducer, LocalPCA):
                reducer.fit(locations)
            if isinstance(coder, GroupedPatchCoder):
                coder.choose_groups(locations, g)
            del locations
        grouped = isinstance(coder, GroupedPatchCoder)
        windows = self._sample(images, picked, device, stage, g, pooled=False, grouped=grouped)
        coders = typing.cast(GroupedPatchCoder, coder).group_coders() if grouped else [typing.cast(PatchCoder, coder)]
        parts = typing.cast(GroupedPatchCoder, coder).group_patches(windows) if grouped else [windows.flatten(1)]
        for part_coder, patches in zip(coders, parts):
            floor = CONTRAST_FLOOR if stage == 0 else UPPER_FLOOR * float(patches.var(0).mean())
            random_filters = part_coder.filters.detach().clone()
            part_coder.fit_statistics(patches, floor, g)
            if not init_filters:
                part_coder.filters.copy_(random_filters)

    def statistics_bytes(self, stage: int) -> int:
        """What :meth:`begin_stage` holds at its peak, from the shapes (STATISTICS_IMAGES images):
        the sampled locations with what choosing the groups (or the PCA) adds, or the sampled
        windows with one coder's patches (gathered, normalized, float64, centred twice), each
        beside what sampling them took (a batch of images, one chunk's maps and the responses
        below them), which the allocator may keep. The presets' stage 2: 0.87, 1.55 and 1.62 GB
        (mnist, fashion-mnist, cifar10), measured 0.82, 1.36 and 1.37 (RESULTS.md)."""
        c = self.config
        sizes = self._map_sizes(c)
        h, w = self._input_size(stage, sizes)
        width = c.in_channels if stage == 0 else 2 * c.channels[stage - 1]  # the pooled split maps
        coder = self.stage_coders[stage]
        group = coder.group_size if isinstance(coder, GroupedPatchCoder) else 0
        reduced = c.in_channels if stage == 0 else width if group else (c.reduce_dim or width)
        below = 0 if stage == 0 else math.prod(sizes[stage - 1]) * c.channels[stage - 1] * 3
        sampling = (256 * c.in_channels * math.prod(c.image_size) + _SAMPLE_CHUNK * (h * w * width + below)) * 4
        images = STATISTICS_IMAGES  # each gives the same whole number of windows
        locations = 0
        if stage > 0:
            sample = -(-STATISTICS_PATCHES // images) * images * width * 4
            if group:  # the seeds' correlations, from a few thousand rows in float64 at a time
                locations = sample + 2 * CORRELATION_ROWS * width * 8 + c.groups * width * 8
            else:  # the PCA: a float64 copy of the sample, the covariance and eigh's
                locations = 3 * sample + 3 * width * width * 8
        sampled = -(-(GROUPED_STATISTICS_PATCHES if group else STATISTICS_PATCHES) // images) * images
        patch = coder.patch * coder.patch
        dim = patch * (group or reduced)
        windows = sampled * patch * reduced * 4 + sampled * dim * 32 + 4 * dim * dim * 8
        return sampling + max(locations, windows)

    def _sample(self, images, picked: np.ndarray, device, stage: int, g: torch.Generator, pooled: bool,
                grouped: bool = False) -> torch.Tensor:  # fmt: skip
        """Random p x p windows (M, p, p, C) of stage `stage`'s input (or, with `pooled`, single
        locations (M, C) of the stage below's pooled split maps), gathered batch by batch on the CPU
        into one preallocated tensor (a list of batches, then their concatenation, held the sample
        twice: 1.2 GB more at the peak of CIFAR-10's grouped stage 2)."""
        total = GROUPED_STATISTICS_PATCHES if grouped else STATISTICS_PATCHES
        per = math.ceil(total / len(picked))
        out: torch.Tensor | None = None
        row = 0
        p = 1 if pooled else self.stage_coders[stage].patch
        h, w = self._input_size(stage, self._map_sizes(self.config))  # both maps sampled are this size
        for x in iter_float_batches(images, picked, 256, device):
            # the maps a few images at a time, their windows cut from them at once: 256 images'
            # responses were 1.9 GB at CIFAR-10's stage 1, their pooled maps 0.6 GB at stage 2
            # (14 GB with the default widths at 96 px); the random windows are still drawn per 256
            # images, as before
            ys = torch.randint(0, h - p + 1, (len(x), per), generator=g).to(x.device)
            xs = torch.randint(0, w - p + 1, (len(x), per), generator=g).to(x.device)
            for i in range(0, len(x), _SAMPLE_CHUNK):
                maps = self._sample_maps(x[i : i + _SAMPLE_CHUNK], stage, pooled)
                windows = _windows(maps, p, ys[i : i + len(maps)], xs[i : i + len(maps)])
                windows = windows.flatten(1) if pooled else windows
                if out is None:
                    out = torch.empty((len(picked) * per, *windows.shape[1:]), dtype=torch.float32)
                out[row : row + len(windows)].copy_(windows)
                row += len(windows)
        return typing.cast(torch.Tensor, out)[:row]

    def _sample_maps(self, x: torch.Tensor, stage: int, pooled: bool) -> torch.Tensor:
        """The stage below's pooled split maps (`pooled`), or stage `stage`'s input maps, of images x."""
        if pooled:
            *_, maps = list(self._stages(x, stage))[-1]
            return maps
        return self._stage_input(x, stage)

    def calibrate(self, images, indices: np.ndarray, layers, batch_size: int = 256) -> None:
        """An untrained net: every stage's PCA and whitening measured, its filters left random."""
        device = typing.cast(PatchCoder, self.stage_coders[0]).filters.device
        for stage in range(len(self.coders)):
            self.begin_stage(stage, images, indices, device, init_filters=False)

    def first_layer_filters(self) -> tuple[np.ndarray, str]:
        coder = typing.cast(PatchCoder, self.stage_coders[0])
        c, p = coder.channels, coder.patch
        atoms = (coder.unit_filters().detach() @ coder.unwhiten).view(-1, p, p, c)  # (K, p, p, C): dy, dx, c
        return atoms.float().cpu().numpy(), f"{p}x{p} patches stage1's filters stand for (un-whitened)"


def _windows(maps: torch.Tensor, p: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """The p x p windows of (N, H, W, C) maps at (ys, xs) (N, per): (N * per, p, p, C)."""
    n, per = ys.shape
    offsets = torch.arange(p, device=maps.device)
    rows = (ys[..., None] + offsets)[..., :, None]  # (N, per, p, 1)
    cols = (xs[..., None] + offsets)[..., None, :]  # (N, per, 1, p)
    batch = torch.arange(n, device=maps.device)[:, None, None, None]
    return maps[batch, rows, cols].reshape(n * per, p, p, maps.shape[-1])
