"""Two CPU processes with gloo, launched by torchrun as a user would."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from convae.run import load_model

HERE = Path(__file__).parent
CONVAE = str(Path(sys.executable).parent / "convae")


def test_ddp_ranks_end_with_identical_weights_and_a_valid_run(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model, config = load_model(tmp_path / "run")
    saved = model.state_dict()
    for key in a:
        assert torch.equal(saved[key], a[key]), key
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs, written once (by rank 0)


def test_nproc_run_killed_then_resumed_matches_an_uninterrupted_one(tmp_path):
    args = ["fit", "digits", "--nproc", "2", "--epochs", "3", "--batch-size", "64", "--seed", "2", "-q"]
    whole = subprocess.run(
        [CONVAE, *args, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    cut = tmp_path / "cut"
    # A job scheduler kills the whole process group: torchrun and its workers.
    proc = subprocess.Popen(
        [CONVAE, *args, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while not (cut / "checkpoint" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"

    resumed = subprocess.run(
        [CONVAE, *args, "--out", str(cut), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sharded_extraction_reads_as_the_single_process_result(tmp_path):
    from convae.data import load_dataset
    from convae.estimator import ConvAutoencoder

    run = tmp_path / "run"  # trained in this process: the extraction is what runs in subprocesses
    ConvAutoencoder(epochs=1, seed=0).fit(load_dataset("digits", "train").images, run_dir=run, data_spec="digits")
    # both on CPU: on a 1-GPU machine the two ranks run on CPU while a single process would take the GPU
    common = [
        "extract",
        str(run),
        "digits:test",
        "--layers",
        "stage1,bottleneck",
        "--pool",
        "grid2",
        "-q",
        "--device",
        "cpu",
    ]
    single = subprocess.run(
        [CONVAE, *common, "-o", str(tmp_path / "one.npy")], capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "convae",
            *common,
            "-o",
            str(tmp_path / "sharded.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("sharded.*")) == [
        "sharded.rank0-of-2.index.csv",
        "sharded.rank0-of-2.labels.npy",
        "sharded.rank0-of-2.npy",
        "sharded.rank1-of-2.index.csv",
        "sharded.rank1-of-2.labels.npy",
        "sharded.rank1-of-2.npy",
    ]
    import convae  # the public name the README gives

    one_file, both_file = convae.load_features(tmp_path / "one.npy"), convae.load_features(tmp_path / "sharded.npy")
    (one, one_labels), (both, both_labels) = one_file, both_file
    np.testing.assert_allclose(both, one, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both_labels, one_labels)
    assert both_file.index.index.tolist() == one_file.index.index.tolist() == list(range(len(one)))  # rows' sources

    # convae probe reads the shards as one result
    probe = subprocess.run(
        [
            CONVAE,
            "probe",
            str(run),
            "--train",
            str(tmp_path / "sharded.npy"),
            "--test",
            str(tmp_path / "one.npy"),
            "-o",
            str(tmp_path / "r.json"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["features"] == "sharded" and rows[0]["accuracy"] > 0.5

    (tmp_path / "sharded.rank1-of-2.npy").unlink()
    broken = subprocess.run(
        [
            CONVAE,
            "probe",
            str(run),
            "--train",
            str(tmp_path / "sharded.npy"),
            "--test",
            str(tmp_path / "one.npy"),
            "-o",
            str(tmp_path / "r2.json"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert broken.returncode == 2 and "Traceback" not in broken.stderr


def test_more_processes_than_gpus_run_on_cpu_or_stop_with_a_message(monkeypatch):
    """NCCL cannot share a GPU between processes: 2 ranks on a 1-GPU node."""
    from convae import distributed
    from convae.errors import ConvaeError
    from convae.tensors import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")
    info = distributed.env_info()
    assert distributed.process_device(torch.device("cpu"), info) == torch.device("cpu")
    with pytest.raises(ConvaeError, match=r"2 processes on this node need a GPU each, but it has 1"):
        distributed.process_device(torch.device("cuda"), info)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node, on several nodes
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(target: list[str], cwd: Path) -> None:
    """`target` (a script and its arguments, or `-m convae ...`) on two torchrun "nodes" on this machine,
    started as the README's multi-node command starts them on two hosts: the same command on each
    (c10d rendezvous at one node's address; here one gloo process each). No --node_rank: c10d
    ranks the nodes in the order they join and ignores it (torchrun warns that it does)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "convae-test", *target,
    ]  # fmt: skip
    procs = []
    for _node in (0, 1):
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def test_two_nodes_train_extract_and_probe_together(tmp_path):
    """The multi-node path end to end, through the CLI: two "nodes" run `convae fit` as one job and
    end with identical weights, `convae extract` writes a shard per rank, and `convae probe` fits
    the features read from those shards."""
    from convae.distributed import weights_digest

    run = tmp_path / "run"
    fit = ["fit", "digits", "--out", str(run), "--epochs", "2", "--batch-size", "32", "--seed", "5", "--device", "cpu"]
    _two_nodes(["-m", "convae", *fit, "-q"], tmp_path)
    model, _ = load_model(run)
    # Rank 0 alone writes the run; every rank's digest of its own weights, gathered at each
    # epoch's end (fit stops if they differ), is kept in the checkpoint beside rank 0's weights.
    checkpoint = torch.load(run / "checkpoint" / "last.pt", weights_only=True)
    assert checkpoint["replicas"] == [weights_digest(model)] * 2
    assert len((run / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs, written once
    for split in ("train", "test"):
        args = ["extract", str(run), f"digits:{split}", "--layers", "stage1", "--pool", "grid2", "--device", "cpu"]
        _two_nodes(["-m", "convae", *args, "-q", "-o", str(tmp_path / f"{split}.npy")], tmp_path)
        shards = sorted(p.name for p in tmp_path.glob(f"{split}.rank*-of-2.npy"))
        assert shards == [f"{split}.rank0-of-2.npy", f"{split}.rank1-of-2.npy"]
    import convae

    train, _ = convae.load_features(tmp_path / "train.npy")
    direct = convae.FeatureExtractor(model, "stage1", "grid2").transform(convae.load_dataset("digits", "train").images)
    np.testing.assert_allclose(train, direct, rtol=1e-5, atol=1e-6)  # the shards, in image order
    probe = subprocess.run(
        [CONVAE, "probe", str(run), "--train", str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy"),
         "-o", str(tmp_path / "probe.json"), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    import json

    (row,) = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert row["dim"] == direct.shape[1] and row["accuracy"] > 0.8


def test_replicas_that_differ_stop_training_with_one_line(tmp_path):
    from convae.distributed import check_replicas, weights_digest
    from convae.errors import ConvaeError
    from convae.models import build_model, default_model_config

    model = build_model(default_model_config((8, 8, 1)))
    digest = weights_digest(model)
    assert weights_digest(model.to(memory_format=torch.channels_last)) == digest  # values, not layout
    check_replicas([digest, digest], "epoch 1")
    with torch.no_grad():
        next(model.parameters())[0].flatten()[0] += 1e-7  # one rounding apart
    with pytest.raises(ConvaeError, match=r"^epoch 3: the weights of rank\(s\) 1 differ from rank 0's \(2 processes\)"):
        check_replicas([digest, weights_digest(model)], "epoch 3")
