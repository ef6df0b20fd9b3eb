"""Reconstruction quality over a set of images: MSE, PSNR and SSIM."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..features import auto_batch_size
from ..metrics import mse_per_image, psnr_per_image, ssim_per_image
from ..tensors import iter_uint8_batches, to_float_nchw


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int | None = None,
    channels_last: bool = True,
) -> dict[str, float]:
    """Mean reconstruction MSE, PSNR (dB) and SSIM over `images[indices]` (batches sized to the model by default)."""
    if len(indices) == 0:
        return {"mse": float("nan"), "psnr": float("nan"), "ssim": float("nan")}
    batch_size = batch_size or auto_batch_size(model, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in iter_uint8_batches(images, indices, batch_size):
        x = to_float_nchw(batch, device, channels_last=channels_last)
        recon = model(x).float()
        metrics = [mse_per_image(recon, x).sum(), psnr_per_image(recon, x).sum(), ssim_per_image(recon, x).sum()]
        sums += torch.stack(metrics).cpu().double()
    model.train(was_training)
    mse, psnr, ssim = (sums / len(indices)).tolist()
    return {"mse": mse, "psnr": psnr, "ssim": ssim}
