"""Tests for convae.data: built-in datasets on the real files, downloads, folders and arrays."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convae import data as D
from convae.data import (
    BUILTIN_DATASETS,
    ImageData,
    LazyImages,
    as_uint8_images,
    find_data_dir,
    load_dataset,
)
from convae.errors import DataError, SkippedFileWarning
from convae.tensors import to_float_nchw

try:
    from data_helpers import closed_port_url, gradient, http_server, md5, save_image, write_idx, write_mnist_like
except ImportError:  # tests/ imported as a package
    from .data_helpers import closed_port_url, gradient, http_server, md5, save_image, write_idx, write_mnist_like


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No real ~/.cache/convae, no $CONVAE_DATA, and any download attempt goes nowhere."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("CONVAE_DATA", raising=False)
    monkeypatch.setenv("CONVAE_DOWNLOAD_URL", closed_port_url())
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# built-in datasets on the real files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_train(shared_datasets):
    return load_dataset("mnist", data_dir=shared_datasets)


@pytest.fixture(scope="module")
def cifar_tar_train(shared_datasets):
    return load_dataset("cifar10:train", data_dir=shared_datasets)


@pytest.fixture(scope="module")
def cifar_extracted_dir(shared_datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_extracted")
    with tarfile.open(shared_datasets / "cifar-10" / "cifar-10-binary.tar.gz") as tar:
        tar.extractall(root / "cifar-10", filter="data")
    return root


def test_mnist_train(mnist_train):
    d = mnist_train
    assert isinstance(d, ImageData) and d.name == "mnist:train"
    assert d.images.shape == (60000, 28, 28, 1) and d.images.dtype == np.uint8
    assert d.labels.shape == (60000,) and d.labels.dtype == np.int64
    assert d.labels.min() == 0 and d.labels.max() == 9
    assert d.classes == [str(i) for i in range(10)]
    assert d.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST labels
    assert d.images[0].max() == 255 and d.images[0, 0, 0, 0] == 0  # a digit on black
    assert len(d) == 60000 and d.image_shape == (28, 28, 1)
    assert np.bincount(d.labels).tolist()[1] == 6742
    assert d.images.flags.writeable


def test_mnist_test_via_spec_and_split_argument(shared_datasets):
    a = load_dataset("mnist:test", data_dir=shared_datasets)
    b = load_dataset("mnist", "test", data_dir=shared_datasets)
    assert a.images.shape == (10000, 28, 28, 1) and a.name == "mnist:test"
    assert a.labels[:3].tolist() == [7, 2, 1]
    np.testing.assert_array_equal(a.images, b.images)


def test_fashion_mnist(shared_datasets):
    for split, n in (("train", 60000), ("test", 10000)):
        d = load_dataset("fashion-mnist", split, data_dir=shared_datasets)
        assert d.images.shape == (n, 28, 28, 1) and d.images.dtype == np.uint8
        assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot" and len(d.classes) == 10
        assert np.bincount(d.labels, minlength=10).tolist() == [n // 10] * 10  # per the README


def test_cifar10_from_tar(cifar_tar_train, shared_datasets):
    d = cifar_tar_train
    assert d.images.shape == (50000, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.labels.min() == 0 and d.labels.max() == 9 and np.bincount(d.labels).tolist() == [5000] * 10
    assert d.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    # first record of data_batch_1: a frog; the R plane holds the first 1024 bytes after the label
    with tarfile.open(shared_datasets / "cifar-10" / "cifar-10-binary.tar.gz") as tar:
        raw = tar.extractfile("cifar-10-batches-bin/data_batch_1.bin").read(3073)
    assert raw[0] == d.labels[0] == 6
    np.testing.assert_array_equal(d.images[0, :, :, 0].ravel(), np.frombuffer(raw[1:1025], np.uint8))
    np.testing.assert_array_equal(d.images[0, :, :, 2].ravel(), np.frombuffer(raw[2049:], np.uint8))
    test = load_dataset("cifar10", "test", data_dir=shared_datasets)
    assert test.images.shape == (10000, 32, 32, 3) and test.name == "cifar10:test"


def test_cifar10_from_extracted_folder(cifar_extracted_dir, cifar_tar_train):
    d = load_dataset("cifar10", data_dir=cifar_extracted_dir)
    np.testing.assert_array_equal(d.images, cifar_tar_train.images)
    np.testing.assert_array_equal(d.labels, cifar_tar_train.labels)
    assert d.classes == cifar_tar_train.classes


def test_digits_splits_are_fixed_and_stratified():
    train, test = load_dataset("digits"), load_dataset("digits:test")
    assert train.name == "digits:train" and len(train) == 1437 and len(test) == 360
    assert train.images.shape == (1437, 8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(np.unique(train.images)) <= {round(v * 255 / 16) for v in range(17)}
    total = np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - 0.2 * total) <= 1)
    again = load_dataset("digits", "train")
    np.testing.assert_array_equal(again.images, train.images)
    # no image in both splits
    seen = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in seen for im in test.images)


def test_builtin_resize_and_channels():
    d = load_dataset("digits", "test", image_size=16, channels=3)
    assert d.images.shape == (360, 16, 16, 3)
    assert (d.images[..., 0] == d.images[..., 2]).all()


def test_bad_split_and_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="train, test") as e:
        load_dataset("mnist:validation")
    one_line(e)
    with pytest.raises(DataError, match="'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(DataError) as e:
        load_dataset("imagenet")
    assert one_line(e) == (
        "unknown dataset 'imagenet': expected digits, mnist, fashion-mnist, cifar10, "
        "a folder of images, or a .npy/.npz file"
    )
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="image size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DataError, match="channels"):
        load_dataset("digits", channels=2)


# ---------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------
def test_find_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVAE_DATA", str(tmp_path / "env"))
    dirs = find_data_dir(tmp_path / "arg")
    assert dirs == [tmp_path / "arg", tmp_path / "env", Path.home() / ".cache" / "convae"]
    monkeypatch.delenv("CONVAE_DATA")
    assert find_data_dir() == [Path.home() / ".cache" / "convae"]


def test_lookup_via_env_and_cache(shared_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVAE_DATA", str(shared_datasets))
    d = load_dataset("mnist:test", data_dir=tmp_path / "empty")  # falls through to $CONVAE_DATA
    assert d.images.shape == (10000, 28, 28, 1)
    monkeypatch.delenv("CONVAE_DATA")
    cache = Path.home() / ".cache" / "convae" / "mnist"
    images, labels = write_mnist_like(cache, n=3)  # uncompressed files in the default cache
    d = load_dataset("mnist:test", download=False)
    np.testing.assert_array_equal(d.images[..., 0], images)
    assert d.labels.tolist() == labels.tolist()


def test_data_dir_wins_over_env(tmp_path, monkeypatch):
    a, _ = write_mnist_like(tmp_path / "a" / "mnist", n=2, seed=1)
    b, _ = write_mnist_like(tmp_path / "b" / "mnist", n=4, seed=2)
    monkeypatch.setenv("CONVAE_DATA", str(tmp_path / "b"))
    assert len(load_dataset("mnist:test", data_dir=tmp_path / "a")) == 2
    assert len(load_dataset("mnist:test")) == 4


# ---------------------------------------------------------------------------------------------
# downloads against a local server
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def served(shared_datasets, tmp_path):
    """A server laid out like the shared folder, holding the MNIST test files."""
    root = tmp_path / "www"
    (root / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / "mnist" / name).symlink_to(shared_datasets / "mnist" / name)
    with http_server(root) as url:
        yield root, url


def test_download_succeeds_with_matching_checksums(served, tmp_path, monkeypatch):
    root, url = served
    monkeypatch.setenv("CONVAE_DOWNLOAD_URL", url)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        monkeypatch.setitem(D.CHECKSUMS["mnist"], f, md5(root / "mnist" / f))
    target = tmp_path / "cache"
    d = load_dataset("mnist:test", data_dir=target, progress=False)
    assert d.images.shape == (10000, 28, 28, 1) and d.labels[:3].tolist() == [7, 2, 1]
    assert sorted(p.name for p in (target / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert md5(target / "mnist" / "t10k-images-idx3-ubyte.gz") == md5(root / "mnist" / "t10k-images-idx3-ubyte.gz")


def test_download_rejects_checksum_mismatch_and_leaves_nothing(served, tmp_path, monkeypatch):
    _, url = served
    monkeypatch.setenv("CONVAE_DOWNLOAD_URL", url)
    target = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        load_dataset("mnist:test", data_dir=target)
    msg = one_line(e)
    assert "checksum mismatch" in msg and "9fb629c4189551a2d022fa330f9573f3" in msg
    assert "t10k-images-idx3-ubyte.gz" in msg
    assert list(target.rglob("*")) == []  # no file, no temp file, no empty folder


def test_download_unreachable_names_files_and_place(tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", data_dir=target)
    msg = one_line(e)
    assert msg.startswith("fashion-mnist not found: place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz")
    assert str(target / "fashion-mnist") in msg and "download failed" in msg and "CONVAE_DATA" in msg
    assert [p for p in target.rglob("*") if p.is_file()] == []


def test_no_download_message(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = one_line(e)
    assert "cifar-10-binary.tar.gz" in msg and str(tmp_path / "cifar-10") in msg
    assert "download failed" not in msg


def test_download_tries_next_mirror(served, tmp_path, monkeypatch):
    root, url = served
    monkeypatch.delenv("CONVAE_DOWNLOAD_URL")
    monkeypatch.setitem(D.MIRRORS, "mnist", (closed_port_url() + "/", url + "/nothing-here/", url + "/mnist/"))
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        monkeypatch.setitem(D.CHECKSUMS["mnist"], f, md5(root / "mnist" / f))
    assert len(load_dataset("mnist:test", data_dir=tmp_path / "c")) == 10000


# ---------------------------------------------------------------------------------------------
# broken built-in files
# ---------------------------------------------------------------------------------------------
def test_truncated_idx(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    p = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        load_dataset("mnist:test", data_dir=tmp_path)
    assert str(p) in one_line(e)


def test_truncated_gz_idx(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=50)
    p = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    gz = p.with_name(p.name + ".gz")
    gz.write_bytes(gzip.compress(p.read_bytes())[:-300])
    p.unlink()
    with pytest.raises(DataError) as e:
        load_dataset("mnist:test", data_dir=tmp_path)
    assert str(gz) in one_line(e)


def test_wrong_magic(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(5), magic=0x00000803, dims=[5, 1, 1])
    with pytest.raises(DataError, match="magic") as e:
        load_dataset("mnist:test", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in one_line(e)


def test_absurd_header(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), dims=[10**6, 1000, 1000])
    with pytest.raises(DataError) as e:  # 10**12 bytes promised: rejected without allocating them
        load_dataset("mnist:test", data_dir=tmp_path)
    assert "t10k-images-idx3-ubyte" in one_line(e)


def test_idx_count_mismatch_and_bad_label(tmp_path):
    write_mnist_like(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_dataset("mnist:test", data_dir=tmp_path)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.full(5, 12))
    with pytest.raises(DataError, match="0..9"):
        load_dataset("mnist:test", data_dir=tmp_path)


def test_cifar_partial_record(tmp_path):
    folder = tmp_path / "cifar-10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(bytes(3073 * 2 + 100))
    with pytest.raises(DataError, match="3073") as e:
        load_dataset("cifar10:test", data_dir=tmp_path)
    assert "test_batch.bin" in one_line(e)
    # the same inside a tar
    tar_path = tmp_path / "t" / "cifar-10" / "cifar-10-binary.tar.gz"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 3073 + 5
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DataError, match="3073"):
        load_dataset("cifar10:test", data_dir=tmp_path / "t")


def test_cifar_small_tar_without_meta(tmp_path):
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, size=(3, 3073), dtype=np.uint8)
    records[:, 0] = [0, 9, 4]
    tar_path = tmp_path / "cifar-10" / "cifar-10-binary.tar.gz"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = records.size
        tar.addfile(info, io.BytesIO(records.tobytes()))
    d = load_dataset("cifar10:test", data_dir=tmp_path)
    assert d.labels.tolist() == [0, 9, 4] and d.classes[9] == "truck"
    np.testing.assert_array_equal(d.images[1, :, :, 1].ravel(), records[1, 1025:2049])
    with pytest.raises(DataError, match="data_batch_1.bin"):
        load_dataset("cifar10:train", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# folders of images
# ---------------------------------------------------------------------------------------------
def test_folder_skips_broken_files_with_warnings(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"ok{i}.png", gradient(40, 42, seed=i))
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(good[:40] + bytes(200) + good[240:])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a jpeg")
    (tmp_path / "truncated.PNG").write_bytes(good[: len(good) // 2])
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    with pytest.warns(SkippedFileWarning) as record:
        d = load_dataset(str(tmp_path))
    msgs = [str(w.message) for w in record if issubclass(w.category, SkippedFileWarning)]
    for name in ("corrupt.png", "zero.png", "notes.jpg", "truncated.PNG"):
        assert sum(f"skipped {tmp_path / name}:" in m for m in msgs) == 1, name
    assert "truncated" in next(m for m in msgs if "truncated.PNG" in m)  # header fine, pixel data cut
    assert msgs[-1] == f"skipped 4 of 7 files in {tmp_path}"
    assert d.images.shape == (3, 40, 42, 3) and d.labels is None and d.classes is None
    np.testing.assert_array_equal(d.images[1], gradient(40, 42, seed=1))
    assert d.name == str(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as e:
        load_dataset(str(tmp_path))
    assert str(tmp_path) in one_line(e)


def test_all_files_broken(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.warns(SkippedFileWarning), pytest.raises(DataError, match="could be read"):
        load_dataset(tmp_path)


def test_class_subfolders(tmp_path):
    save_image(tmp_path / "dog" / "b.png", gradient(8, 8, 1))
    save_image(tmp_path / "cat" / "x" / "deep.png", gradient(8, 8, 1, seed=3))
    save_image(tmp_path / "dog" / "a.PNG", gradient(8, 8, 1, seed=4))
    save_image(tmp_path / ".hidden" / "z.png", gradient(8, 8, 1))
    d = load_dataset(tmp_path)
    assert d.classes == ["cat", "dog"]
    assert d.labels.tolist() == [0, 1, 1] and d.labels.dtype == np.int64
    assert d.images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(d.images[1, ..., 0], gradient(8, 8, 1, seed=4))  # a.PNG sorts before b.png
    # a file at the top level means no labels
    save_image(tmp_path / "top.png", gradient(8, 8, 1))
    d = load_dataset(tmp_path)
    assert d.labels is None and d.classes is None and len(d) == 4


def test_folder_split_subfolder(tmp_path):
    save_image(tmp_path / "train" / "a.png", gradient(6, 6, 1))
    d = load_dataset(tmp_path, "train")
    assert len(d) == 1 and d.name == str(tmp_path / "train")
    with pytest.raises(DataError, match="subfolders: train"):
        load_dataset(tmp_path, "test")


def test_mixed_sizes_need_image_size(tmp_path):
    save_image(tmp_path / "a.png", gradient(40, 30))
    save_image(tmp_path / "b.png", gradient(50, 60))
    save_image(tmp_path / "c.jpg", gradient(64, 64), quality=95)
    with pytest.raises(DataError, match="--image-size") as e:
        load_dataset(tmp_path)
    one_line(e)
    assert load_dataset(tmp_path, image_size=32).images.shape == (3, 32, 32, 3)
    assert load_dataset(tmp_path, image_size=(37, 53)).images.shape == (3, 37, 53, 3)
    assert load_dataset(tmp_path, image_size=[20, 10], channels=1).images.shape == (3, 20, 10, 1)


def test_centre_crop_without_resize(tmp_path):
    img = np.zeros((10, 20), np.uint8)
    img[:, 10:] = 255  # left half black, right half white
    save_image(tmp_path / "wide.png", img)
    d = load_dataset(tmp_path, image_size=10)
    row = d.images[0, 5, :, 0].tolist()
    assert row == [0] * 5 + [255] * 5


def test_resize_covers_then_crops(tmp_path):
    save_image(tmp_path / "tall.png", np.full((40, 20), 77, np.uint8))
    d = load_dataset(tmp_path, image_size=(10, 10))
    assert d.images.shape == (1, 10, 10, 1) and (d.images == 77).all()


def test_rgba_and_palette_transparency_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[1] = (10, 200, 30, 255)
    save_image(tmp_path / "a.png", rgba)
    d = load_dataset(tmp_path)
    assert d.images.shape == (1, 2, 3, 3)
    assert d.images[0, 0, 0].tolist() == [255, 255, 255]
    assert d.images[0, 0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in d.images[0, 0, 2].tolist())
    assert d.images[0, 1, 0].tolist() == [10, 200, 30]
    gray = load_dataset(tmp_path, channels=1)
    assert gray.images.shape == (1, 2, 3, 1) and gray.images[0, 0, 0, 0] == 255

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    other = tmp_path / "gif"
    other.mkdir()
    p.save(other / "p.gif", transparency=0)
    g = load_dataset(other)
    assert g.images.shape == (1, 4, 4, 3)
    assert g.images[0, 0, 0].tolist() == [255, 0, 0] and g.images[0, 3, 3].tolist() == [255, 255, 255]


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    save_image(tmp_path / "a.png", arr)
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    d = load_dataset(tmp_path)
    assert d.images.shape == (1, 2, 2, 1)
    assert d.images[0, ..., 0].tolist() == [[0, 255], [128, 4]]


def test_grayscale_vs_colour_channel_choice(tmp_path):
    save_image(tmp_path / "g.png", gradient(5, 5, 1))
    assert load_dataset(tmp_path).images.shape[-1] == 1
    save_image(tmp_path / "c.bmp", gradient(5, 5, 3))
    d = load_dataset(tmp_path)
    assert d.images.shape == (2, 5, 5, 3)
    g = d.images[1]  # g.png, replicated into three channels
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 0] == gradient(5, 5, 1)).all()


def test_animated_gif_first_frame_and_other_formats(tmp_path):
    frames = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    save_image(tmp_path / "b.tiff", np.full((6, 6), 50, np.uint8))
    save_image(tmp_path / "c.webp", np.full((6, 6), 90, np.uint8), lossless=True)
    d = load_dataset(tmp_path)
    assert d.images.shape == (3, 6, 6, 3)  # WebP is always stored as colour
    assert d.images[:, 0, 0, 0].tolist() == [10, 50, 90]
    d = load_dataset(tmp_path, channels=1)
    assert d.images.shape == (3, 6, 6, 1) and d.images[:, 5, 5, 0].tolist() == [10, 50, 90]
    (tmp_path / "c.webp").unlink()
    assert load_dataset(tmp_path).images.shape == (2, 6, 6, 1)  # grey palette GIF + grey TIFF


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    save_image(tmp_path / "big.png", np.zeros((100, 100), np.uint8))
    save_image(tmp_path / "bigish.png", np.zeros((40, 40), np.uint8))
    save_image(tmp_path / "small.png", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(SkippedFileWarning) as record:
        d = load_dataset(tmp_path)
    assert len(d) == 1
    msgs = [str(w.message) for w in record]
    assert any("big.png" in m for m in msgs) and any("bigish.png" in m for m in msgs)


def test_symlink_loop_is_not_followed(tmp_path):
    save_image(tmp_path / "a" / "x.png", gradient(4, 4, 1))
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    d = load_dataset(tmp_path)
    assert len(d) == 1


def test_lazy_images_match_eager_and_pickle(tmp_path):
    for i in range(5):
        save_image(tmp_path / f"{i}.png", gradient(12 + i, 20 - i, seed=i))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.warns(SkippedFileWarning):
        eager = load_dataset(tmp_path, image_size=(9, 11))
    with pytest.warns(SkippedFileWarning) as record:
        lazy = load_dataset(tmp_path, image_size=(9, 11), max_memory_bytes=100)
    assert [str(w.message) for w in record][-1] == f"skipped 1 of 6 files in {tmp_path}"
    assert isinstance(eager.images, np.ndarray)
    assert isinstance(lazy.images, LazyImages)
    assert lazy.images.shape == eager.images.shape == (5, 9, 11, 3) and lazy.images.dtype == np.uint8
    assert len(lazy) == 5 and lazy.image_shape == (9, 11, 3)
    np.testing.assert_array_equal(lazy.images[:], eager.images)
    np.testing.assert_array_equal(lazy.images[3], eager.images[3])
    np.testing.assert_array_equal(lazy.images[-1], eager.images[4])
    np.testing.assert_array_equal(lazy.images[np.array([4, 0])], eager.images[[4, 0]])
    np.testing.assert_array_equal(np.asarray(lazy.images), eager.images)
    clone = pickle.loads(pickle.dumps(lazy.images))
    np.testing.assert_array_equal(clone[1:3], eager.images[1:3])
    with pytest.raises(IndexError):
        lazy.images[5]
    # works with a DataLoader in worker processes
    loader = torch.utils.data.DataLoader(lazy.images, batch_size=2, num_workers=2)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), eager.images)


# ---------------------------------------------------------------------------------------------
# .npy / .npz and in-memory arrays
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def nhwc():
    return np.random.default_rng(0).integers(0, 256, size=(4, 6, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw", "nhw1", "n1hw"])
def test_npy_layouts(tmp_path, nhwc, layout):
    x = {
        "nhwc": nhwc,
        "nchw": nhwc.transpose(0, 3, 1, 2),
        "nhw": nhwc[..., 0],
        "nhw1": nhwc[..., :1],
        "n1hw": nhwc[..., :1].transpose(0, 3, 1, 2),
    }[layout]
    np.save(tmp_path / "x.npy", x)
    d = load_dataset(str(tmp_path / "x.npy"))
    expected = nhwc if layout in ("nhwc", "nchw") else nhwc[..., :1]
    np.testing.assert_array_equal(d.images, expected)
    assert d.images.dtype == np.uint8 and d.images.flags.c_contiguous
    assert d.labels is None and d.name == str(tmp_path / "x.npy")


def test_npy_float_and_labels_sibling(tmp_path, nhwc):
    np.save(tmp_path / "train.npy", nhwc.astype(np.float64) / 255)
    np.save(tmp_path / "train.labels.npy", np.array([2, 0, 2, 1]))
    d = load_dataset(tmp_path / "train.npy")
    np.testing.assert_array_equal(d.images, nhwc)
    assert d.labels.tolist() == [2, 0, 2, 1] and d.labels.dtype == np.int64
    assert d.classes == ["0", "1", "2"]


def test_npz_keys_and_string_labels(tmp_path, nhwc):
    np.savez(tmp_path / "a.npz", x=nhwc, y=np.array(["cat", "dog", "cat", "ant"]))
    d = load_dataset(tmp_path / "a.npz")
    np.testing.assert_array_equal(d.images, nhwc)
    assert d.classes == ["ant", "cat", "dog"] and d.labels.tolist() == [1, 2, 1, 0]
    np.savez_compressed(tmp_path / "b.npz", images=nhwc.astype(np.int32), labels=np.arange(4))
    assert load_dataset(tmp_path / "b.npz").labels.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "c.npz", whatever=nhwc[..., 0])
    assert load_dataset(tmp_path / "c.npz").images.shape == (4, 6, 7, 1)
    np.savez(tmp_path / "d.npz", a=nhwc, b=nhwc)
    with pytest.raises(DataError, match="'images'"):
        load_dataset(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", images=nhwc, labels=np.arange(3))
    with pytest.raises(DataError, match=r"labels must have shape \(4,\)"):
        load_dataset(tmp_path / "e.npz")


def test_npy_npz_resize_and_channels(tmp_path, nhwc):
    np.save(tmp_path / "x.npy", nhwc)
    d = load_dataset(tmp_path / "x.npy", image_size=(3, 3), channels=1)
    assert d.images.shape == (4, 3, 3, 1)
    # channel conversion matches PIL's
    g = load_dataset(tmp_path / "x.npy", channels=1).images[..., 0]
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in nhwc])
    np.testing.assert_array_equal(g, pil)
    # resize matches folder decoding of the same image
    save_image(tmp_path / "f" / "0.png", nhwc[0])
    np.testing.assert_array_equal(
        load_dataset(tmp_path / "x.npy", image_size=(5, 4)).images[0],
        load_dataset(tmp_path / "f", image_size=(5, 4)).images[0],
    )


@pytest.mark.parametrize(
    "array, match",
    [
        (np.array([[[None]]], dtype=object), "object array"),
        (np.full((2, 3, 3), np.nan), "NaN"),
        (np.full((2, 3, 3), 1.5), r"\[0, 1\]"),
        (np.full((2, 3, 3), -0.1), r"\[0, 1\]"),
        (np.full((2, 3, 3), 300, dtype=np.int16), "0..255"),
        (np.full((2, 3, 3), -1, dtype=np.int64), "0..255"),
        (np.zeros((2, 3)), "shape"),
        (np.zeros((2, 3, 3, 3, 3)), "shape"),
        (np.zeros((2, 8, 8, 9)), "channel axis"),
        (np.zeros((2, 3, 3), dtype=complex), "dtype"),
    ],
)
def test_npy_rejected(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(path)
    assert str(path) in one_line(e)


def test_npz_object_array_rejected(tmp_path):
    np.savez(tmp_path / "o.npz", images=np.array([np.zeros(3), np.zeros(4)], dtype=object))
    with pytest.raises(DataError, match="object array"):
        load_dataset(tmp_path / "o.npz")


def test_other_file_and_split_on_file(tmp_path, nhwc):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match=".npy/.npz"):
        load_dataset(tmp_path / "x.csv")
    np.save(tmp_path / "x.npy", nhwc)
    with pytest.raises(DataError, match="no splits"):
        load_dataset(tmp_path / "x.npy", "test")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="broken.npy"):
        load_dataset(tmp_path / "broken.npy")


def test_as_uint8_images(nhwc):
    np.testing.assert_array_equal(as_uint8_images(nhwc.transpose(0, 3, 1, 2)), nhwc)
    np.testing.assert_array_equal(as_uint8_images(torch.from_numpy(nhwc) / 255.0), nhwc)
    np.testing.assert_array_equal(as_uint8_images(nhwc.astype(np.int64)), nhwc)
    assert as_uint8_images(np.zeros((2, 5, 5), np.float32)).shape == (2, 5, 5, 1)
    with pytest.raises(DataError, match="^X: "):
        as_uint8_images(np.zeros((10, 64)))
    with pytest.raises(DataError, match="^X: .*NaN"):
        as_uint8_images(np.full((1, 2, 2), np.nan))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    h=st.integers(1, 9).filter(lambda v: v not in (1, 3, 4)),
    w=st.integers(1, 9).filter(lambda v: v not in (1, 3, 4)),
    c=st.sampled_from([1, 3, 4]),
    channel_first=st.booleans(),
    as_float=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_as_uint8_images_roundtrip(n, h, w, c, channel_first, as_float, seed):
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    y = x.transpose(0, 3, 1, 2) if channel_first else x
    if as_float:
        y = y.astype(np.float32) / 255
    np.testing.assert_array_equal(as_uint8_images(y), x)


def test_to_float_nchw(nhwc):
    t = to_float_nchw(nhwc)
    assert t.dtype == torch.float32 and t.shape == (4, 3, 6, 7) and t.is_contiguous()
    assert torch.allclose(t, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    assert float(t.max()) <= 1.0
    ro = nhwc.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(to_float_nchw(ro), t)
    assert torch.equal(to_float_nchw(torch.from_numpy(nhwc)), t)
    with pytest.raises(TypeError):
        to_float_nchw(nhwc.astype(np.float32))


def test_builtin_list_is_public():
    assert BUILTIN_DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10")
