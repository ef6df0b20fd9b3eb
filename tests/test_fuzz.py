"""Fuzzing the parsers of untrusted bytes with hypothesis: IDX, CIFAR binaries (plain and in a
tar.gz), .npy headers, config.json and model.safetensors.

Each parser, given anything, either returns a well-formed result or raises the one error type
its callers turn into a one-line message (DataError, ConfigError, RunDirError). Any other
exception, a message of several lines, or a result of the wrong shape fails.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convae import data as D
from convae import run as rundir
from convae.config import RunConfig, TrainConfig, from_dict, to_dict
from convae.data.builtin import _read_idx
from convae.errors import ConfigError, DataError, RunDirError
from convae.models import ModelConfig, default_model_config
from convae.train import fit

FUZZ = settings(
    max_examples=int(os.environ.get("CONVAE_FUZZ_EXAMPLES", 100)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def one_line(e: BaseException) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="convae-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------
def idx_files():
    """Mostly plausible IDX files: right or wrong magic, random dimensions, payload of any length."""
    dims = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), min_size=0, max_size=4)

    @st.composite
    def build(draw):
        magic = draw(st.sampled_from([0x803, 0x801, 0x802, 0x0803_0000, draw(st.integers(0, 2**32 - 1))]))
        ds = draw(dims)
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in ds)
        expected = math.prod(ds) if ds else 0
        length = draw(st.one_of(st.just(min(expected, 5000)), st.integers(0, 300)))
        payload = draw(st.binary(min_size=min(length, 300), max_size=min(length, 300)))
        payload = payload + bytes(max(0, length - len(payload)))
        cut = draw(st.one_of(st.none(), st.integers(0, len(header) + len(payload))))
        blob = (header + payload)[:cut] if cut is not None else header + payload
        return blob, draw(st.booleans())

    return build()


@FUZZ
@given(idx_files(), st.sampled_from([0x803, 0x801]))
def test_idx_parser(scratch, case, magic):
    blob, compressed = case
    path = scratch / ("f.idx.gz" if compressed else "f.idx")
    path.write_bytes(gzip.compress(blob) if compressed else blob)
    try:
        arr = _read_idx(path, magic)
    except DataError as e:
        one_line(e)
        return
    assert arr.dtype == np.uint8 and arr.ndim == magic & 0xFF
    assert arr.size == len(blob) - 4 - 4 * arr.ndim


@FUZZ
@given(st.binary(max_size=600))
def test_idx_parser_on_random_bytes(scratch, blob):
    path = scratch / "r.idx"
    path.write_bytes(blob)
    for magic in (0x803, 0x801):
        try:
            _read_idx(path, magic)
        except DataError as e:
            one_line(e)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(st.integers(0, 4 * 3073), st.binary(max_size=64), st.booleans())
def test_cifar_batch_file(scratch, size, head, as_tar):
    blob = (head + bytes(size))[:size]
    root = scratch / f"cifar-{as_tar}"
    shutil.rmtree(root, ignore_errors=True)
    if as_tar:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        (root / "cifar-10").mkdir(parents=True)
        (root / "cifar-10" / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    else:
        (root / "cifar-10" / "cifar-10-batches-bin").mkdir(parents=True)
        (root / "cifar-10" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(blob)
    try:
        d = D.load_dataset("cifar10:test", data_dir=root, download=False)
    except DataError as e:
        one_line(e)
        return
    assert d.images.shape == (size // 3073, 32, 32, 3) and size % 3073 == 0 and size
    assert d.labels.max() < len(d.classes)


@FUZZ
@given(st.binary(max_size=2000), st.booleans())
def test_cifar_tar_of_random_bytes(scratch, blob, gz):
    folder = scratch / "cifar-rand" / "cifar-10"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError) as e:
        D.load_dataset("cifar10:test", data_dir=folder.parent, download=False)
    one_line(e.value)


# ---------------------------------------------------------------------------------------------
# .npy headers
# ---------------------------------------------------------------------------------------------
@st.composite
def npy_files(draw):
    descr = draw(st.sampled_from(["|u1", "<f4", "<i8", "|O", "|b1", "<c8", "|V3", "<U2", "garbage"]))
    shape = draw(st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**40)), max_size=5))
    header = repr({"descr": descr, "fortran_order": draw(st.booleans()), "shape": tuple(shape)})
    header = draw(st.one_of(st.just(header), st.text(max_size=80)))
    header_bytes = header.encode("utf-8", "replace")
    pad = -(10 + len(header_bytes) + 1) % 64
    blob = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header_bytes) + pad + 1) + header_bytes + b" " * pad + b"\n"
    return blob + draw(st.binary(max_size=400))


@FUZZ
@given(npy_files())
def test_npy_loader(scratch, blob):
    path = scratch / "f.npy"
    path.write_bytes(blob)
    try:
        d = D.load_dataset(path)
    except DataError as e:
        one_line(e)
        return
    assert d.images.dtype == np.uint8 and d.images.ndim == 4 and len(d.images) >= 1


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
VALID = to_dict(RunConfig(model=default_model_config((8, 8, 1), channels=(4, 8)), train=TrainConfig(epochs=1)))


def _leaf_paths(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


LEAVES = list(_leaf_paths(VALID))


@st.composite
def mutated_configs(draw):
    """A valid config.json with a few fields replaced, removed or added."""
    config = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(LEAVES))
        node = config
        for key in path[:-1]:
            node = node.get(key) if isinstance(node.get(key), dict) else {}
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            node[path[-1]] = draw(json_values)
        elif action == "remove":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(max_size=6))] = draw(json_values)
    return config


@FUZZ
@given(st.one_of(mutated_configs(), json_values))
def test_config_from_dict(data):
    try:
        config = from_dict(RunConfig, data)
    except ConfigError as e:
        one_line(e)
        return
    assert isinstance(config.model, ModelConfig) and isinstance(config.train, TrainConfig)
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(config)))) == config  # round trip


@FUZZ
@given(st.one_of(mutated_configs().map(lambda c: json.dumps(c).encode()), st.binary(max_size=200)))
def test_load_config_of_any_bytes(scratch, raw):
    run = scratch / "cfg"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_bytes(raw)
    try:
        config = rundir.load_config(run)
    except RunDirError as e:
        one_line(e)
        assert len(str(e)) < 1000
        return
    assert isinstance(config, RunConfig)


# ---------------------------------------------------------------------------------------------
# model.safetensors
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(scratch) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    run = scratch / "tiny"
    fit(
        images,
        default_model_config((8, 8, 1), channels=(2,)),
        TrainConfig(epochs=1, threads=1, device="cpu"),
        run_dir=run,
    )
    return run


@FUZZ
@given(st.data())
def test_load_model_of_damaged_weights(tiny_run, data):
    path = tiny_run / "model.safetensors"
    original = getattr(test_load_model_of_damaged_weights, "original", None)
    if original is None:
        original = test_load_model_of_damaged_weights.original = path.read_bytes()
    blob = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "header", "random"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "header":  # a different header length or JSON
        header_len = struct.unpack("<Q", bytes(blob[:8]))[0]
        header = data.draw(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
        blob = bytearray(
            struct.pack("<Q", data.draw(st.sampled_from([len(header), 2**63, 0, header_len])))
            + header
            + blob[8 + header_len :]
        )
    else:
        blob = bytearray(data.draw(st.binary(max_size=200)))
    path.write_bytes(bytes(blob))
    try:
        model, _ = rundir.load_model(tiny_run)
    except RunDirError as e:
        one_line(e)
    finally:
        path.write_bytes(original)
