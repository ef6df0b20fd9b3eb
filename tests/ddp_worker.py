"""Run by torchrun from test_distributed.py: trains on digits, then saves this rank's weights."""

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from convae import distributed
from convae.config import TrainConfig
from convae.models import default_model_config
from convae.train import fit

out = Path(sys.argv[1])
images = (load_digits().images[:600] * 255 / 16).round().astype(np.uint8)[..., None]
result = fit(
    images,
    default_model_config((8, 8, 1)),
    TrainConfig(epochs=2, batch_size=32, noise=0.1, seed=5),
    run_dir=out / "run",
)
rank = distributed.env_info().rank
torch.save({k: v.clone() for k, v in result.model.state_dict().items()}, out / f"rank{rank}.pt")
distributed.shutdown()
