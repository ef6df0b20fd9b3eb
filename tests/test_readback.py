"""Every file convae reads back, tampered; sizes that cannot fit; images and names that are
hostile (issue #28, items 7, 9, 10 and 12).

Real `convae` processes on real files: a tiny run on digits (trained once for the module), its
files replaced by FIFOs, huge sparse files, deep JSON, missing keys, wrong types. Each command
must end in one line and exit 2 (or succeed, where the file only records progress), in
seconds, with memory bounded by what the file justifies.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from cli_helpers import CONVAE, assert_user_error, convae
from convae import ConvAutoencoder
from convae.data import load_dataset
from convae.models import ModelConfig
from convae.models.memory import _meta_net, training_memory

TINY = dict(channels=(4, 8), epochs=1, batch_size=64, device="cpu", threads=1)
FAST = 60  # seconds: a command that waits on a FIFO would hang far longer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny finished run (with its checkpoint), 200 digits as .npy, their features and a results.json."""
    root = tmp_path_factory.mktemp("readback")
    images = load_dataset("digits", "train").images[:200]
    np.save(root / "imgs.npy", images)
    np.save(root / "imgs.labels.npy", np.arange(200) % 10)
    ConvAutoencoder(**TINY).fit(images, run_dir=root / "run")
    convae("extract", root / "run", root / "imgs.npy", "-o", root / "feats.npy", "-q", "--device", "cpu")
    rows = [{"features": "stage1/avg", "classifier": "logreg", "accuracy": 0.5}]
    (root / "results.json").write_text(json.dumps({"rows": rows}))
    return root


@pytest.fixture
def run(work, tmp_path):
    """A copy of the run to tamper with."""
    shutil.copytree(work / "run", tmp_path / "run")
    return tmp_path / "run"


def _replace(path, how):
    """Put something else at `path`: a FIFO, a sparse file of a huge size, or these bytes."""
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(3 << 30)  # 3 GB claimed, nothing on disk
    else:
        path.write_bytes(how)


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("fifo", "a FIFO"),
        ("huge", "too large"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json"),
        (b'{"model": {}}', "config.json"),
        (b'{"model": 3, "train": {}}', "config.json"),
    ],
    ids=["fifo", "huge", "deep", "missing-keys", "wrong-type"],
)
def test_a_tampered_config_json_is_one_line_never_a_hang(run, how, fragment):
    _replace(run / "config.json", how)
    for command in ("info", "layers"):
        assert_user_error(convae(command, run, check=False, timeout=FAST), "config.json", fragment)


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("fifo", "a FIFO"),
        ("huge", "too large"),
        (b"epoch,notes\n1,2\n", "val_mse"),
        (b"epoch,val_mse\n1,0.5,extra\n", "line 2"),
        (b"epoch,val_mse\nnan,0.5\n", "epoch"),
        (b"\xff\xfe\x00", "history.csv"),
    ],
    ids=["fifo", "huge", "missing-column", "ragged", "nan-epoch", "not-utf8"],
)
def test_a_tampered_history_csv_is_one_line(run, how, fragment):
    _replace(run / "history.csv", how)
    assert_user_error(convae("info", run, check=False, timeout=FAST), "history.csv", fragment)
    proc = convae("show", run, "--view", "curves", "-o", run.parent / "c.png", check=False, timeout=FAST)
    assert_user_error(proc, "history.csv")


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("fifo", "a FIFO"),
        ("huge", "too large"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"rowz": []}', "no 'rows'"),
        (b'{"rows": {"a": 1}}', "'rows' is a dict"),
        (b'{"rows": [{"features": "x", "classifier": "y", "accuracy": "high"}]}', "'accuracy' is a str"),
        (b'{"rows": [{"features": "x", "classifier": "y"}]}', "no 'accuracy'"),
    ],
    ids=["fifo", "huge", "deep", "no-rows", "rows-a-dict", "accuracy-a-string", "no-accuracy"],
)
def test_a_tampered_probe_results_json_is_one_line(work, tmp_path, how, fragment):
    results = tmp_path / "results.json"
    shutil.copy(work / "results.json", results)
    _replace(results, how)
    args = ["show", work / "run", "--view", "probe", "--probe", results, "-o", tmp_path / "p.png"]
    assert_user_error(convae(*args, check=False, timeout=FAST), "results.json", fragment)
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("how, fragment", [("fifo", "a FIFO"), ("huge", "too large")])
def test_weights_replaced_by_a_fifo_or_a_huge_file_are_one_line(run, how, fragment):
    _replace(run / "model.safetensors", how)
    assert_user_error(convae("info", run, check=False, timeout=FAST), "model.safetensors", fragment)


@pytest.mark.parametrize("how", ["fifo", "huge", b"not a checkpoint", b"\x80\x02]q\x00(" * 1000])
def test_a_tampered_checkpoint_is_one_line_and_the_run_is_kept(run, work, how):
    before = (run / "model.safetensors").read_bytes()
    _replace(run / "checkpoint" / "last.pt", how)
    proc = convae("fit", work / "imgs.npy", "-o", run, "--resume", "-q", check=False, timeout=FAST)
    assert_user_error(proc, "last.pt")
    assert (run / "model.safetensors").read_bytes() == before


def test_resume_of_a_run_whose_checkpoint_is_gone_says_so_and_retrains_nothing(run, work):
    (run / "checkpoint" / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = convae("fit", work / "imgs.npy", "-o", run, "--resume", "-q", check=False, timeout=FAST)
    assert_user_error(proc, "no checkpoint/last.pt", "nothing to resume")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_progress_record_replaced_by_a_fifo_only_restarts_the_extraction(work, tmp_path):
    out = tmp_path / "feats.npy"
    os.mkfifo(tmp_path / "feats.npy.progress.json")
    convae("extract", work / "run", work / "imgs.npy", "-o", out, "-q", "--device", "cpu", timeout=FAST)
    assert np.array_equal(np.load(out), np.load(work / "feats.npy"))


@pytest.mark.parametrize("how", ["fifo", "huge", b"index,path,label,class\n" + b"9" * 400 + b",,1,x\n"])
def test_a_tampered_index_csv_beside_features_is_one_line(work, tmp_path, how):
    for name in ("feats.npy", "feats.labels.npy", "feats.index.csv"):
        shutil.copy(work / name, tmp_path / name)
    _replace(tmp_path / "feats.index.csv", how)
    feats = tmp_path / "feats.npy"
    args = ["probe", work / "run", "--train", feats, "--test", feats, "-o", tmp_path / "r.json"]
    assert_user_error(convae(*args, check=False, timeout=FAST), "feats.index.csv")


def test_a_config_json_asking_for_a_far_larger_image_is_refused_before_allocating(run, work):
    config = json.loads((run / "config.json").read_text())
    config["model"]["image_size"] = [60000, 60000]  # conv weights fit any size: memory does not
    (run / "config.json").write_text(json.dumps(config))
    for args in (["info", run], ["extract", run, work / "imgs.npy", "-o", run.parent / "f.npy", "-q"]):
        proc = _limited(args)
        assert_user_error(proc, "config.json", "60000x60000 is far beyond")
    assert _peak_child_mb() < 2000


def _limited(args, env=None):
    return subprocess.run(
        [CONVAE, *map(str, args)], capture_output=True, text=True, timeout=FAST, env={**os.environ, **(env or {})}
    )


def _peak_child_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# item 7: sizes that cannot fit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--widths", "60000"], "lower --widths"),
        (["--bottleneck", "dense", "--latent-dim", "16000000"], "lower --widths, --latent-dim"),
        (["--arch", "dense", "--latent-dim", "16000000"], "lower --hidden or --latent-dim"),
        (["--arch", "sparse", "--patches-per-image", "1000000"], "--patches-per-image"),
        (["--arch", "sparse", "--patches-per-image", "1000000000"], "patches_per_image"),
        (["--threads", "100000"], "threads"),
    ],
    ids=["widths", "dense-bottleneck", "dense-arch", "patches", "patches-beyond-the-limit", "threads"],
)
def test_sizes_that_cannot_fit_are_one_line_naming_the_option_before_any_allocation(tmp_path, args, fragment):
    proc = _limited(["fit", "digits", "-o", tmp_path / "run", "--epochs", "1", "-q", *args])
    assert_user_error(proc, fragment)
    assert not (tmp_path / "run").exists()
    assert _peak_child_mb() < 2000  # the estimate allocates nothing of the model


def test_the_memory_budget_can_be_set_and_is_checked(tmp_path):
    base = ["fit", "digits", "-o", tmp_path / "run", "--epochs", "1", "-q", "--widths", "4"]
    proc = _limited(base, env={"CONVAE_MEMORY_LIMIT": "10k"})
    assert_user_error(proc, "more than the 10 KiB of $CONVAE_MEMORY_LIMIT", "lower")
    assert not (tmp_path / "run").exists()
    assert_user_error(_limited(base, env={"CONVAE_MEMORY_LIMIT": "lots"}), "CONVAE_MEMORY_LIMIT")


def test_a_hierarchical_net_is_sized_by_its_statistics_phase(tmp_path):
    """Sampling a stage's data statistics, the hierarchical nets' real training peak, counts in the
    estimate: a budget above a training step but below that phase is refused before the run
    directory exists, naming the phase and --widths; one above it trains. The step's own part is
    the same on every call (it once varied with which freed tensors' ids Python reused)."""
    config = ModelConfig(arch="hsparse", in_channels=1, image_size=(8, 8), channels=(32, 64), kernel_size=3,
                         groups=4, group_size=16)  # fmt: skip
    estimate = training_memory(config, 64)
    assert estimate == training_memory(config, 64)
    upper_step = _meta_net(config).step_activation_bytes(64, 1)  # 16 of the 64 images (the upper fraction)
    assert estimate.activation_bytes >= upper_step > 4 * _meta_net(config).step_activation_bytes(2, 1)
    assert estimate.parameter_bytes + estimate.activation_bytes < 60 << 20 < estimate.total < 200 << 20
    base = ["fit", "digits", "-o", tmp_path / "run", "--epochs", "2", "-q", "--arch", "hsparse", "--widths", "32,64",
            "--groups", "4", "--group-size", "16", "--kernel-size", "3"]  # fmt: skip
    proc = _limited(base, env={"CONVAE_MEMORY_LIMIT": "60M"})
    assert_user_error(proc, "data statistics sampled as a stage begins", "lower --widths")
    assert not (tmp_path / "run").exists()
    proc = _limited(base, env={"CONVAE_MEMORY_LIMIT": "200M"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_an_allocator_failure_anywhere_is_one_line(tmp_path):
    """The estimate let through (a budget set far too high), the allocation itself fails: one line."""

    def cap_address_space():  # in the child only: torch's allocation fails as on a full machine
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run(
        [CONVAE, "fit", "digits", "-o", tmp_path / "run", "--epochs", "1", "-q", "--widths", "30000"],
        capture_output=True,
        text=True,
        timeout=FAST,
        env={**os.environ, "CONVAE_MEMORY_LIMIT": "100T"},
        preexec_fn=cap_address_space,
    )
    assert_user_error(proc, "out of memory")
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# item 10: memory far beyond the input
# ---------------------------------------------------------------------------------------------
def test_images_above_the_pixel_budget_are_skipped_or_decoded_reduced(tmp_path):
    folder = tmp_path / "imgs"
    for k in range(2):
        (folder / f"c{k}").mkdir(parents=True)
        Image.new("RGB", (40, 40), (k * 90, 0, 0)).save(folder / f"c{k}" / "small.png")
    Image.new("RGBA", (9400, 9400), (50, 0, 0, 255)).save(folder / "c0" / "huge.png")  # 88 M pixels, 370 kB
    Image.new("RGB", (8000, 8000), (0, 80, 0)).save(folder / "c1" / "photo.jpg")  # 64 M pixels, drafted to 1/8
    proc = convae("fit", folder, "-o", tmp_path / "run", "--image-size", "8", "--epochs", "1", "-q", "--widths", "4")
    assert "huge.png" in proc.stderr and "CONVAE_MAX_IMAGE_PIXELS" in proc.stderr
    assert "photo.jpg" not in proc.stderr  # decoded at 1000x1000, within the budget
    assert "(3 images)" in proc.stdout
    assert _peak_child_mb() < 2000  # the 88 M pixel PNG alone would be 350 MB a copy
    proc = convae("fit", folder, "-o", tmp_path / "run2", "--image-size", "8", "--epochs", "1", "-q", "--widths", "4",
                  env={**os.environ, "CONVAE_MAX_IMAGE_PIXELS": "100000000"})  # fmt: skip
    assert "(4 images)" in proc.stdout


def test_a_feature_npz_claiming_terabytes_is_refused_before_inflating(work, tmp_path):
    bomb = tmp_path / "bomb.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 20)}
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("features.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * (1 << 20))
    args = ["probe", work / "run", "--train", bomb, "--test", bomb, "-o", tmp_path / "r.json"]
    assert_user_error(convae(*args, check=False, timeout=FAST), "bomb.npz")
    assert _peak_child_mb() < 2000


# ---------------------------------------------------------------------------------------------
# item 12: side files, leftovers, names, nesting
# ---------------------------------------------------------------------------------------------
def test_side_files_are_never_replaced_without_their_output(work, tmp_path):
    out, labels = tmp_path / "feats.npy", tmp_path / "feats.labels.npy"
    labels.write_bytes(b"the user's labels")
    extract = ["extract", work / "run", work / "imgs.npy", "-q", "--device", "cpu", "-o"]
    assert_user_error(convae(*extract, out, check=False), "feats.labels.npy", "move it")
    assert labels.read_bytes() == b"the user's labels" and not out.exists()
    labels.unlink()
    convae(*extract, out)  # OUT, OUT.labels.npy, OUT.index.csv
    assert_user_error(convae(*extract, tmp_path / "feats.npz", check=False), "feats.index.csv")
    np.save(tmp_path / "plain.npy", np.load(work / "imgs.npy"))  # the same images without labels
    convae("extract", work / "run", tmp_path / "plain.npy", "-q", "--device", "cpu", "-o", out)
    assert not labels.exists()  # the earlier output's labels went with it: never paired with new rows
    (tmp_path / "r.md").write_text("the user's notes")
    probe = ["probe", work / "run", "--train", out, "--test", out, "-o", tmp_path / "r.json"]
    assert_user_error(convae(*probe, check=False), "r.md")
    assert (tmp_path / "r.md").read_text() == "the user's notes"


def test_a_killed_packings_temporary_is_removed_and_a_look_alike_kept(work, tmp_path):
    left = tmp_path / ".feats.npz.k1ll3d_x.tmp"  # what atomic_path names it
    left.write_bytes(b"\0" * 4096)
    look_alike = tmp_path / ".feats.npz.my-notes.tmp"
    look_alike.write_text("the user's")
    convae("extract", work / "run", work / "imgs.npy", "-o", tmp_path / "feats.npz", "-q", "--device", "cpu")
    assert not left.exists() and look_alike.read_text() == "the user's"


def test_a_newline_in_a_name_cannot_forge_a_line(tmp_path):
    name = tmp_path / "x\nconvae: error: forged"
    proc = convae("info", name, check=False)
    assert_user_error(proc, "\\nconvae: error: forged")
    assert len(proc.stderr.strip().splitlines()) == 1
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8), 5).save(folder / "a.png")
    Image.new("L", (8, 8), 9).save(folder / "b.png")
    (folder / "bad\nconvae: error: forged.png").write_bytes(b"not an image")
    proc = convae("fit", folder, "-o", tmp_path / "run", "--epochs", "1", "-q", "--widths", "4")
    assert all(line.startswith("convae: warning:") for line in proc.stderr.strip().splitlines()), proc.stderr


def test_folders_nested_past_a_thousand_levels(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8), 5).save(folder / "top.png")
    deep = folder
    for _ in range(1100):  # (os.makedirs would recurse once per level)
        deep = deep / "d"
        deep.mkdir()
    Image.new("L", (8, 8), 9).save(os.path.join(deep, "deep.png"))
    out = os.path.join(tmp_path, *["o"] * 1100, "run")
    try:
        proc = convae("fit", folder, "-o", out, "--epochs", "1", "-q", "--widths", "4")
        assert "(2 images)" in proc.stdout and os.path.isfile(os.path.join(out, "config.json"))
    finally:  # shutil.rmtree recurses once per level too: pytest could not clean these up
        for top in (folder, tmp_path / "o"):
            remove_tree(top)


def remove_tree(top) -> None:
    """rm -rf without recursion."""
    folders, stack = [], [str(top)]
    while stack:
        folder = stack.pop()
        folders.append(folder)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
