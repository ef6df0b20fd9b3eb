"""Hostile and broken inputs: each is one clear line (exit code 2 through the CLI) or a skip
with a warning; never a hang, a traceback, or an allocation larger than the file justifies.

The table of the cases covered, and where, is in tests/README.md.

Running as root, chmod does not stop reads, so "unreadable files" are simulated with what
root cannot read either: a broken symlink, a FIFO (which must never block the loader), a
character device and a socket named like images.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from convae import run as rundir
from convae.cli import main
from convae.config import RunConfig, TrainConfig
from convae.data import load_dataset
from convae.errors import ConvaeError, DataError, RunDirError, SkippedFileWarning
from convae.models import default_model_config
from convae.train import fit
from data_helpers import gradient, save_image, write_idx, write_mnist_like


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


def cli(*args) -> click.testing.Result:  # noqa: F821
    """`convae ARGS` in this process (click's runner): fast, with the CLI's real error handling."""
    showwarning = warnings.showwarning
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        warnings.showwarning = showwarning  # main() replaces it


def assert_cli_error(result, *fragments) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("convae: error: ") and len(line) < 600, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def no_hang(fn, timeout: float = 60):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} hung"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def peak_bytes(fn) -> tuple[BaseException | None, int]:
    """(the exception fn raised, peak Python/numpy memory it allocated)."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as e:  # noqa: BLE001
        error = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak


# ---------------------------------------------------------------------------------------------
# binary datasets: IDX, CIFAR
# ---------------------------------------------------------------------------------------------
def test_idx_header_claiming_a_trillion_items_allocates_nothing(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), dims=[10**6, 1000, 1000])
    error, peak = peak_bytes(lambda: load_dataset("mnist:test", data_dir=tmp_path))
    assert isinstance(error, DataError) and "implausible IDX header" in str(error)
    assert peak < 20 << 20
    # the same just under the bound: the memory follows the bytes really there, not the claim
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), dims=[10**4, 1000, 800])
    error, peak = peak_bytes(lambda: load_dataset("mnist:test", data_dir=tmp_path))
    assert isinstance(error, DataError) and "truncated" in str(error)
    assert peak < 20 << 20


def test_idx_dimensions_that_overflow_64_bits(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros(16), magic=0x803, dims=[2**32 - 1] * 3)
    with pytest.raises(DataError, match="implausible"):
        load_dataset("mnist:test", data_dir=tmp_path)
    # dims whose int64 product wraps to exactly the bytes present must not slip through
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros(0), magic=0x803, dims=[2**31, 2**31, 4])
    with pytest.raises(DataError):
        load_dataset("mnist:test", data_dir=tmp_path)


@pytest.mark.parametrize("case", ["magic", "trillion", "truncated", "truncated-gz", "empty", "labels"])
def test_broken_idx_files_through_the_cli(tmp_path, case):
    folder = tmp_path / "mnist"
    write_mnist_like(folder, n=20)
    images = folder / "t10k-images-idx3-ubyte"
    if case == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    elif case == "trillion":
        write_idx(images, np.zeros(10), dims=[10**4, 10**4, 10**4])
    elif case == "truncated":
        images.write_bytes(images.read_bytes()[:-7])
    elif case == "truncated-gz":
        images.with_name(images.name + ".gz").write_bytes(gzip.compress(images.read_bytes())[:-20])
        images.unlink()
    elif case == "empty":
        images.write_bytes(b"")
    elif case == "labels":
        (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x14" + bytes(5))
    line = assert_cli_error(cli("fit", "mnist:test", "--data-dir", tmp_path, "--out", tmp_path / "r", "--no-download"))
    assert "idx" in line.lower()
    assert not (tmp_path / "r").exists()


def _tar_gz(path: Path, members: dict[str, bytes], claimed: dict[str, int] | None = None) -> Path:
    """A tar.gz of `members`; `claimed` overrides the size a member's header states."""
    raw = io.BytesIO()
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = (claimed or {}).get(name, len(data))
        raw.write(info.tobuf(format=tarfile.GNU_FORMAT))
        raw.write(data + bytes(-len(data) % 512))
    raw.write(bytes(1024))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def test_cifar_member_claiming_gigabytes_reads_only_what_is_there(tmp_path):
    tar = tmp_path / "cifar-10" / "cifar-10-binary.tar.gz"
    name = "cifar-10-batches-bin/test_batch.bin"
    _tar_gz(tar, {name: bytes(3073 * 2)}, claimed={name: 3073 * 10**6})
    error, peak = peak_bytes(lambda: load_dataset("cifar10:test", data_dir=tmp_path))
    assert isinstance(error, DataError) and str(tar) in str(error) and "\n" not in str(error)
    assert peak < 50 << 20


@pytest.mark.parametrize("case", ["partial-record", "partial-in-tar", "not-gzip", "labels-out-of-range"])
def test_broken_cifar_through_the_cli(tmp_path, case):
    folder = tmp_path / "cifar-10"
    if case == "partial-record":
        (folder / "cifar-10-batches-bin").mkdir(parents=True)
        (folder / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(bytes(3073 * 3 - 1))
    elif case == "partial-in-tar":
        _tar_gz(folder / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/test_batch.bin": bytes(3073 + 1)})
    elif case == "not-gzip":
        folder.mkdir(parents=True)
        (folder / "cifar-10-binary.tar.gz").write_bytes(b"<html>404 not found</html>")
    else:
        records = np.zeros((2, 3073), np.uint8)
        records[:, 0] = 200
        _tar_gz(folder / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/test_batch.bin": records.tobytes()})
    assert_cli_error(cli("fit", "cifar10:test", "--data-dir", tmp_path, "--out", tmp_path / "r", "--no-download"))


# ---------------------------------------------------------------------------------------------
# folders of images
# ---------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _animated_gif(path: Path) -> None:
    frames = [Image.new("L", (6, 6), v) for v in (10, 200)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Five good images among everything a folder scraped from anywhere holds."""
    root = tmp_path / "messy"
    for i in range(4):
        save_image(root / f"ok{i}.png", gradient(10, 12, seed=i))
    _animated_gif(root / "animated.gif")  # first frame used
    (root / "zero.png").write_bytes(b"")
    good = (root / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_text("not a jpeg at all")
    (root / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # 10^10 pixels claimed
    (root / "huge.png").write_bytes(_png_header(50_000, 50_000))  # past the limit too
    (root / "broken-link.png").symlink_to(root / "does-not-exist.png")
    os.mkfifo(root / "fifo.png")  # opening it for reading would block forever
    (root / "device.png").symlink_to("/dev/zero")  # endless bytes
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "socket.png"))
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # not followed
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden.png").write_bytes(good)  # hidden: ignored
    return root


BAD = [
    "zero.png",
    "truncated.png",
    "text.jpg",
    "bomb.png",
    "huge.png",
    "broken-link.png",
    "fifo.png",
    "device.png",
    "socket.png",
]


def test_a_messy_folder_loads_its_good_images_and_warns_about_each_bad_one(messy_folder):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = no_hang(lambda: load_dataset(messy_folder, image_size=8, channels=1))
    assert data.images.shape == (5, 8, 8, 1)
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedFileWarning)]
    for name in BAD:
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert any("skipped 9 of 14 files" in m for m in messages)
    assert all("\n" not in m for m in messages)
    reasons = " ".join(messages)
    assert "FIFO" in reasons and "device" in reasons and "decompression bomb" in reasons.lower()


def test_a_messy_folder_through_the_cli_trains_with_warnings(messy_folder, tmp_path):
    result = cli(
        "fit",
        messy_folder,
        "--out",
        tmp_path / "r",
        "--image-size",
        8,
        "--epochs",
        1,
        "--widths",
        "4",
        "--threads",
        1,
        "-q",
    )
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("convae: warning: skipped")]
    assert len(warned) == 10 and "Traceback" not in result.stderr


def test_a_fifo_swapped_in_after_loading_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", gradient(6, 6, seed=i))
    from convae.data import LazyImages

    lazy = LazyImages(sorted(tmp_path.glob("*.png")), (6, 6), 3)
    (tmp_path / "1.png").unlink()
    os.mkfifo(tmp_path / "1.png")
    with pytest.raises(DataError, match="FIFO") as e:
        no_hang(lambda: lazy[1])
    one_line(e)


def test_lazy_images_that_break_during_training_are_one_line(tmp_path):
    """An error in a DataLoader worker comes back as the user's line, not the worker's traceback."""
    from convae.data import LazyImages

    for i in range(8):
        save_image(tmp_path / f"{i}.png", gradient(8, 8, seed=i))
    lazy = LazyImages(sorted(tmp_path.glob("*.png")), (8, 8), 3)
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(b"gone")
    cfg = default_model_config((8, 8, 3), channels=(4,))
    with pytest.raises(DataError, match=r"^cannot read image .*\.png: .*reload the folder$") as e:
        fit(lazy, cfg, TrainConfig(epochs=1, batch_size=4, threads=1, device="cpu"))
    one_line(e)
    assert not multiprocessing.active_children()  # the workers are gone, even while `e` holds the traceback


@pytest.mark.parametrize("case", ["empty-folder", "only-junk", "only-loop", "one-pixel", "fifo-spec"])
def test_folders_that_cannot_train_through_the_cli(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "only-junk":
        (root / "a.png").write_bytes(b"")
        (root / "b.jpg").write_text("no")
    elif case == "only-loop":
        (root / "loop").symlink_to(root, target_is_directory=True)
    elif case == "one-pixel":
        for i in range(4):
            save_image(root / f"{i}.png", np.full((1, 1), i * 40, np.uint8))
    elif case == "fifo-spec":
        root = tmp_path / "data.npy"
        os.mkfifo(root)
    result = no_hang(lambda: cli("fit", root, "--out", tmp_path / "r", "--epochs", 1, "-q"))
    if case == "one-pixel":
        assert_cli_error(result, "too small", str(root), "--image-size")
    else:
        assert_cli_error(result, str(root))


def test_one_pixel_images_train_once_resized(tmp_path):
    for i in range(4):
        save_image(tmp_path / "d" / f"{i}.png", np.full((1, 1), i * 40, np.uint8))
    result = cli(
        "fit",
        tmp_path / "d",
        "--out",
        tmp_path / "r",
        "--image-size",
        4,
        "--epochs",
        1,
        "--widths",
        "4",
        "--threads",
        1,
        "-q",
    )
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# .npy / .npz
# ---------------------------------------------------------------------------------------------
def _npy_claiming(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _zip(path: Path, members: dict[str, bytes], compress=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_npy_header_claiming_a_terabyte_allocates_nothing(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(_npy_claiming((10**6, 1000, 1000), bytes(1000)))
    error, peak = peak_bytes(lambda: load_dataset(path))
    assert isinstance(error, DataError) and "truncated or corrupt" in str(error) and str(path) in str(error)
    assert peak < 20 << 20


def test_npz_member_claiming_a_terabyte_allocates_nothing(tmp_path):
    path = _zip(tmp_path / "x.npz", {"images.npy": _npy_claiming((10**6, 1000, 1000), bytes(1000))})
    error, peak = peak_bytes(lambda: load_dataset(path))
    assert isinstance(error, DataError) and "truncated or corrupt" in str(error)
    assert peak < 20 << 20


def test_npz_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", _npy_claiming((100, 1000, 1000), bytes(100 * 1000 * 1000)))
    # the member's directory entry is patched to claim far more than deflate can produce
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("images.npy")
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 2**32 - 1)  # uncompressed size
    path.write_bytes(bytes(data))
    assert info.compress_size < 1 << 20
    error, peak = peak_bytes(lambda: load_dataset(path))
    assert isinstance(error, DataError), error
    assert peak < 20 << 20


@pytest.mark.parametrize(
    "name, make, fragment",
    [
        ("o.npz", lambda p: np.savez(p, images=np.array([np.zeros(3), np.zeros(4)], dtype=object)), "object array"),
        ("o.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "object array"),
        ("nan.npz", lambda p: np.savez(p, images=np.full((3, 4, 4), np.nan)), "NaN"),
        ("inf.npy", lambda p: np.save(p, np.full((3, 4, 4), np.inf, np.float32)), "NaN or infinity"),
        ("rank2.npy", lambda p: np.save(p, np.zeros((3, 4))), "shape"),
        ("rank5.npz", lambda p: np.savez(p, x=np.zeros((2, 2, 2, 2, 2))), "shape"),
        ("neg.npy", lambda p: np.save(p, np.full((3, 4, 4), -3, np.int32)), "0..255"),
        ("big.npy", lambda p: np.save(p, np.full((3, 4, 4), 256, np.int32)), "0..255"),
        ("over.npz", lambda p: np.savez(p, images=np.full((3, 4, 4), 1.5)), "[0, 1]"),
        ("empty.npy", lambda p: np.save(p, np.zeros((0, 4, 4), np.uint8)), "no images"),
        ("garbage.npy", lambda p: p.write_bytes(os.urandom(300)), "not a valid .npy"),
        ("pickle.npy", lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "not a valid .npy"),
        ("garbage.npz", lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(100)), "cannot read"),
        ("notzip.npz", lambda p: p.write_bytes(os.urandom(100)), "not a valid .npy"),
        ("keys.npz", lambda p: np.savez(p, a=np.zeros((2, 4, 4)), b=np.zeros((2, 4, 4))), "no images found"),
        ("raw.npz", lambda p: _zip(p, {"images": b"raw bytes, not an array"}), "not a valid .npy"),
        ("labels.npz", lambda p: np.savez(p, images=np.zeros((2, 4, 4)), labels=[0, 10**12]), "class index"),
        ("labels2.npz", lambda p: np.savez(p, images=np.zeros((2, 4, 4)), labels=[-1, 0]), "non-negative"),
        ("zip-as.npy", lambda p: np.savez(open(p, "wb"), images=np.zeros((2, 4, 4))), "name it .npz"),
        ("zero.npy", lambda p: p.write_bytes(b""), "not a valid .npy"),
    ],
)
def test_hostile_arrays_through_the_cli(tmp_path, name, make, fragment):
    path = tmp_path / name
    make(path)
    line = assert_cli_error(cli("fit", path, "--out", tmp_path / "r", "--epochs", 1, "-q"), str(path))
    assert fragment in line


# ---------------------------------------------------------------------------------------------
# run directories: config.json, model.safetensors, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    fit(
        images,
        default_model_config((8, 8, 1), channels=(4, 8)),
        TrainConfig(epochs=1, threads=1, device="cpu"),
        run_dir=run,
    )
    return run


@pytest.fixture
def copy_of(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


CONFIG_CASES = [
    ("unknown", lambda c: c["train"].update(learning_rate=0.1), "unknown field(s) learning_rate"),
    ("missing", lambda c: c.pop("model"), "missing field 'model'"),
    ("type", lambda c: c["model"].update(channels="many"), "model.channels"),
    ("bool-int", lambda c: c["train"].update(epochs=True), "train.epochs: expected an integer"),
    ("literal", lambda c: c["model"].update(norm="layer"), "model.norm"),
    ("nan", lambda c: c["train"].update(lr=float("nan")), "train.lr: expected a finite number"),
    ("inf", lambda c: c["train"].update(max_time=float("inf")), "train.max_time: expected a finite number"),
    ("negative", lambda c: c["train"].update(batch_size=-1), "batch_size must be >= 1"),
    ("newer", lambda c: c.update(convae_version="99.0.0"), "newer than this convae"),
    ("huge-model", lambda c: c["model"].update(channels=[2**40]), "implausibly large"),
    ("deep-model", lambda c: c["model"].update(convs_per_stage=10**9), "implausibly large"),
    ("many-stages", lambda c: c["model"].update(channels=[8] * 10_000), "10000 stages"),
    ("huge-int", lambda c: c["train"].update(seed=10**400), "train.seed: a huge integer is out of range"),
    ("not-object", lambda c: c["model"].update(image_size={"h": 8}), "model.image_size: expected a list"),
]


@pytest.mark.parametrize("case, edit, fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_json(copy_of, case, edit, fragment):
    _edit_config(copy_of, edit)
    with pytest.raises(RunDirError) as e:
        rundir.load_model(copy_of)
    assert fragment in one_line(e) and "config.json" in one_line(e) and len(one_line(e)) < 400
    for command in ("info", "layers"):
        assert_cli_error(cli(command, copy_of), "config.json")


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json"),
        (b"[1, 2, 3]", "expected an object"),
        (b'{"model": {"arch": "conv"}, ' * 1 + b" " * (2 << 20) + b"}", "too large"),
        (b"NaN", "expected an object"),
        (b'{"train": {"seed": ' + b"9" * 5000 + b"}}", "not valid JSON"),
    ],
)
def test_config_json_that_is_not_a_config(copy_of, raw, fragment):
    (copy_of / "config.json").write_bytes(raw)
    with pytest.raises(RunDirError, match=fragment) as e:
        rundir.load_config(copy_of)
    one_line(e)
    assert_cli_error(cli("info", copy_of), "config.json")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(run / "model.safetensors")).items()}  # not mmap-backed


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("other-config", "has shape"),
        ("missing-tensor", "lacks tensor"),
        ("extra-tensor", "unexpected tensor"),
        ("dtype", "is F16, expected F32"),
        ("nan", "NaN or infinite"),
        ("garbage", "not a readable safetensors file"),
        ("empty", "not a readable safetensors file"),
        ("huge-header", "not a readable safetensors file"),
        ("pickle", "not a readable safetensors file"),
    ],
)
def test_model_safetensors_that_does_not_match(copy_of, case, fragment):
    path = copy_of / "model.safetensors"
    state = _weights(copy_of)
    first = next(k for k, v in state.items() if v.is_floating_point())
    if case == "other-config":
        _edit_config(copy_of, lambda c: c["model"].update(channels=[6, 8]))
    elif case == "missing-tensor":
        save_file({k: v for k, v in state.items() if k != first}, str(path))
    elif case == "extra-tensor":
        save_file({**state, "evil": torch.zeros(3)}, str(path))
    elif case == "dtype":
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    elif case == "nan":
        save_file({k: v * float("nan") if k == first else v for k, v in state.items()}, str(path))
    elif case == "garbage":
        path.write_bytes(os.urandom(4096))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "huge-header":  # claims a 2^60-byte header
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    elif case == "pickle":
        torch.save(state, path)
    with pytest.raises(RunDirError) as e:
        rundir.load_model(copy_of)
    assert fragment in one_line(e)
    assert_cli_error(cli("info", copy_of), "model.safetensors" if case != "other-config" else "")


def test_enormous_config_with_matching_name_allocates_nothing(copy_of):
    """A config.json asking for a huge model is caught against the weights file before any allocation."""
    _edit_config(copy_of, lambda c: c["model"].update(channels=[4, 60000]))
    error, peak = peak_bytes(lambda: rundir.load_model(copy_of))
    assert isinstance(error, RunDirError) and "has shape" in str(error)
    assert peak < 50 << 20


class _Evil:
    """Unpickling this runs code: a checkpoint must never be unpickled with full pickle."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('CONVAE_EVIL_MARKER', '/tmp/convae-evil')}",))


def test_checkpoints_load_without_running_code(copy_of, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CONVAE_EVIL_MARKER", str(marker))
    ckpt = copy_of / rundir.CHECKPOINT_FILE
    torch.save({"model": {}, "evil": _Evil()}, ckpt)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    cfg = default_model_config((8, 8, 1), channels=(4, 8))
    with pytest.raises(RunDirError, match="unreadable checkpoint") as e:
        fit(images, cfg, TrainConfig(epochs=1, threads=1, device="cpu"), run_dir=copy_of, resume=True)
    one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize(
    "state, fragment",
    [
        ({"model": {}}, "field 'optimizer'"),
        ([1, 2, 3], "not a convae checkpoint"),
        ("checkpoint", "not a convae checkpoint"),
        (None, "not a convae checkpoint"),
    ],
)
def test_checkpoints_of_the_wrong_shape(copy_of, state, fragment):
    torch.save(state, copy_of / rundir.CHECKPOINT_FILE)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(RunDirError, match=fragment):
        fit(
            images,
            default_model_config((8, 8, 1), channels=(4, 8)),
            TrainConfig(threads=1, device="cpu"),
            run_dir=copy_of,
            resume=True,
        )


def test_checkpoint_of_another_model_is_refused_before_building_it(copy_of):
    real = rundir.load_checkpoint(copy_of / rundir.CHECKPOINT_FILE)
    real["model"] = {k: torch.zeros(2, 2) for k in real["model"]}
    torch.save(real, copy_of / rundir.CHECKPOINT_FILE)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(RunDirError, match="has shape"):
        fit(
            images,
            default_model_config((8, 8, 1), channels=(4, 8)),
            TrainConfig(threads=1, device="cpu"),
            run_dir=copy_of,
            resume=True,
        )


def test_resume_with_other_data_is_refused(copy_of):
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    cfg = default_model_config((8, 8, 1), channels=(4, 8))
    with pytest.raises(RunDirError, match="40 images .* this data has 50"):
        fit(images, cfg, TrainConfig(threads=1, device="cpu"), run_dir=copy_of, resume=True)
    other = np.zeros((40, 10, 10, 1), np.uint8)
    with pytest.raises(RunDirError, match="8x8x1 images, these are 10x10x1"):
        fit(
            other, default_model_config((10, 10, 1)), TrainConfig(threads=1, device="cpu"), run_dir=copy_of, resume=True
        )


def test_history_csv_that_is_not_a_history(copy_of):
    (copy_of / "history.csv").write_text("epoch,val_mse\n1,lots\n")
    with pytest.raises(RunDirError, match="history.csv") as e:
        rundir.read_history(copy_of)
    one_line(e)
    assert_cli_error(cli("info", copy_of), "history.csv")


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_cli_error(cli("fit", "digits", "--out", tmp_path / "file", "-q"), "is a file")


def test_errors_are_convae_errors():
    assert issubclass(RunDirError, ConvaeError) and issubclass(DataError, ConvaeError)
    assert RunConfig  # imported for the table in tests/README.md
