"""Shared fixtures about data paths."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and
# convae, like Python, leaves an ignored Ctrl-C ignored; the Ctrl-C tests need the foreground's
# handler, here and in the processes they start (exec resets a handler, not an ignore).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The read-only real datasets (MNIST, Fashion-MNIST, CIFAR-10): $CONVAE_SHARED or <repo>/../shared/datasets."""
    env = os.environ.get("CONVAE_SHARED")
    path = Path(env) if env else REPO.parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (set CONVAE_SHARED)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch/BLAS thread: with the 2 cores shared, spinning threads make small workloads 10x slower."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
