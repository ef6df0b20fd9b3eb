"""The model card: what was trained, on what, how long it took, how well it reconstructs."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..models import code_size
from ..train import evaluate


def model_card(model, config, ctx) -> dict:
    """The card's tables: architecture rows, model and training (name, value) pairs, reconstruction rows."""
    m, t, history = config.model, config.train, ctx.history or []
    h, w = m.image_size
    seconds = float(np.nansum([r.get("seconds", np.nan) for r in history]))
    last = history[-1] if history else {}
    rates = [r["images_per_s"] for r in history if "images_per_s" in r]
    _, sample = ctx.sample()
    device = next(model.parameters()).device
    metrics = evaluate(model, sample, np.arange(len(sample)), device, channels_last=False)
    settings = asdict(m)
    model_items = [
        ("architecture", model.description),
        ("input (H x W x C)", f"{h} x {w} x {m.in_channels}"),
        ("code size (bottleneck values)", code_size(m)),
        ("parameters", sum(p.numel() for p in model.parameters())),
        *((k, settings[k]) for k in model.fields_used(m)),  # only the settings this net reads
    ]
    train_items = [
        ("trained on", config.data.spec or "an array"),
        ("training images", config.data.num_images),
        ("epochs run", int(last.get("epoch", 0))),
        ("steps", int(last.get("step", 0))),
        ("training time", f"{seconds:.1f} s"),
        ("throughput", f"{np.mean(rates):.0f} images/s" if rates else "-"),
        *asdict(t).items(),
    ]
    name = getattr(ctx.data, "name", "data")
    recon = [
        dict(data=f"{name} ({len(sample)} images)", mse=metrics["mse"], psnr=metrics["psnr"], ssim=metrics["ssim"])
    ]
    if history:
        recon.append(
            dict(
                data="validation split, last epoch",
                mse=last.get("val_mse"),
                psnr=last.get("val_psnr"),
                ssim=last.get("val_ssim"),
            )
        )
    return dict(
        architecture=model.describe(),
        model=model_items,
        training=train_items,
        reconstruction=recon,
        trained_by=config.convae_version,
    )
