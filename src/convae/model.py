"""The convolutional autoencoders (and the fully-connected baseline), in one file.

arch="conv": encoder = stages of `convs_per_stage` conv blocks followed by a 2x
downsampling; then a bottleneck; the decoder mirrors it. Every encoder layer has a
stable name (`stage1.conv1`, `stage1`, ..., `bottleneck`) listed in `feature_info`
with its channels, stride and receptive field, as timm models do. Each conv block
also offers its sign-split maps (`stage1.conv1.split`, see `sign_split`) as a
feature layer.

arch="sparse": one wide convolution over contrast-normalized, whitened patches,
trained as a k-sparse autoencoder of those patches (`SparsePatchAutoencoderNet`):
layers `conv1`, `conv1.split`, `bottleneck`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

Arch = Literal["conv", "dense", "sparse"]
Norm = Literal["batch", "group", "none"]
Activation = Literal["relu", "leaky_relu", "gelu", "silu", "elu"]
Downsample = Literal["max", "avg", "stride"]
Upsample = Literal["nearest", "bilinear", "transpose"]
Bottleneck = Literal["conv", "dense"]
Decoder = Literal["mirror", "light"]


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "conv"
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # (H, W) the model was built for
    channels: tuple[int, ...] = (32, 64, 128)  # one entry per encoder stage
    convs_per_stage: int = 1
    kernel_size: int = 3
    norm: Norm = "batch"
    activation: Activation = "relu"
    downsample: Downsample = "max"
    upsample: Upsample = "nearest"
    # "mirror": each decoder stage upsamples, then convolves at the finer size (the encoder
    # mirrored). "light": it convolves first, at the coarser size (a quarter of the pixels),
    # then upsamples: the decoder's FLOPs fall about fourfold, so training sees more images a
    # minute, and the encoder's features are what the decoder is for.
    decoder: Decoder = "mirror"
    bottleneck: Bottleneck = "conv"
    latent_channels: int = 0  # conv bottleneck: 0 keeps the last stage's maps as the code
    latent_dim: int = 128  # dense bottleneck, and the code size of arch="dense"
    hidden: tuple[int, ...] = (512,)  # arch="dense": hidden layer widths
    # Winner-take-all sparsity of the code the decoder sees (conv arch; features are unaffected):
    # each code map keeps only its largest value per image, and each channel only its top
    # `code_wta` fraction of the batch's images. 0: off. Makhzani & Frey's conv WTA autoencoder.
    code_wta: float = 0.0
    # arch="sparse" (channels = (filters,), kernel_size = the patch side): filters kept per patch
    # when reconstructing it (the k of a k-sparse autoencoder), the ZCA whitening's eigenvalue
    # floor, and random patches each training image gives per step.
    sparse_k: int = 1
    whiten_eps: float = 0.1
    patches_per_image: int = 16

    # Fields added after config.json files were first written: what such a file meant.
    LEGACY_DEFAULTS: ClassVar[dict] = {"decoder": "mirror"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ConfigError(f"image size {h}x{w} must be positive")
        if self.in_channels < 1:
            raise ConfigError(f"channels must be at least 1, got {self.in_channels}")
        if self.arch == "dense":
            if self.latent_dim < 1 or any(u < 1 for u in self.hidden):
                raise ConfigError("dense autoencoder: latent_dim and hidden widths must be positive")
            if self.code_wta:
                raise ConfigError("code_wta applies to the conv autoencoder; the dense baseline ignores it, so leave it 0")
            return
        if not self.channels:
            raise ConfigError("channels: give at least one stage width, e.g. 32,64,128")
        if self.arch == "sparse":
            self._validate_sparse()
            return
        if any(c < 1 for c in self.channels):
            raise ConfigError(f"channels must be positive, got {list(self.channels)}")
        if self.convs_per_stage < 1:
            raise ConfigError(f"convs_per_stage must be at least 1, got {self.convs_per_stage}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if not 0 <= self.code_wta <= 1:
            raise ConfigError(f"code_wta must be a fraction in [0, 1], got {self.code_wta}")
        if self.latent_channels < 0 or self.latent_dim < 1:
            raise ConfigError("latent_channels must be >= 0 and latent_dim >= 1")
        sizes = stage_sizes(self.image_size, len(self.channels))
        for i, (sh, sw) in enumerate(sizes[:-1], start=1):
            if sh < 2 or sw < 2:
                usable = max_stages(self.image_size)
                if usable == 0:
                    raise ConfigError(
                        f"images of {h}x{w} pixels are too small for a convolutional autoencoder (it needs "
                        "at least 2x2): use larger images, or resize them (--image-size 28)"
                    )
                raise ConfigError(
                    f"image size {h}x{w} is too small for {len(self.channels)} stages "
                    f"(stage {i} would get {sh}x{sw}; each stage halves the size): "
                    f"use at most {usable} stage(s) or larger images"
                )

    def _validate_sparse(self) -> None:
        h, w = self.image_size
        k = self.kernel_size
        if len(self.channels) != 1 or self.channels[0] < 1:
            raise ConfigError(
                f"arch sparse has one layer: give its number of filters as one width (e.g. 1600), got {list(self.channels)}"
            )
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {k}")
        if min(h, w) < k:
            raise ConfigError(f"images of {h}x{w} pixels are smaller than the {k}x{k} patches: use a smaller --kernel-size")
        if not 1 <= self.sparse_k <= self.channels[0]:
            raise ConfigError(f"sparse_k must be between 1 and the number of filters ({self.channels[0]}), got {self.sparse_k}")
        if not self.whiten_eps > 0:
            raise ConfigError(f"whiten_eps must be positive, got {self.whiten_eps}")
        if self.patches_per_image < 1:
            raise ConfigError(f"patches_per_image must be at least 1, got {self.patches_per_image}")
        if self.code_wta:
            raise ConfigError("code_wta applies to arch conv; arch sparse has its own sparsity (sparse_k), so leave it 0")

    @property
    def num_stages(self) -> int:
        return len(self.channels) if self.arch == "conv" else 0


def stage_sizes(image_size: Sequence[int], num_stages: int) -> list[tuple[int, int]]:
    """Spatial size at the input of each stage, then after the last one.

    Downsampling rounds up (ceil mode), so odd sizes lose no pixels.
    """
    h, w = image_size
    sizes = [(h, w)]
    for _ in range(num_stages):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def max_stages(image_size: Sequence[int]) -> int:
    n = 0
    while all(s >= 2 for s in stage_sizes(image_size, n + 1)[n]):
        n += 1
    return n


def default_model_config(image_shape: Sequence[int], **overrides) -> ModelConfig:
    """Settings that suit the image size: stages until about 4x4, widths that grow with depth."""
    h, w, c = image_shape
    smallest = min(h, w)
    stages = int(round(math.log2(max(smallest, 1) / 4))) if smallest >= 4 else 1
    stages = max(1, min(stages if smallest > 8 else 2, 5, max_stages((h, w))))
    base = 32 if c == 1 else 64
    channels = tuple(min(base * 2**i, 256) for i in range(stages))
    settings = dict(in_channels=c, image_size=(h, w), channels=channels)
    if overrides.get("arch") == "sparse":
        # Coates et al.'s single layer: 1,600 filters of 5x5 patches (6x6 there; kernels here are odd)
        settings.update(channels=(1600,), kernel_size=min(5, smallest - (smallest % 2 == 0)))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    arch = settings.get("arch", "conv")
    if arch == "dense" and "latent_dim" not in overrides:
        # Comparable code size: the conv model's code, but never more than half the pixels.
        conv = ModelConfig(**{**settings, "arch": "conv"})
        settings["latent_dim"] = max(2, min(code_size(conv), (h * w * c) // 2))
    return ModelConfig(**settings)


def code_size(config: ModelConfig) -> int:
    """Number of values in the bottleneck code."""
    if config.arch == "sparse":
        h, w = config.image_size
        k = config.kernel_size
        return config.channels[0] * (h - k + 1) * (w - k + 1)
    if config.arch == "dense" or config.bottleneck == "dense":
        return config.latent_dim
    h, w = stage_sizes(config.image_size, config.num_stages)[-1]
    return (config.latent_channels or config.channels[-1]) * h * w


def _activation(name: str) -> nn.Module:
    return {
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=True),
        "elu": lambda: nn.ELU(inplace=True),
    }[name]()


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """conv (same padding) -> norm -> activation."""

    def __init__(self, cin: int, cout: int, config: ModelConfig, stride: int = 1):
        k = config.kernel_size if stride == 1 else 3
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=config.norm == "none"),
            _norm(config.norm, cout),
            _activation(config.activation),
        )


class EncoderStage(nn.Module):
    """conv1..convN, then 2x downsampling (`pool` or a strided `down` conv)."""

    def __init__(self, cin: int, cout: int, config: ModelConfig):
        super().__init__()
        self.conv_names = [f"conv{j}" for j in range(1, config.convs_per_stage + 1)]
        for j, name in enumerate(self.conv_names):
            self.add_module(name, ConvBlock(cin if j == 0 else cout, cout, config))
        if config.downsample == "max":
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
        elif config.downsample == "avg":
            self.pool = nn.AvgPool2d(2, ceil_mode=True)
        else:
            self.pool = ConvBlock(cout, cout, config, stride=2)


class DecoderStage(nn.Module):
    """Upsample to the mirrored encoder stage's input size, then convs ("light": convs, then upsample)."""

    def __init__(self, cin: int, cout: int, config: ModelConfig):
        super().__init__()
        self.mode = config.upsample
        self.convs_first = config.decoder == "light"
        up_channels = cout if self.convs_first else cin
        self.up = nn.ConvTranspose2d(up_channels, up_channels, 2, stride=2) if self.mode == "transpose" else None
        self.convs = nn.Sequential(
            *[ConvBlock(cin if j == 0 else cout, cout, config) for j in range(config.convs_per_stage)]
        )

    def upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)[..., : size[0], : size[1]]  # (N, C, 2h, 2w) cropped to the encoder's size
        align = False if self.mode == "bilinear" else None
        return F.interpolate(x, size=size, mode=self.mode, align_corners=align)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.convs_first:
            return self.upsample(self.convs(x), size)  # (N, cout, h, w) -> (N, cout, size)
        return self.convs(self.upsample(x, size))


# A conv block's sign-split maps: its normalized pre-activation z as [relu(z - t), relu(-z - t)].
# The block's own ReLU drops everything below the channel's learned threshold; the split keeps
# the strong negative responses too, and the margin t (in units of the batch-normalized z) keeps
# weak responses of either sign out, so average-pooled regions stay sparse (Coates & Ng's
# polarity-split soft threshold). Measured: CIFAR-10 +1.5 points over the same layers' outputs.
SPLIT_SUFFIX = ".split"
SPLIT_THRESHOLD = 0.5


def sign_split(z: torch.Tensor, threshold: float = SPLIT_THRESHOLD) -> torch.Tensor:
    """(N, C, ...) -> (N, 2C, ...): [relu(z - t), relu(-z - t)], in z's memory format.

    Without autograd both halves are written in place into one buffer: split maps are an
    extraction's largest tensors (1,600 channels for the cifar10 preset), and temporaries
    and a concatenation cost it most of its time."""
    if z.requires_grad:  # out= buffers have no backward
        return torch.cat([F.relu(z - threshold), F.relu(-z - threshold)], dim=1)
    c = z.shape[1]
    channels_last = z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((z.shape[0], 2 * c, *z.shape[2:]), dtype=z.dtype, device=z.device, memory_format=layout)
    torch.sub(z, threshold, out=out[:, :c]).clamp_(min=0)
    torch.add(z, threshold, out=out[:, c:]).neg_().clamp_(min=0)
    return out


def winner_take_all(code: torch.Tensor, rate: float) -> torch.Tensor:
    """Spatial then lifetime winner-take-all: the decoder must rebuild the image from a few
    strong, shift-tolerant activations, which makes the encoder's units part detectors."""
    if code.dim() == 4:
        peaks = code.amax(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        code = code * (code >= peaks)
        strength = peaks.flatten(1)  # (N, C)
    else:
        strength = code
    k = max(1, math.ceil(rate * code.shape[0]))
    threshold = strength.topk(k, dim=0).values[-1:]  # (1, C): the k-th strongest image per channel
    keep = (strength >= threshold).to(code.dtype)
    return code * keep.view(*keep.shape, *([1] * (code.dim() - 2)))


class ConvAutoencoderNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "conv":
            raise ConfigError(f"ConvAutoencoderNet needs arch='conv', got {config.arch!r}")
        self.config = config
        chs = config.channels
        self.encoder = nn.ModuleDict()
        for i, cout in enumerate(chs):
            cin = config.in_channels if i == 0 else chs[i - 1]
            self.encoder[f"stage{i + 1}"] = EncoderStage(cin, cout, config)

        last_h, last_w = stage_sizes(config.image_size, len(chs))[-1]
        if config.bottleneck == "dense":
            flat = chs[-1] * last_h * last_w
            self.to_code = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.latent_dim))
            self.from_code = nn.Sequential(
                nn.Linear(config.latent_dim, flat),
                _activation(config.activation),
                nn.Unflatten(1, (chs[-1], last_h, last_w)),
            )
        elif config.latent_channels:
            self.to_code = nn.Conv2d(chs[-1], config.latent_channels, 1)
            self.from_code = nn.Sequential(
                nn.Conv2d(config.latent_channels, chs[-1], 1), _activation(config.activation)
            )
        else:
            self.to_code = nn.Identity()
            self.from_code = nn.Identity()

        self.decoder = nn.ModuleList()
        for i in reversed(range(len(chs))):
            cout = chs[i - 1] if i > 0 else chs[0]
            self.decoder.append(DecoderStage(chs[i], cout, config))
        self.head = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)
        self.feature_info = self._feature_info()

    # -- layer bookkeeping -------------------------------------------------
    def _layer_sequence(self):
        """(name, module) in forward order; a stage's name is its pooled output."""
        for stage_name, stage in self.encoder.items():
            for conv_name in stage.conv_names:
                yield f"{stage_name}.{conv_name}", getattr(stage, conv_name)
            yield stage_name, stage.pool
        yield "bottleneck", self.to_code

    def _feature_info(self) -> list[dict]:
        cfg = self.config
        rf, jump, start = 1, 1, 0.0  # receptive field, stride, centre of unit 0 (input pixels)
        h, w = cfg.image_size
        info = []
        for name, module in self._layer_sequence():
            if name == "bottleneck":
                if cfg.bottleneck == "dense":
                    rf, start = max(cfg.image_size), (cfg.image_size[0] - 1) / 2
                    shape = [cfg.latent_dim]
                else:
                    shape = [cfg.latent_channels or cfg.channels[-1], h, w]
            elif "." in name:  # a same-padded conv
                rf += (cfg.kernel_size - 1) * jump
                shape = [module[0].out_channels, h, w]
            else:  # the stage's 2x downsampling
                if cfg.downsample == "stride":
                    rf += 2 * jump
                else:
                    rf += jump
                    start += jump / 2
                jump *= 2
                h, w = math.ceil(h / 2), math.ceil(w / 2)
                shape = [info[-1]["num_chs"], h, w]
            info.append(
                dict(
                    module=name,
                    num_chs=shape[0],
                    reduction=jump,
                    receptive_field=rf,
                    rf_start=start,
                    shape=shape,
                    params=sum(p.numel() for p in module.parameters()),
                )
            )
        return info

    @property
    def layer_names(self) -> list[str]:
        return [f["module"] for f in self.feature_info]

    @property
    def split_layer_names(self) -> list[str]:
        """`stage1.conv1.split` ...: each conv block's sign-split maps (see :data:`SPLIT_THRESHOLD`)."""
        return [f"{f['module']}{SPLIT_SUFFIX}" for f in self.feature_info if "." in f["module"]]

    def _unknown_layers(self, names) -> ConfigError:
        valid = self.layer_names + self.split_layer_names
        return ConfigError(f"unknown layer(s) {', '.join(sorted(names))}: choose from {', '.join(valid)}")

    def layer_shape(self, name: str) -> list[int]:
        """Output shape [C, H, W] of a layer of `layer_names` or `split_layer_names`."""
        base = name[: -len(SPLIT_SUFFIX)] if name.endswith(SPLIT_SUFFIX) else name
        info = next((f for f in self.feature_info if f["module"] == base), None)
        if info is None or (base != name and name not in self.split_layer_names):
            raise self._unknown_layers([name])
        c, *hw = info["shape"]
        return [2 * c if base != name else c, *hw]

    def receptive_box(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """Input region (top, left, bottom, right; exclusive, clipped) seen by unit (y, x) of `layer`
        (a split layer's units see what its block's do)."""
        if layer in self.split_layer_names:
            layer = layer.removesuffix(SPLIT_SUFFIX)
        info = next((f for f in self.feature_info if f["module"] == layer), None)
        if info is None:
            raise self._unknown_layers([layer])
        half = info["receptive_field"] / 2
        cy = info["rf_start"] + y * info["reduction"]
        cx = info["rf_start"] + x * info["reduction"]
        h, w = self.config.image_size
        top, left = math.ceil(cy - half + 0.5), math.ceil(cx - half + 0.5)
        bottom, right = top + info["receptive_field"], left + info["receptive_field"]
        return max(top, 0), max(left, 0), min(bottom, h), min(right, w)

    # -- forward passes ----------------------------------------------------
    def forward_intermediates(
        self, x: torch.Tensor, layers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Outputs of the named encoder layers; stops after the deepest one asked for."""
        wanted = set(layers)
        unknown = wanted - set(self.layer_names) - set(self.split_layer_names)
        if unknown:
            raise self._unknown_layers(unknown)
        out: dict[str, torch.Tensor] = {}
        for name, module in self._layer_sequence():
            split = name + SPLIT_SUFFIX
            if split in wanted:
                conv, norm, act = module
                z = norm(conv(x))
                out[split] = sign_split(z)  # (N, C, H, W) -> (N, 2C, H, W)
                if len(out) == len(wanted):
                    break
                x = act(z)
            else:
                x = module(x)  # stage pools: (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        sizes = []
        for stage in self.encoder.values():
            sizes.append((x.shape[-2], x.shape[-1]))
            for conv_name in stage.conv_names:
                x = getattr(stage, conv_name)(x)
            x = stage.pool(x)
        return self.to_code(x), sizes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the bottleneck code."""
        return self._encode(x)[0]

    def decode_logits(self, code: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None):
        if sizes is None:
            sizes = stage_sizes(self.config.image_size, self.config.num_stages)[:-1]
        x = self.from_code(code)
        for stage, size in zip(self.decoder, reversed(sizes)):
            x = stage(x, size)  # (N, C_i, h, w) -> (N, C_{i-1}, H_i, W_i): the mirrored input size
        return self.head(x)  # (N, in_channels, H, W)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(code))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        code, sizes = self._encode(x)
        if self.config.code_wta:
            code = winner_take_all(code, self.config.code_wta)
        return self.decode_logits(code, sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1], the input's exact shape."""
        return torch.sigmoid(self.forward_logits(x))


# Patch contrast normalization: each patch less its mean, divided by its standard deviation
# with this floor (Coates et al.'s 10 on the 0-255 scale), so flat patches are not blown up.
CONTRAST_FLOOR = 10 / 255**2
# The sparse model's sign split of its responses, in whitened units (its filters have unit
# norm): Coates and Ng's soft threshold, alpha = 0.25.
SPARSE_SPLIT_THRESHOLD = 0.25


def k_sparse(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep, along dim 1, the k responses of largest magnitude; zero the rest."""
    if k >= z.shape[1]:
        return z
    magnitude = z.abs()
    kth = magnitude.topk(k, dim=1).values.narrow(1, k - 1, 1)
    return z * (magnitude >= kth)


class SparsePatchAutoencoderNet(nn.Module):
    """One wide convolution over contrast-normalized, whitened patches, trained as a k-sparse autoencoder.

    Every k x k patch is normalized (its mean removed, divided by its standard deviation) and
    ZCA-whitened with statistics measured on the training images before training
    (:meth:`fit_whitening`; buffers, saved with the weights). The filters are unit vectors in
    that whitened space. Training reconstructs random patches from their `sparse_k` strongest
    responses through the same filters (tied weights): gradient-descent k-means when k = 1, as
    in Coates and Ng's dictionaries and Makhzani and Frey's k-sparse autoencoders. Layers:

        conv1         (K, H-k+1, W-k+1)   the filters' responses z at every patch position
        conv1.split   (2K, ...)           [relu(z - 0.25), relu(-z - 0.25)], the soft-threshold
                                          encoding that suits classifiers best (Coates and Ng)
        bottleneck    (K, ...)            z with all but the sparse_k strongest filters zeroed

    The reconstruction of an image averages its overlapping patches' reconstructions, each
    un-whitened and given back its mean and contrast. A code alone carries no patch's mean
    or contrast, so :meth:`decode` uses the training patches' typical ones.
    """

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
        shape = [num_filters, *self.map_size]
        common = dict(num_chs=num_filters, reduction=1, receptive_field=k, rf_start=(k - 1) / 2, shape=shape)
        self.feature_info = [
            dict(module="conv1", params=self.filters.numel(), **common),
            dict(module="bottleneck", params=0, **common),
        ]

    layer_names = property(lambda self: ["conv1", "bottleneck"])
    split_layer_names = property(lambda self: ["conv1" + SPLIT_SUFFIX])

    def layer_shape(self, name: str) -> list[int]:
        if name not in self.layer_names + self.split_layer_names:
            raise ConfigError(f"unknown layer {name!r}: choose from {', '.join(self.layer_names + self.split_layer_names)}")
        c = self.config.channels[0]
        return [2 * c if name.endswith(SPLIT_SUFFIX) else c, *self.map_size]

    def receptive_box(self, layer: str, y: int = 0, x: int = 0) -> tuple[int, int, int, int]:
        self.layer_shape(layer)
        k = self.config.kernel_size
        return y, x, y + k, x + k

    # -- whitening -----------------------------------------------------------
    def _normalized_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., d) patches -> contrast-normalized."""
        centred = patches - patches.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.var(-1, keepdim=True, correction=0) + CONTRAST_FLOOR)

    @torch.no_grad()
    def fit_whitening(self, batches: Iterable[torch.Tensor], patches_per_image: int = 10, seed: int = 0) -> None:
        """Measure the patch statistics on float image batches (N, C, H, W) in [0, 1]; no labels.

        `patches_per_image` random patches of every image, contrast-normalized, give the mean
        and covariance (summed in float64, batch by batch) of the ZCA whitening.
        """
        g = torch.Generator().manual_seed(seed)
        k = self.config.kernel_size
        sums = torch.zeros(self.patch_dim, dtype=torch.float64)
        outer = torch.zeros(self.patch_dim, self.patch_dim, dtype=torch.float64)
        contrast = torch.zeros(2, dtype=torch.float64)
        count = 0
        per_image = patches_per_image
        for x in batches:
            x = x.float().cpu()
            cols = F.unfold(x, k)  # (N, d, L)
            pick = torch.randint(0, cols.shape[2], (len(x), per_image), generator=g)
            p = cols.gather(2, pick[:, None, :].expand(-1, cols.shape[1], -1)).transpose(1, 2).reshape(-1, self.patch_dim)
            contrast += torch.stack([p.mean(1).sum(), p.std(1, correction=0).sum()]).double()
            p = self._normalized_patches(p).double()
            sums += p.sum(0)
            outer += p.T @ p
            count += len(p)
        if count < 2:
            raise ConfigError("fit_whitening: no images to measure the patch statistics on")
        mean = sums / count
        cov = outer / count - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(0) + self.config.whiten_eps
        self.patch_mean.copy_(mean.float())
        self.whiten.copy_((eigvecs * eigvals.rsqrt()) @ eigvecs.T)
        self.unwhiten.copy_((eigvecs * eigvals.sqrt()) @ eigvecs.T)
        self.typical_contrast.copy_((contrast / count).float())

    def _unit_filters(self) -> torch.Tensor:
        return self.filters / self.filters.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def dictionary_images(self) -> torch.Tensor:
        """The filters as the normalized patches they reconstruct (un-whitened): (K, C, k, k)."""
        c, k = self.config.in_channels, self.config.kernel_size
        atoms = self._unit_filters().detach() @ self.unwhiten
        return atoms.view(-1, c, k, k)

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
        with torch.autocast(x.device.type, enabled=False):  # normalization divides by small stds: fp32
            patches = F.unfold(x.float(), k).transpose(1, 2)  # (N, L, d)
            centred = self._normalized_patches(patches) - self.patch_mean
            z = centred @ detectors.T  # (N, L, K)
        # (N, L, K) -> (N, K, h, w), a channels-last view
        return z.view(n, height - k + 1, width - k + 1, -1).permute(0, 3, 1, 2)

    def forward_intermediates(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        wanted = set(layers)
        unknown = wanted - set(self.layer_names) - set(self.split_layer_names)
        if unknown:
            valid = self.layer_names + self.split_layer_names
            raise ConfigError(f"unknown layer(s) {', '.join(sorted(unknown))}: choose from {', '.join(valid)}")
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
            return (self._normalized_patches(p.reshape(-1, self.patch_dim)) - self.patch_mean) @ self.whiten

        with torch.autocast(x_in.device.type, enabled=False):  # whitened statistics want fp32
            filters = self._unit_filters()
            code = k_sparse(whitened(x_in) @ filters.T, self.config.sparse_k)  # (n, K)
            return F.mse_loss(code @ filters + self.decoder_bias, whitened(target))


class DenseAutoencoderNet(nn.Module):
    """Fully-connected baseline: flattens the image, so it loses spatial context."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, w = config.image_size
        self.shape = (config.in_channels, h, w)
        d = config.in_channels * h * w
        widths = [d, *config.hidden]
        self.encoder = nn.ModuleDict()
        for i in range(len(config.hidden)):
            layers = [nn.Linear(widths[i], widths[i + 1])]
            if config.norm == "batch":
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(_activation(config.activation))
            self.encoder[f"fc{i + 1}"] = nn.Sequential(*layers)
        self.encoder["bottleneck"] = nn.Linear(widths[-1], config.latent_dim)
        dec = []
        back = [config.latent_dim, *reversed(config.hidden)]
        for i in range(len(config.hidden)):
            dec += [nn.Linear(back[i], back[i + 1]), _activation(config.activation)]
        dec.append(nn.Linear(back[-1], d))
        self.decoder = nn.Sequential(*dec)
        full = max(h, w)
        self.feature_info = [
            dict(
                module=name,
                num_chs=m[0].out_features if isinstance(m, nn.Sequential) else m.out_features,
                reduction=None,
                receptive_field=full,
                rf_start=(h - 1) / 2,
                shape=[m[0].out_features if isinstance(m, nn.Sequential) else m.out_features],
                params=sum(p.numel() for p in m.parameters()),
            )
            for name, m in self.encoder.items()
        ]

    @property
    def layer_names(self) -> list[str]:
        return list(self.encoder.keys())

    @property
    def split_layer_names(self) -> list[str]:
        return []  # sign splits are of conv blocks

    def layer_shape(self, name: str) -> list[int]:
        info = next((f for f in self.feature_info if f["module"] == name), None)
        if info is None:
            raise ConfigError(f"unknown layer {name!r}: choose from {', '.join(self.layer_names)}")
        return list(info["shape"])

    def receptive_box(self, layer: str, y: int = 0, x: int = 0) -> tuple[int, int, int, int]:
        return 0, 0, self.config.image_size[0], self.config.image_size[1]

    def forward_intermediates(self, x, layers):
        wanted = set(layers)
        unknown = wanted - set(self.layer_names)
        if unknown:
            raise ConfigError(
                f"unknown layer(s) {', '.join(sorted(unknown))}: choose from {', '.join(self.layer_names)}"
            )
        out = {}
        x = x.flatten(1)  # (N, C, H, W) -> (N, C*H*W)
        for name, module in self.encoder.items():
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def encode(self, x):
        x = x.flatten(1)
        for module in self.encoder.values():
            x = module(x)
        return x

    def decode_logits(self, code, sizes=None):
        return self.decoder(code).view(-1, *self.shape)  # (N, D) -> (N, C, H, W)

    def decode(self, code):
        return torch.sigmoid(self.decode_logits(code))

    def forward_logits(self, x):
        return self.decode_logits(self.encode(x))

    def forward(self, x):
        return torch.sigmoid(self.forward_logits(x))


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch == "dense":
        return DenseAutoencoderNet(config)
    if config.arch == "sparse":
        return SparsePatchAutoencoderNet(config)
    return ConvAutoencoderNet(config)


def with_image_shape(config: ModelConfig, image_shape: Sequence[int]) -> ModelConfig:
    h, w, c = image_shape
    return replace(config, image_size=(h, w), in_channels=c)


def depth_layers(model: nn.Module) -> list[str]:
    """One layer per depth: every stage's output and the bottleneck (every layer of the dense model).

    When the bottleneck is the last stage's maps as they are (no latent layer), that stage is
    left out: it would repeat the bottleneck.
    """
    info = [f for f in model.feature_info if "." not in f["module"]]
    if len(info) >= 2 and model.config.arch == "conv":
        last, code = info[-2:]
        if code["module"] == "bottleneck" and code["params"] == 0 and code["shape"] == last["shape"]:
            info.remove(last)
    return [f["module"] for f in info]


def describe(model: nn.Module) -> list[dict]:
    """One row per encoder layer, then decoder and totals: what `convae info` prints."""
    rows = []
    for f in model.feature_info:
        rows.append(
            dict(
                layer=f["module"],
                shape="x".join(str(s) for s in f["shape"]),
                channels=f["num_chs"],
                stride=f["reduction"] if f["reduction"] is not None else "-",
                receptive_field=f["receptive_field"],
                params=f["params"],
            )
        )
    enc = sum(f["params"] for f in model.feature_info)
    total = sum(p.numel() for p in model.parameters())
    rows.append(dict(layer="decoder", shape="", channels="", stride="", receptive_field="", params=total - enc))
    rows.append(dict(layer="total", shape="", channels="", stride="", receptive_field="", params=total))
    return rows

