"""Reconstruction metrics on images in [0, 1]: MSE, PSNR and SSIM, per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (recon.float() - target.float()).pow(2).flatten(1).mean(1)


def psnr_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = mse_per_image(recon, target).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, shrunk for small images)."""
    x, y = recon.float(), target.float()
    channels = x.shape[1]
    size = min(11, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd window
    sigma = 1.5 * size / 11
    window = _gaussian_window(size, sigma, x.device).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
