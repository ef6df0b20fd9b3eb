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


# ---------------------------------------------------------------------------------------------
# the CLI's options (issue #28): every command, values at and beyond each limit
# ---------------------------------------------------------------------------------------------
#: Per command: its examples are whole `convae` invocations, so fewer of them.
FUZZ_CLI = settings(
    max_examples=int(os.environ.get("CONVAE_FUZZ_CLI_EXAMPLES", 10)),
    # The same examples on every run, so CI is reproducible; explore with
    # CONVAE_FUZZ_CLI_RANDOM=1 and more examples (a random run found the case in the notes).
    derandomize=not os.environ.get("CONVAE_FUZZ_CLI_RANDOM"),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Integers at and beyond the limits of convae.limits (and of 64 bits), and small ones.
_EDGE_INTS = [-(2**63), -1, 0, 1, 2, 255, 256, 1024, 1025, 65536, 65537, 1 << 20, (1 << 20) + 1, 2**32, 2**63, 2**64]
_INTS = st.one_of(st.sampled_from(_EDGE_INTS), st.integers(-3, 40)).map(str)
_SMALL = st.sampled_from(["-1", "0", "1", "2", "3", "2147483648", "x"])
_FLOATS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "1e308", "1e-308", "0.5", "x"]),
    st.floats(-2, 2, allow_nan=False).map(repr),
)
_TEXT = st.sampled_from(["", "x", ",", "1,,2", "-1", "a\nb", "9" * 30, "all", "stage1", "4,8"])
_WIDTHS = st.one_of(_TEXT, st.lists(st.sampled_from(_EDGE_INTS[:12]), min_size=1, max_size=3).map(
    lambda v: ",".join(map(str, v))), st.just(",".join(["4"] * 65)))  # fmt: skip
_SIZES = st.sampled_from(["8", "4", "1", "0", "-8", "8x8", "8x", "65536", "65537", "100000x2", "x", "9" * 30])
_DEVICES = st.sampled_from(["cpu", "auto", "cuda", "cuda:99", "meta", "bogus"])

_FIT_OPTIONS = {
    "--arch": st.sampled_from(["conv", "dense", "sparse", "hsparse", "nope"]),
    "--widths": _WIDTHS, "--hidden": _WIDTHS, "--convs-per-stage": _INTS, "--kernel-size": _INTS,
    "--latent-channels": _INTS, "--latent-dim": _INTS, "--bottleneck": st.sampled_from(["conv", "dense", "x"]),
    "--sparse-k": _INTS, "--patches-per-image": _INTS, "--whiten-eps": _FLOATS, "--upper-kernel": _INTS,
    "--pool-size": _INTS, "--reduce-dim": _INTS, "--groups": _INTS, "--group-size": _INTS,
    "--upper-image-fraction": _FLOATS, "--code-wta": _FLOATS, "--split-threshold": _FLOATS,
    "--epochs": st.sampled_from(["-1", "1", "2", "x"]), "--max-time": _FLOATS, "--batch-size": _INTS,
    "--lr": _FLOATS, "--weight-decay": _FLOATS, "--noise": _FLOATS, "--mask-ratio": _FLOATS,
    "--val-fraction": _FLOATS, "--seed": _INTS, "--threads": st.sampled_from(["-1", "0", "1", "1025", "99999999"]),
    "--nproc": st.sampled_from(["-1", "0", "1", "1025", str(2**63)]), "--image-size": _SIZES,
    "--channels": _SMALL, "--device": _DEVICES, "--on-nan": st.sampled_from(["stop", "skip", "x"]),
    "--preset": st.sampled_from(["mnist", "cifar10", "nope"]),
}  # fmt: skip
_VIEW_OPTIONS = {
    "--max-images": _INTS, "--top-channels": _INTS, "--top-k": _INTS, "--steps": _SMALL, "--seed": _INTS,
    "--device": _DEVICES, "--image-size": _SIZES, "--channels": _SMALL,
}  # fmt: skip
_COMMANDS = {
    "fit": (["{imgs}", "-o", "{out}/run", "-q", "--epochs", "1", "--device", "cpu"], _FIT_OPTIONS),
    "info": (["{run}"], {}),
    "layers": (["{run}"], {}),
    "extract": (["{run}", "{imgs}", "-q", "--device", "cpu"], {
        "-o": st.sampled_from(["{out}/f.npy", "{out}/f.npz", "{out}/f.parquet", "{out}/f.txt", "{imgs}", "{run}/config.json", "{out}"]),
        "--layers": _TEXT, "--pool": st.sampled_from(["avg", "flatten", "grid2", "grid99", "", "max,avg"]),
        "--dtype": st.sampled_from(["float16", "int8"]), "--batch-size": _INTS, "--image-size": _SIZES,
        "--channels": _SMALL, "--format": st.sampled_from(["npy", "npz", "csv"]),
    }),
    "reconstruct": (["{run}", "{imgs}", "-o", "{out}/r.png"], {"--count": _INTS, "--image-size": _SIZES, "--channels": _SMALL}),
    "show": (["{run}", "{imgs}", "-q", "-o", "{out}/v.png"], {
        "--view": st.sampled_from(["filters", "curves", "recon", "receptive", "maps", "outliers", "interpolate", "probe", "x"]),
        "--count": _INTS, "--index": st.sampled_from(["0", "0,5", "-1", "99999", "a.png", ","]), "--layers": _TEXT,
        "--probe": st.sampled_from(["{results}", "{imgs}", "{out}/missing.json"]), **_VIEW_OPTIONS,
    }),
    "report": (["{run}", "{imgs}", "-q", "-o", "{out}/r.html", "--max-images", "24", "--steps", "1"], {
        "--tsne-points": _INTS, "--top-k": st.sampled_from(["0", "1", "2"]), "--seed": _INTS,
        "--probe": st.sampled_from(["{results}", "{imgs}"]), "--image-size": _SIZES,
    }),
    "probe": (["{run}", "--train", "{feats}", "--test", "{feats}", "-o", "{out}/p.json"], {
        "--classifiers": st.sampled_from(["logreg", "knn", "x", ""]), "--c-scale": _FLOATS, "--max-iter": _SMALL,
        "--seeds": _INTS, "--labels-per-class": st.sampled_from(["1", "0", "-1", "all", "x", "1,all"]),
        "--split-seed": _INTS, "--normalize": st.sampled_from(["standard", "whiten", "x"]), "--pca-dim": _TEXT,
        "--dtype": st.sampled_from(["float16", "uint8", "float64"]), "--cv": _SMALL, "--test-fraction": _FLOATS,
    }),
    "score": (["{run}", "{imgs}", "-q", "-o", "{out}/s.csv", "--device", "cpu", "--train", "{imgs}"], {
        "--k": _INTS, "--threshold-quantile": _FLOATS, "--calibration-images": _INTS, "--layers": _TEXT,
        "--pool": st.sampled_from(["avg", "grid4", "x"]), "--batch-size": _INTS, "--by": st.sampled_from(["mse", "knn", "x"]),
        "--compile": st.sampled_from(["never", "x"]),
    }),
    "neighbors": (["{run}", "--index", "{imgs}", "--query", "{imgs}", "-q", "--device", "cpu"], {
        "-o": st.sampled_from(["{out}/n.png", "{out}/n.csv", "{out}/n.txt", "{imgs}"]), "--k": _INTS,
        "--show": _INTS, "--baselines": st.sampled_from(["none", "pixels", "x", ""]), "--pool": st.sampled_from(["avg", "x"]),
    }),
    "demo": ([], {"-o": st.sampled_from(["{imgs}", "{run}", "{run}/config.json", "{results}"])}),
}  # fmt: skip
#: Options each invocation needs (the rest are drawn, some at a time).
_REQUIRED = {"extract": ["-o"], "show": ["--view"], "neighbors": ["-o"], "demo": ["-o"]}


@pytest.fixture(scope="module")
def cli_world(scratch):
    """24 digits as .npy with labels, a tiny run trained on them, its features, a results.json."""
    from click.testing import CliRunner

    from convae.cli import main

    world = scratch / "cli-world"
    world.mkdir()
    images = D.load_dataset("digits", "train").images[:24]
    np.save(world / "imgs.npy", images)
    np.save(world / "imgs.labels.npy", np.arange(24) % 3)
    fit(images, default_model_config((8, 8, 1), channels=(2, 4)), TrainConfig(epochs=1, threads=1, device="cpu"),
        run_dir=world / "run")  # fmt: skip
    result = CliRunner().invoke(main, ["extract", str(world / "run"), str(world / "imgs.npy"), "-o",
                                       str(world / "feats.npy"), "-q", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [{"features": "stage1/avg", "classifier": "logreg", "accuracy": 0.5}]
    (world / "results.json").write_text(json.dumps({"rows": rows}))
    return world


def _files_of(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", list(_COMMANDS))
def test_cli_options_at_and_beyond_their_limits(cli_world, command):
    """Any values of any options: exit 0, or exit 2 with one line; never a traceback, never a
    change to a file outside the command's output folder, memory bounded (a budget is set)."""
    import resource

    import torch
    from click.testing import CliRunner

    from convae.cli import main

    base, options = _COMMANDS[command]
    names = {"imgs": cli_world / "imgs.npy", "run": cli_world / "run", "feats": cli_world / "feats.npy",
             "results": cli_world / "results.json"}  # fmt: skip
    before = _files_of(cli_world)
    threads = torch.get_num_threads()

    @FUZZ_CLI
    @given(st.data())
    def invoke(data):
        out = Path(tempfile.mkdtemp(dir=scratch_dir))
        fill = lambda a: a.format(out=out, **names)  # noqa: E731
        drawn = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)) if options else []
        chosen = list(dict.fromkeys(_REQUIRED.get(command, []) + drawn))
        args = [command, *map(fill, base)]
        for name in chosen:
            args += [name, fill(data.draw(options[name], label=name))]
        try:
            result = CliRunner().invoke(main, args, env={"CONVAE_MEMORY_LIMIT": "512M"})
        finally:
            torch.set_num_threads(threads)
        stderr = result.stderr.strip().splitlines()
        assert result.exit_code in (0, 2), (args, result.exit_code, result.exception, result.stderr)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output + result.stderr, args
        if result.exit_code == 2:
            errors = [line for line in stderr if line.startswith("convae: error:")]
            assert len(errors) == 1 and stderr[-1] == errors[0], (args, result.stderr)
        assert _files_of(cli_world) == before, args  # no input, run file or other file touched
        shutil.rmtree(out, ignore_errors=True)

    scratch_dir = cli_world.parent / f"out-{command}"
    scratch_dir.mkdir(exist_ok=True)
    invoke()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 << 20  # KiB: under 4 GiB
