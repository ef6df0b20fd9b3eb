"""`ConvAutoencoder`: the object users hold in Python, a scikit-learn style estimator."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .config import DataConfig, TrainConfig
from .data import LazyImages, as_uint8_images
from .model import ModelConfig, default_model_config

_MODEL_PARAMS = [f.name for f in fields(ModelConfig) if f.name not in ("in_channels", "image_size")]
_TRAIN_PARAMS = [f.name for f in fields(TrainConfig)]


class ConvAutoencoder(TransformerMixin, BaseEstimator):
    """A convolutional autoencoder trained without labels; its encoder gives the features.

    Every constructor argument is a plain parameter (scikit-learn convention);
    `None` means "chosen from the image size" for the architecture settings.

    Fitted attributes: `model_` (the torch module), `config_` (RunConfig),
    `history_` (one dict per epoch), `n_features_in_`, `image_shape_`.
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
        bottleneck=None,
        latent_channels=None,
        latent_dim=None,
        hidden=None,
        epochs=0,
        max_time=0.0,
        batch_size=128,
        lr=2e-3,
        weight_decay=1e-4,
        warmup=0.05,
        schedule="cosine",
        loss="mse",
        noise=0.0,
        mask_ratio=0.0,
        mask_patch=0,
        val_fraction=0.05,
        seed=0,
        device="auto",
        threads=0,
        amp=True,
        channels_last=True,
        layers="bottleneck",
        pool="flatten",
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
        self.bottleneck = bottleneck
        self.latent_channels = latent_channels
        self.latent_dim = latent_dim
        self.hidden = hidden
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
        self.layers = layers
        self.pool = pool
        self.verbose = verbose

    # -- configuration -----------------------------------------------------
    def _model_config(self, image_shape) -> ModelConfig:
        overrides = {name: getattr(self, name) for name in _MODEL_PARAMS}
        for name in ("channels", "hidden"):
            if overrides[name] is not None:
                overrides[name] = tuple(int(v) for v in overrides[name])
        return default_model_config(image_shape, **overrides)

    def _train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in _TRAIN_PARAMS})

    # -- fitting -----------------------------------------------------------
    def fit(self, X, y=None, *, run_dir=None, data_spec: str = "", resume: bool = False):
        """Train on images X (uint8 or float in [0, 1]; NHWC, NCHW or NHW). `y` is ignored."""
        from .train import fit as train_fit

        images = X if isinstance(X, LazyImages) else as_uint8_images(X)
        n, h, w, c = images.shape
        model_config = self._model_config((h, w, c))
        result = train_fit(
            images,
            model_config,
            self._train_config(),
            run_dir=run_dir,
            data_config=DataConfig(spec=data_spec, image_size=(h, w), channels=c, num_images=n),
            resume=resume,
            progress=bool(self.verbose),
        )
        self._set_fitted(result.model, result.config, result.history)
        return self

    def _set_fitted(self, model, config, history) -> None:
        self.model_ = model.to("cpu").eval()
        self.config_ = config
        self.history_ = list(history)
        self.image_shape_ = (*config.model.image_size, config.model.in_channels)
        self.n_features_in_ = int(np.prod(self.image_shape_))

    def _device(self) -> torch.device:
        from .train import resolve_device

        return resolve_device(self.device)

    def _batches(self, X, batch_size: int = 256):
        """Float (B, C, H, W) batches in [0, 1] on the estimator's device, checked against the fitted shape."""
        from .train import to_input

        check_is_fitted(self, "model_")
        images = as_uint8_images(X)
        if images.shape[1:] != self.image_shape_:
            raise ValueError(
                f"X has images of shape {images.shape[1:]} (H, W, C) but the model was fitted on {self.image_shape_}"
            )
        device = self._device()
        for start in range(0, len(images), batch_size):
            yield to_input(torch.from_numpy(images[start : start + batch_size]), device, False)

    @torch.inference_mode()
    def reconstruct(self, X) -> np.ndarray:
        """Reconstructions of X as float32 (N, H, W, C) in [0, 1]."""
        model = self.model_.to(self._device())
        out = [model(x).float().permute(0, 2, 3, 1).cpu().numpy() for x in self._batches(X)]
        return np.concatenate(out) if out else np.zeros((0, *self.image_shape_), np.float32)

    @torch.inference_mode()
    def encode(self, X) -> np.ndarray:
        """Bottleneck codes of X, flattened: float32 (N, code_size)."""
        model = self.model_.to(self._device())
        out = [model.encode(x).float().flatten(1).cpu().numpy() for x in self._batches(X)]
        return np.concatenate(out)

    def score(self, X, y=None) -> float:
        """Negative mean squared reconstruction error (higher is better)."""
        images = as_uint8_images(X).astype(np.float32) / 255
        return -float(np.mean((self.reconstruct(images) - images) ** 2))

    # -- persistence -------------------------------------------------------
    def save(self, run_dir) -> Path:
        """Write config.json, model.safetensors and history.csv into `run_dir`."""
        from . import run as rundir

        check_is_fitted(self, "model_")
        run_dir = Path(run_dir)
        rundir.save_weights(run_dir / rundir.WEIGHTS_FILE, self.model_)
        rundir.write_history(run_dir / rundir.HISTORY_FILE, self.history_)
        rundir.save_config(run_dir, self.config_)
        return run_dir

    @classmethod
    def load(cls, run_dir, device: str = "cpu") -> "ConvAutoencoder":
        """The estimator of a run directory, fitted, with its settings as parameters."""
        from . import run as rundir

        model, config = rundir.load_model(run_dir, device="cpu")
        params = {name: getattr(config.model, name) for name in _MODEL_PARAMS}
        params.update({name: getattr(config.train, name) for name in _TRAIN_PARAMS})
        params["device"] = device
        est = cls(**params)
        est._set_fitted(model, config, rundir.read_history(run_dir))
        return est

