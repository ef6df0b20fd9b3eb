"""The sparse autoencoder of whitened patches (arch "sparse"): one wide convolution.

Every k x k patch is normalized (its mean removed, divided by its standard deviation) and
ZCA-whitened with statistics measured on the training images before training
(:meth:`SparsePatchAutoencoderNet.begin_stage`; buffers, saved with the weights). The
filters are unit vectors in that whitened space. Training reconstructs random patches from
their `sparse_k` strongest responses through the same filters (tied weights): gradient-descent
k-means when k = 1, as in Coates and Ng's dictionaries and Makhzani and Frey's k-sparse
autoencoders. Layers:

    conv1         (K, H-k+1, W-k+1)   the filters' responses z at every patch position
    conv1.split   (2K, ...)           [relu(z - 0.25), relu(-z - 0.25)], the soft-threshold
                                      encoding that suits classifiers best (Coates and Ng)
    bottleneck    (K, ...)            z with all but the sparse_k strongest filters zeroed

The reconstruction of an image averages its overlapping patches' reconstructions, each
un-whitened and given back its mean and contrast. A code alone carries no patch's mean or
contrast, so :meth:`~SparsePatchAutoencoderNet.decode` uses the training patches' typical ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..tensors import evenly_spaced, full_precision, iter_float_batches
from .base import SPLIT_SUFFIX, AutoencoderNet, FeatureInfo, LayerInfo, TrainStep
from .blocks import CONTRAST_FLOOR, k_sparse, normalized_patches, patch_statistics, sign_split, zca
from .config import ModelConfig

# The sign split of the responses, in whitened units (the filters have unit norm): Coates and
# Ng's soft threshold, alpha = 0.25.
SPARSE_SPLIT_THRESHOLD = 0.25
# The whitening is measured on this many patches of up to this many training images (evenly
# spaced, so a class-sorted file gives every class).
WHITENING_PATCHES = 100_000
WHITENING_IMAGES = 10_000


class SparsePatchAutoencoderNet(AutoencoderNet):
    patch_mean: torch.Tensor  # buffers, measured by fit_whitening
    whiten: torch.Tensor
    unwhiten: torch.Tensor
    typical_contrast: torch.Tensor

    description = "sparse autoencoder of whitened patches (one wide convolution)"
    size_options = ("--widths", "--kernel-size")
    activation_options = ("--batch-size", "--patches-per-image", "--widths")
    config_fields = ("channels", "kernel_size", "sparse_k", "whiten_eps", "patches_per_image")

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "sparse":
            raise ConfigError(f"SparsePatchAutoencoderNet needs arch='sparse', got {config.arch!r}")
        self.config = config
        c, k = config.in_channels, config.kernel_size
        self.patch_dim = c * k * k
        num_filters = config.channels[0]
        self.filters = nn.Parameter(torch.randn(num_filters, self.patch_dim) / math.sqrt(self.patch_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(self.patch_dim))
        self.register_buffer("patch_mean", torch.zeros(self.patch_dim))
        self.register_buffer("whiten", torch.eye(self.patch_dim))
        self.register_buffer("unwhiten", torch.eye(self.patch_dim))
        self.register_buffer("typical_contrast", torch.tensor([0.5, 0.1]))  # a patch's mean, std
        h, w = config.image_size
        self.map_size = (h - k + 1, w - k + 1)
        shape = (num_filters, *self.map_size)
        self.feature_info = FeatureInfo(
            [
                LayerInfo("conv1", num_filters, 1, k, (k - 1) / 2, shape, self.filters.numel()),
                LayerInfo("bottleneck", num_filters, 1, k, (k - 1) / 2, shape, 0),
            ],
            split_of=["conv1"],
        )

    # -- configuration -----------------------------------------------------
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        h, w = config.image_size
        k = config.kernel_size
        if not config.channels:
            raise ConfigError("channels: give at least one stage width, e.g. 32,64,128")
        if len(config.channels) != 1 or config.channels[0] < 1:
            raise ConfigError(
                "arch sparse has one layer: give its number of filters as one width (e.g. 1600), "
                f"got {list(config.channels)}"
            )
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {k}")
        if min(h, w) < k:
            raise ConfigError(
                f"images of {h}x{w} pixels are smaller than the {k}x{k} patches: use a smaller --kernel-size"
            )
        if not 1 <= config.sparse_k <= config.channels[0]:
            raise ConfigError(
                f"sparse_k must be between 1 and the number of filters ({config.channels[0]}), got {config.sparse_k}"
            )
        if not config.whiten_eps > 0:
            raise ConfigError(f"whiten_eps must be positive, got {config.whiten_eps}")
        if config.patches_per_image < 1:
            raise ConfigError(f"patches_per_image must be at least 1, got {config.patches_per_image}")
        if config.code_wta:
            raise ConfigError(
                "code_wta applies to arch conv; arch sparse has its own sparsity (sparse_k), so leave it 0"
            )

    @classmethod
    def check_train_config(cls, train) -> None:
        if train.loss != "mse":
            raise ConfigError(
                f"loss {train.loss}: the sparse autoencoder reconstructs whitened patches, whose values are not "
                "intensities in [0, 1]; use loss mse"
            )

    @classmethod
    def default_settings(cls, image_shape, settings: dict, overrides: dict) -> dict:
        # Coates et al.'s single layer: 1,600 filters of 5x5 patches (6x6 there; kernels here are odd)
        smallest = min(image_shape[:2])
        return {**settings, "channels": (1600,), "kernel_size": min(5, smallest - (smallest % 2 == 0))}

    @classmethod
    def code_shape(cls, config: ModelConfig) -> tuple[int, ...]:
        h, w = config.image_size
        k = config.kernel_size
        return (config.channels[0], h - k + 1, w - k + 1)

    # -- whitening -----------------------------------------------------------
    def fit_whitening(self, batches, patches_per_image: int = 10, seed: int = 0) -> None:
        """Measure the patch statistics on float image batches (N, C, H, W) in [0, 1]; no labels."""
        mean, second_moment, contrast = patch_statistics(batches, self.config.kernel_size, patches_per_image, seed)
        whiten, unwhiten = zca(mean, second_moment, self.config.whiten_eps)
        self.patch_mean.copy_(mean.float())
        self.whiten.copy_(whiten)
        self.unwhiten.copy_(unwhiten)
        self.typical_contrast.copy_(contrast.float())

    def begin_stage(self, stage: int, images, indices: np.ndarray, device: torch.device, batch_size: int = 256) -> None:
        """The patch whitening, measured on up to WHITENING_IMAGES of `images[indices]` before training."""
        picked = evenly_spaced(indices, WHITENING_IMAGES)
        batches = iter_float_batches(images, picked, batch_size, device)
        self.fit_whitening(batches, patches_per_image=math.ceil(WHITENING_PATCHES / len(picked)))

    def calibrate(self, images, indices: np.ndarray, layers, batch_size: int = 256) -> None:
        """An untrained sparse net gets its whitening measured, as its training would."""
        self.begin_stage(0, images, indices, self.filters.device, batch_size)

    def _unit_filters(self) -> torch.Tensor:
        return self.filters / self.filters.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def dictionary_images(self) -> torch.Tensor:
        """The filters as the normalized patches they reconstruct (un-whitened): (K, C, k, k)."""
        c, k = self.config.in_channels, self.config.kernel_size
        atoms = self._unit_filters().detach() @ self.unwhiten
        return atoms.view(-1, c, k, k)

    def first_layer_filters(self) -> tuple[np.ndarray, str]:
        w = self.dictionary_images().float().cpu()  # (K, C, k, k)
        return w.permute(
            0, 2, 3, 1
        ).numpy(), f"{w.shape[-2]}x{w.shape[-1]} patches conv1's filters stand for (un-whitened)"

    # -- passes --------------------------------------------------------------
    def _contrast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each patch position's mean and floored standard deviation: (N, 1, H-k+1, W-k+1) twice."""
        k, d = self.config.kernel_size, self.patch_dim
        box = x.new_full((1, x.shape[1], k, k), 1.0 / d)
        mean = F.conv2d(x, box)
        var = (F.conv2d(x * x, box) - mean * mean).clamp_min(0)  # population variance: defined for 1-value patches too
        return mean, torch.sqrt(var + CONTRAST_FLOOR)

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> z (N, K, H-k+1, W-k+1): each normalized, whitened patch times each filter.

        The patches are unfolded and normalized explicitly, then multiplied by the filters in
        one matmul, which leaves z channels-last in memory: about three times the throughput of a
        convolution followed by per-position corrections of its K-channel output.
        """
        k = self.config.kernel_size
        n, _, height, width = x.shape
        detectors = self._unit_filters() @ self.whiten  # (K, d): whitening folded into the filters
        with full_precision(x.device.type):  # normalization divides by small stds: fp32
            patches = F.unfold(x.float(), k).transpose(1, 2)  # (N, L, d)
            centred = normalized_patches(patches) - self.patch_mean
            z = centred @ detectors.T  # (N, L, K)
        # (N, L, K) -> (N, K, h, w), a channels-last view
        return z.view(n, height - k + 1, width - k + 1, -1).permute(0, 3, 1, 2)

    def _intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        z = self.responses(x)
        out = {}
        if "conv1" in wanted:
            out["conv1"] = z
        if "conv1" + SPLIT_SUFFIX in wanted:
            out["conv1" + SPLIT_SUFFIX] = sign_split(z, SPARSE_SPLIT_THRESHOLD)  # (N, K, h, w) -> (N, 2K, h, w)
        if "bottleneck" in wanted:
            out["bottleneck"] = k_sparse(z, self.config.sparse_k)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return k_sparse(self.responses(x), self.config.sparse_k)

    def _fold(self, patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Whitened patch reconstructions (N, L, d) -> the image: un-whitened, given each patch's
        mean and contrast back, overlaps averaged."""
        k = self.config.kernel_size
        normalized = (patches + self.decoder_bias) @ self.unwhiten + self.patch_mean
        pixels = normalized * std.flatten(2).transpose(1, 2) + mean.flatten(2).transpose(1, 2)  # (N, L, d)
        size = self.config.image_size
        summed = F.fold(pixels.transpose(1, 2), size, k)
        overlaps = F.fold(torch.ones_like(pixels[:1]).transpose(1, 2), size, k)
        return (summed / overlaps).clamp(0, 1)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Codes (N, K, H-k+1, W-k+1) -> images, with the training patches' typical mean and contrast."""
        n = code.shape[0]
        mean = code.new_full((n, 1, *self.map_size), float(self.typical_contrast[0]))
        std = code.new_full((n, 1, *self.map_size), float(self.typical_contrast[1]))
        return self._fold(code.flatten(2).transpose(1, 2) @ self._unit_filters(), mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1], the input's shape."""
        code = self.encode(x)
        mean, std = self._contrast(x)
        return self._fold(code.flatten(2).transpose(1, 2) @ self._unit_filters(), mean, std)

    # -- training --------------------------------------------------------------
    def sample_positions(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Random patch positions for a training step: (batch, patches_per_image) indices of the maps."""
        h, w = self.map_size
        return torch.randint(0, h * w, (batch, self.config.patches_per_image), generator=generator)

    def patch_loss(self, x_in: torch.Tensor, target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """MSE of the whitened target patches rebuilt from the input patches' sparse_k strongest responses."""
        k = self.config.kernel_size
        positions = positions.to(x_in.device)

        def whitened(x: torch.Tensor) -> torch.Tensor:
            cols = F.unfold(x.float(), k)  # (B, d, L)
            p = cols.gather(2, positions[:, None, :].expand(-1, cols.shape[1], -1)).transpose(1, 2)
            return (normalized_patches(p.reshape(-1, self.patch_dim)) - self.patch_mean) @ self.whiten

        with full_precision(x_in.device.type):  # whitened statistics want fp32
            filters = self._unit_filters()
            code = k_sparse(whitened(x_in) @ filters.T, self.config.sparse_k)  # (n, K)
            return F.mse_loss(code @ filters + self.decoder_bias, whitened(target))

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        return self.patch_loss(x_in, target, self.sample_positions(len(x_in), step.generator))
