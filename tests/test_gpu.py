"""GPU paths: skipped on machines without CUDA (CI has none); run them where a GPU is."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from convae.config import TrainConfig
from convae.features import FeatureExtractor
from convae.models import default_model_config
from convae.run import load_model
from convae.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def digits():
    return (load_digits().images * 255 / 16).round().astype(np.uint8)[..., None]


def test_cuda_training_with_amp_loads_on_cpu(digits, tmp_path):
    cfg = default_model_config((8, 8, 1))
    # noise and masks are drawn on the host and copied over, as every batch is
    train = TrainConfig(epochs=3, device="cuda", amp=True, noise=0.1, mask_ratio=0.2)
    result = fit(digits, cfg, train, run_dir=tmp_path / "run")
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    model, _ = load_model(tmp_path / "run", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), result.model.float().cpu().eval()(x).numpy(), atol=1e-5)


def test_cuda_extraction_matches_cpu(digits, tmp_path):
    cfg = default_model_config((8, 8, 1))
    result = fit(digits[:256], cfg, TrainConfig(epochs=1, device="cpu"))
    cpu = FeatureExtractor(result.model, "stage1,bottleneck", "grid2", device="cpu").transform(digits[:64])
    gpu = FeatureExtractor(result.model, "stage1,bottleneck", "grid2", device="cuda").transform(digits[:64])
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
