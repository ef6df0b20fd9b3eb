"""`ConvAutoencoder`: the object users hold in Python, a scikit-learn transformer."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import _check_feature_names_in, check_array, check_is_fitted, validate_data

from . import run as rundir
from .config import DataConfig, TrainConfig
from .data import LazyImages, as_uint8_images
from .errors import DataError
from .features import FeatureExtractor, auto_batch_size, plan_blocks
from .features.plan import check_precision
from .models import ModelConfig, build_model, default_model_config
from .tensors import allow_bf16, iter_uint8_batches, resolve_device, to_float_nchw
from .train import fit as train_fit

_MODEL_PARAMS = [f.name for f in fields(ModelConfig) if f.name not in ("in_channels", "image_size")]
_TRAIN_PARAMS = [f.name for f in fields(TrainConfig)]


class InputError(DataError, ValueError):
    """X that cannot be read as images: a ValueError for scikit-learn, a one-line DataError for the CLI."""


class ConvAutoencoder(TransformerMixin, BaseEstimator):
    """A convolutional autoencoder trained without labels; its encoder gives the features.

    ``fit(X)`` trains on images; ``transform(X)`` gives the features of the encoder layers
    `layers` ("bottleneck", "stage2,bottleneck", "all", a conv block's sign split such as
    "stage2.conv1.split"; see ``convae layers``) pooled by
    `pool` ("flatten", "avg", "max", "grid2", "grid4", or several joined by commas), one row per
    image, named by :meth:`get_feature_names_out`. ``inverse_transform`` decodes bottleneck codes
    (``layers="bottleneck", pool="flatten"``) back to images; ``score`` is the negative
    reconstruction MSE. Every constructor argument is a plain parameter, so ``clone``,
    ``set_params`` and ``GridSearchCV`` over the architecture work; `None` architecture settings
    are chosen from the image size. ``arch="sparse"`` is the single-layer sparse autoencoder of
    whitened patches (:class:`convae.models.sparse.SparsePatchAutoencoderNet`; layers ``conv1``,
    ``conv1.split``, ``bottleneck``; `channels` one number of filters, `kernel_size` the patch
    side, `sparse_k`, `whiten_eps` and `patches_per_image` its own settings). ``amp=True`` (the default) trains in bf16 autocast where the
    device computes bf16 natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX),
    about twice as fast there; ``amp=False`` trains in fp32. Features and reconstructions are
    computed in fp32, except the hierarchical sparse net's (``arch="hsparse"``) products in bf16
    where the device has native bf16 (see `precision`).

    X is uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) (the layouts of
    :func:`convae.data.as_uint8_images`), :class:`convae.data.LazyImages`, or a 2-D table of
    flattened images: rows of `image_shape` (H, W, C) values in ``X.reshape(len(X), -1)`` order
    when given, otherwise square grayscale images, zero-padded to the next square when the row
    length is not one (so any table can be read). Integers are pixel values 0..255. Floats in
    [0, 1] are intensities; floats that ``fit`` sees outside [0, 1] are rescaled by the minimum
    and maximum it saw (``input_range_``), and later ones are clipped to that range. The network
    sees images quantized to 8 bits, as training does.

    Fitted attributes: ``model_`` (the torch module, in eval mode on CPU), ``config_``
    (RunConfig), ``history_`` (one dict per epoch), ``image_shape_`` (H, W, C), ``input_range_``,
    ``input_format_`` ("images" or "table": the layout ``inverse_transform`` and ``reconstruct``
    return), ``n_features_in_`` and, for DataFrames, ``feature_names_in_``.

    Parameters
    ----------
    arch : str
        "conv" (the ConvAE), "dense" (fully-connected baseline), "sparse" (whitened patches),
        "hsparse" (stages of whitened k-sparse patch coders, trained greedily);
        see ``convae.models.registry.ARCHITECTURES``.
    channels, convs_per_stage, kernel_size, norm, activation, downsample, upsample, decoder,
    bottleneck, latent_channels, latent_dim, hidden, code_wta, sparse_k, whiten_eps, patches_per_image,
    upper_kernel, pool_size, reduce_dim, split_threshold, groups, group_size, upper_image_fraction
        Architecture settings (:class:`convae.ModelConfig`'s fields); None: chosen from the image size.
    epochs, max_time, batch_size, lr, weight_decay, warmup, schedule, loss, noise, mask_ratio,
    mask_patch, val_fraction, seed, device, threads, amp, channels_last, on_nan
        Training settings (:class:`convae.TrainConfig`'s fields).
    layers : str
        Encoder layers ``transform`` returns (default "bottleneck").
    pool : str
        Their pooling (default "flatten").
    precision : {"auto", "float32"}
        "auto" (the default) lets ``transform``, ``reconstruct`` and ``score`` multiply in bf16
        where the device computes it natively (the hierarchical sparse net's products; features
        within 1% of a standard deviation of fp32's); "float32" keeps them fp32, the same on every
        machine.
    image_shape : (H, W, C), optional
        How to read the rows of a 2-D table.
    verbose : bool
        Progress bars.

    Examples
    --------
    >>> import convae
    >>> train = convae.load_dataset("digits", "train")
    >>> ae = convae.ConvAutoencoder(epochs=1, layers="stage2", pool="grid2").fit(train.images)
    >>> ae.transform(train.images[:5]).shape
    (5, 256)

    scikit-learn's ``check_estimator`` passes with no check tagged away or expected to fail. Tags:
    ``three_d_array`` (grayscale images come as (N, H, W)) and ``preserves_dtype = ["float32"]``
    (features are always float32, the network's precision, so float64 input is not preserved).
    Pickling stores the weights as safetensors bytes: a pickle loads without CUDA and runs no
    code from the weights. ``save`` writes a run directory; it keeps the model and its settings,
    not ``input_range_`` (pickle the estimator to keep a range learned from float tables).
    """

    def __init__(
        self,
        *,
        arch="conv",
        channels=None,
        convs_per_stage=None,
        kernel_size=None,
        norm=None,
        activation=None,
        downsample=None,
        upsample=None,
        decoder=None,
        bottleneck=None,
        latent_channels=None,
        latent_dim=None,
        hidden=None,
        code_wta=None,
        sparse_k=None,
        whiten_eps=None,
        patches_per_image=None,
        upper_kernel=None,
        pool_size=None,
        reduce_dim=None,
        split_threshold=None,
        groups=None,
        group_size=None,
        upper_image_fraction=None,
        epochs=TrainConfig.epochs,
        max_time=TrainConfig.max_time,
        batch_size=TrainConfig.batch_size,
        lr=TrainConfig.lr,
        weight_decay=TrainConfig.weight_decay,
        warmup=TrainConfig.warmup,
        schedule=TrainConfig.schedule,
        loss=TrainConfig.loss,
        noise=TrainConfig.noise,
        mask_ratio=TrainConfig.mask_ratio,
        mask_patch=TrainConfig.mask_patch,
        val_fraction=TrainConfig.val_fraction,
        seed=TrainConfig.seed,
        device=TrainConfig.device,
        threads=TrainConfig.threads,
        amp=TrainConfig.amp,
        channels_last=TrainConfig.channels_last,
        on_nan=TrainConfig.on_nan,
        layers="bottleneck",
        pool="flatten",
        precision="auto",
        image_shape=None,
        verbose=False,
    ):
        self.arch = arch
        self.channels = channels
        self.convs_per_stage = convs_per_stage
        self.kernel_size = kernel_size
        self.norm = norm
        self.activation = activation
        self.downsample = downsample
        self.upsample = upsample
        self.decoder = decoder
        self.bottleneck = bottleneck
        self.latent_channels = latent_channels
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.code_wta = code_wta
        self.sparse_k = sparse_k
        self.whiten_eps = whiten_eps
        self.patches_per_image = patches_per_image
        self.upper_kernel = upper_kernel
        self.pool_size = pool_size
        self.reduce_dim = reduce_dim
        self.split_threshold = split_threshold
        self.groups = groups
        self.group_size = group_size
        self.upper_image_fraction = upper_image_fraction
        self.epochs = epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.schedule = schedule
        self.loss = loss
        self.noise = noise
        self.mask_ratio = mask_ratio
        self.mask_patch = mask_patch
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.threads = threads
        self.amp = amp
        self.channels_last = channels_last
        self.on_nan = on_nan
        self.layers = layers
        self.pool = pool
        self.precision = precision
        self.image_shape = image_shape
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    # -- configuration -----------------------------------------------------
    def _model_config(self, image_shape) -> ModelConfig:
        overrides = {name: getattr(self, name) for name in _MODEL_PARAMS}
        for name in ("channels", "hidden"):
            if overrides[name] is not None:
                overrides[name] = tuple(int(v) for v in overrides[name])
        return default_model_config(image_shape, **overrides)

    def _train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in _TRAIN_PARAMS})

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    # -- input -------------------------------------------------------------
    def _table_shape(self, n_features: int) -> tuple[int, int, int]:
        """The image a row of `n_features` values is read as (padded when not square)."""
        if self.image_shape is not None:
            shape = tuple(int(v) for v in self.image_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise InputError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape!r}")
            if math.prod(shape) != n_features:
                raise InputError(
                    f"X has {n_features} features per row, but image_shape {shape} holds {math.prod(shape)}"
                )
            return shape
        side = math.isqrt(n_features)
        side += side * side < n_features
        if side < 2:
            raise InputError(f"X has {n_features} feature(s) per row: too few to read as an image")
        return (side, side, 1)

    def _images(self, X, *, reset: bool):
        """X as uint8 (N, H, W, C) images or LazyImages; `reset` records what fit saw."""
        if reset:
            for name in ("feature_names_in_", "n_features_in_"):
                self.__dict__.pop(name, None)
        if isinstance(X, LazyImages):
            images, fmt, kind = X, "images", "u"
        else:
            if isinstance(X, torch.Tensor):
                X = X.detach().cpu().numpy()
            min_samples = 2 if reset else 1  # an autoencoder needs a train/val split
            ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
            if ndim <= 2:  # a table (1-D X fails here with scikit-learn's "Reshape your data")
                arr = validate_data(self, X, reset=reset, dtype="numeric", ensure_min_samples=min_samples)
                fmt = "table"
            else:
                arr = check_array(
                    X,
                    allow_nd=True,
                    ensure_2d=False,
                    dtype="numeric",
                    ensure_min_samples=min_samples,
                    input_name="X",
                )
                if arr.ndim not in (3, 4):
                    raise InputError(
                        f"X has shape {arr.shape}: pass images (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        "or a 2-D table of flattened images"
                    )
                fmt = "images"
            kind = arr.dtype.kind
            if kind == "f":
                arr = self._unit_range(arr, reset)
            if fmt == "table":
                shape = self._table_shape(arr.shape[1]) if reset else self.image_shape_
                arr = _rows_to_images(arr, shape)
            try:
                images = as_uint8_images(arr)
            except DataError as e:
                raise InputError(str(e)) from e
        shape = tuple(int(s) for s in images.shape[1:])
        if reset:
            self.image_shape_ = shape
            self.input_format_ = fmt
            if fmt == "images":
                self.n_features_in_ = math.prod(shape)
            if kind != "f":
                self.input_range_ = (0.0, 1.0)
        elif shape != self.image_shape_:
            raise InputError(
                f"X has images of shape {shape} (H, W, C) but {type(self).__name__} was fitted on {self.image_shape_}"
            )
        return images

    def _unit_range(self, arr: np.ndarray, reset: bool) -> np.ndarray:
        """Floats mapped to [0, 1] by `input_range_` (learned here when `reset`), as float32."""
        if reset:
            lo, hi = float(arr.min()), float(arr.max())
            self.input_range_ = (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1)
        lo, hi = self.input_range_
        out = np.empty(arr.shape, dtype=np.float32)
        for s in range(0, len(arr), 4096):  # chunked, to bound the temporaries
            out[s : s + 4096] = np.clip((arr[s : s + 4096] - lo) / (hi - lo), 0, 1)
        return out

    def _extractor(self, layers=None, pool=None) -> FeatureExtractor:
        check_is_fitted(self, "model_")
        return FeatureExtractor(
            self.model_,
            self.layers if layers is None else layers,
            self.pool if pool is None else pool,
            device=self._device(),
            precision=self.precision,
        )

    # -- fitting -----------------------------------------------------------
    def fit(
        self,
        X,
        y=None,
        *,
        run_dir=None,
        data_spec: str = "",
        resume: bool = False,
        on_nan: str | None = None,
        force: bool = False,
    ):
        """Train on images X (see the class docstring for what X may be). `y` is ignored.

        With `run_dir`, checkpoint every epoch into that run directory (`resume` continues it,
        with its saved settings; `on_nan` given here replaces its NaN policy). A `run_dir` that
        holds other files but no run is refused unless `force` (the files are then kept).
        """
        images = self._images(X, reset=True)
        n, h, w, c = images.shape
        model_config = self._model_config((h, w, c))
        with torch.device("meta"):  # shapes only: a model too large for memory is refused by fit, not built here
            plan_blocks(build_model(model_config), self.layers, self.pool)  # bad layers fail before training
        check_precision(self.precision)  # nor a bad precision
        result = train_fit(
            images,
            model_config,
            self._train_config(),
            run_dir=run_dir,
            data_config=DataConfig(spec=data_spec, image_size=(h, w), channels=c, num_images=n),
            resume=resume,
            progress=bool(self.verbose),
            on_nan=on_nan,
            force=force,
        )
        self._set_fitted(result.model, result.config, result.history)
        return self

    def _set_fitted(self, model, config, history) -> None:
        self.model_ = model.to("cpu").eval()
        self.config_ = config
        self.history_ = list(history)
        self.image_shape_ = (*config.model.image_size, config.model.in_channels)
        self.__dict__.setdefault("input_format_", "images")
        self.__dict__.setdefault("input_range_", (0.0, 1.0))
        self.__dict__.setdefault("n_features_in_", math.prod(self.image_shape_))

    # -- features ----------------------------------------------------------
    def transform(self, X) -> np.ndarray:
        """Features of X: float32 (N, n_features_out), pooled `layers` concatenated in network order."""
        extractor = self._extractor()
        return extractor.transform(self._images(X, reset=False), progress=bool(self.verbose))

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names like ``stage2/grid4/c12_g1_1``: layer / pooling / channel and grid cell (or y, x)."""
        check_is_fitted(self, "model_")
        _check_feature_names_in(self, input_features, generate_names=False)
        return np.asarray(self._extractor().feature_names, dtype=object)

    def encode(self, X) -> np.ndarray:
        """Bottleneck codes of X, flattened: float32 (N, code_size), whatever `layers` and `pool` are."""
        return self._extractor("bottleneck", "flatten").transform(self._images(X, reset=False))

    @torch.inference_mode()
    def inverse_transform(self, X) -> np.ndarray:
        """Decode bottleneck codes (the output of transform with layers="bottleneck", pool="flatten").

        Returns float32 images in [0, 1]: (N, H, W, C), or rows of ``n_features_in_`` values
        when fit was given a 2-D table.
        """
        check_is_fitted(self, "model_")
        blocks = plan_blocks(self.model_, self.layers, self.pool)
        if [(b.layer, b.pool) for b in blocks] != [("bottleneck", "flatten")]:
            raise ValueError(
                f"inverse_transform decodes bottleneck codes, but layers={self.layers!r}, pool={self.pool!r}: "
                "set layers='bottleneck' and pool='flatten'"
            )
        codes = check_array(X, dtype=np.float32)
        code_shape = self.model_.layer_shape("bottleneck")
        if codes.shape[1] != blocks[0].dim:
            raise ValueError(f"X has {codes.shape[1]} features, but the bottleneck code has {blocks[0].dim}")
        device = self._device()
        model = self.model_.to(device)
        out = np.empty((len(codes), *self.image_shape_), dtype=np.float32)
        step = auto_batch_size(model, device)  # the decoder's largest map is the encoder's first one
        for s in range(0, len(codes), step):
            code = torch.from_numpy(codes[s : s + step]).to(device).view(-1, *code_shape)
            out[s : s + step] = model.decode(code).float().permute(0, 2, 3, 1).cpu().numpy()
        return self._as_input_format(out)

    def _as_input_format(self, images: np.ndarray) -> np.ndarray:
        if self.input_format_ == "table":
            return images.reshape(len(images), -1)[:, : self.n_features_in_]
        return images

    # -- reconstruction ----------------------------------------------------
    @torch.inference_mode()
    def _reconstruction_batches(self, X):
        """(inputs, reconstructions) as float (B, C, H, W) in [0, 1], batch by batch."""
        check_is_fitted(self, "model_")
        images = self._images(X, reset=False)
        device = self._device()
        model = self.model_.to(device)
        for batch in iter_uint8_batches(images, np.arange(len(images)), auto_batch_size(model, device)):
            x = to_float_nchw(batch, device)
            with allow_bf16(self.precision == "auto"):  # set and reset within the step, not across a yield
                reconstruction = model(x).float()
            yield x, reconstruction

    def reconstruct(self, X) -> np.ndarray:
        """Reconstructions of X as float32 in [0, 1]: (N, H, W, C), or rows when fit was given a table."""
        out = [r.permute(0, 2, 3, 1).cpu().numpy() for _, r in self._reconstruction_batches(X)]
        return self._as_input_format(np.concatenate(out))

    def score(self, X, y=None) -> float:
        """Negative mean squared reconstruction error on [0, 1] intensities (higher is better)."""
        total, count = 0.0, 0
        for x, r in self._reconstruction_batches(X):
            total += float((r - x).pow(2).sum())
            count += x.numel()
        return -total / count

    # -- persistence -------------------------------------------------------
    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ returns the live __dict__
        model = state.pop("model_", None)
        if model is not None:
            state["_weights"] = save_safetensors(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            )
        return state

    def __setstate__(self, state):
        weights = state.pop("_weights", None)
        super().__setstate__(state)
        if weights is not None:
            model = build_model(self.config_.model)
            model.load_state_dict(load_safetensors(weights), strict=True)
            self.model_ = model.eval()

    def save(self, run_dir) -> Path:
        """Write config.json, model.safetensors and history.csv into `run_dir`."""
        check_is_fitted(self, "model_")
        run_dir = Path(run_dir)
        rundir.save_weights(run_dir / rundir.WEIGHTS_FILE, self.model_)
        rundir.write_history(run_dir / rundir.HISTORY_FILE, self.history_)
        rundir.save_config(run_dir, self.config_)
        return run_dir

    @classmethod
    def load(cls, run_dir, device: str = "cpu", **params) -> ConvAutoencoder:
        """The estimator of a run directory, fitted, with its settings as parameters.

        `params` set the others, e.g. ``layers="stage2", pool="grid4"``.
        """
        model, config = rundir.load_model(run_dir, device="cpu")
        settings = {name: getattr(config.model, name) for name in _MODEL_PARAMS}
        settings.update({name: getattr(config.train, name) for name in _TRAIN_PARAMS})
        settings["device"] = device
        settings.update(params)
        est = cls(**settings)
        est._set_fitted(model, config, rundir.read_history(run_dir))
        return est


def _rows_to_images(rows: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, D) rows -> (N, H, W, C) images, zero-padded at the end when D < H*W*C."""
    n, d = rows.shape
    size = math.prod(shape)
    if d != size:
        padded = np.zeros((n, size), dtype=rows.dtype)
        padded[:, :d] = rows
        rows = padded
    return rows.reshape(n, *shape)
