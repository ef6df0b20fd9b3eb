"""The benchmark scripts' own promises: the photo folders they write, the results section they replace."""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from convae.data import load_dataset
from convae.data.containers import ImageData
from convae.features import FeatureExtractor
from convae.models import build_model, default_model_config
from convae.probe import int8

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import compiled_extraction  # noqa: E402
import linear_probe  # noqa: E402
import photo_folders  # noqa: E402
import precondition  # noqa: E402
import quality  # noqa: E402
import roofline  # noqa: E402
import validate  # noqa: E402

CLASSES = ["airplane", "automobile", "bird"]


@pytest.fixture
def fake_cifar(monkeypatch):
    """CIFAR-10 stand-in: 30 images a split, labels class by class in blocks, so a plain head would be one class."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 10)
    monkeypatch.setattr(photo_folders, "load_dataset", lambda *a, **k: ImageData(images, labels, CLASSES, "cifar10"))


def test_photo_folders_are_balanced_class_folders_written_once(tmp_path, fake_cifar):
    out = photo_folders.write_photo_folder(48, tmp_path / "p", limit=6, data_dir=tmp_path)
    train = load_dataset(out, "train")
    assert train.images.shape == (6, 48, 48, 3) and train.classes == CLASSES
    assert np.bincount(train.labels).tolist() == [2, 2, 2]  # every class, in both splits
    assert load_dataset(out, "test").classes == CLASSES
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    photo_folders.write_photo_folder(48, tmp_path / "p", limit=6, data_dir=tmp_path)  # complete: left as it is
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == stamp
    photo_folders.write_photo_folder(48, tmp_path / "p", limit=9, data_dir=tmp_path)  # other settings: replaced
    assert len(load_dataset(out, "train").images) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary or old folder left


def test_photo_folders_never_touch_a_folder_they_did_not_write(tmp_path, fake_cifar):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"a user's file")
    with pytest.raises(SystemExit, match="was not written by"):
        photo_folders.write_photo_folder(48, mine, limit=6, data_dir=tmp_path)
    assert [p.name for p in mine.iterdir()] == ["cat.jpg"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, fake_cifar):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(photo_folders, "_write_split", fail)
    with pytest.raises(OSError, match="disk full"):
        photo_folders.write_photo_folder(48, tmp_path / "p", limit=6, data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_roofline_section_replaces_its_earlier_self_only(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## Roofline — old\n\nold table\n\n## Speed\n\nkept\n", encoding="utf-8")
    roofline.write_section(results, ["## Roofline — new", "", "new table", ""])
    assert results.read_text(encoding="utf-8") == "# R\n\n## Roofline — new\n\nnew table\n\n## Speed\n\nkept\n"
    results.write_text("# R\n\n## Speed\n\nkept\n", encoding="utf-8")
    roofline.write_section(results, ["## Roofline — new", "", "t", ""])
    assert results.read_text(encoding="utf-8") == "# R\n\n## Speed\n\nkept\n\n## Roofline — new\n\nt\n"


def test_quality_never_rewrites_a_section_with_blocks_written_by_hand():
    generated = (
        "# R\n\n## Quality\n\nMeasured today on x.\n\n| table |\n\nNotes (by hand): kept.\n\n### a note\n\n## Speed\n"
    )
    assert not quality.hand_written_blocks(generated, "Quality")  # what it writes, notes and all: rewritable
    assert not quality.hand_written_blocks("# R\n\n## Speed\n", "Quality")  # no section yet: appended
    by_hand = generated.replace("## Quality\n\n", "## Quality\n\n### a test run, by hand\n\nrows\n\n")
    assert quality.hand_written_blocks(by_hand, "Quality")
    body = quality.section({}, quality.meta_info(2), quality.current_notes(generated, "Quality"))
    assert not quality.hand_written_blocks(quality.replace_section(generated, "Quality", body), "Quality")


def test_quality_reports_the_spread_over_training_seeds():
    result = {
        "headline": {"accuracy": 0.9937},
        "seeds": [{"seed": 1, "accuracy": 0.9947}, {"seed": 2, "accuracy": 0.9943}],
    }
    assert quality.spread(result) == "0.9942 ± 0.0005 (3)"  # sample std (ddof 1), the preset's run counted
    assert quality.spread({"headline": {"accuracy": 0.99}}) == "–"  # one seed: no spread claimed
    assert quality._seeds("1,2") == [1, 2]
    for wrong in ("0,1", "2,2"):  # seed 0 is the preset's own run; a seed counted twice is not spread
        with pytest.raises(argparse.ArgumentTypeError):
            quality._seeds(wrong)


def test_a_stage_is_held_to_the_larger_of_its_compute_and_memory_bounds():
    limits = {"fp32": {"peak": 100.0}, "bf16": None, "bandwidth": {"gb_per_s": 10.0}}
    compute = roofline.bound(roofline.stage("extract", 10, "images", 2.0, flops=100e9, nbytes=1e9, peak="fp32"), limits)
    assert compute["bound"] == "fp32 matmul peak" and compute["bound_seconds"] == 1.0
    assert compute["fraction_of_bound"] == 0.5
    memory = roofline.bound(roofline.stage("probe", 5, "passes", 4.0, flops=1e9, nbytes=20e9, peak="fp32"), limits)
    assert memory["bound"] == "memory bandwidth" and memory["fraction_of_bound"] == 0.5
    assert roofline.bound(roofline.stage("read", 10, "images", 1.0), limits)["bound"] is None


def test_a_pass_in_two_precisions_is_bounded_by_each_part_at_its_own_peak():
    """The hierarchical model's extraction convolves in bf16 and multiplies in fp32: FLOPs counted
    per dtype (from a real forward pass), each part over its peak, the parts' times added."""
    x = torch.rand(4, 8, 8)
    with roofline.FlopsByDtype() as counted:
        torch.mm(x[0], x[1])  # 2 * 8^3 in fp32
        torch.mm(x[2].bfloat16(), x[3].bfloat16())  # the same in bf16
    assert dict(counted.flops) == {"fp32": 1024, "bf16": 1024}
    limits = {"fp32": {"peak": 100.0}, "bf16": {"peak": 400.0}, "bandwidth": {"gb_per_s": 10.0}}
    s = roofline.stage("extract", 10, "images", 2.0, flops=500e9, nbytes=1e9, peak="bf16+fp32",
                       flops_by_peak={"fp32": 100e9, "bf16": 400e9})  # fmt: skip
    b = roofline.bound(s, limits)
    assert b["bound_seconds"] == 2.0 and b["fraction_of_bound"] == 1.0  # 1 s at fp32's peak + 1 s at bf16's


def test_the_roofline_probes_8_bit_codes_on_int8_products_at_the_int8_peak(shared_datasets):
    """--probe-dtype uint8: the classifiers fit the features' 8-bit codes (a byte a value read a
    pass) and, where the CPU multiplies int8, are bounded by the int8 peak for the digits' products."""
    data = load_dataset("mnist:test", data_dir=shared_datasets, download=False)
    images, labels = data.images[:600], data.labels[:600]
    torch.manual_seed(0)
    extractor = FeatureExtractor(build_model(default_model_config(images.shape[1:])), "bottleneck", "grid2")
    features = extractor.transform(images)
    codes = roofline.probe_matrix(features, "uint8")
    assert codes.dtype == np.uint8 and codes.shape == features.shape and np.ptp(codes) > 100  # the range is used
    rows = roofline.probe_stages(features, labels, extractor, "uint8")
    assert [r["stage"] for r in rows] == ["probe logreg fit", "probe linsvm fit"]
    for r in rows:
        assert r["bytes"] == r["count"] * features.size  # a byte a code, every pass
        assert r["peak"] == ("int8" if int8.available() else "fp32") and r["dtype"] == "uint8"
        per_pass = 2 * (int8.WEIGHT_DIGITS + int8.RESIDUAL_DIGITS) if int8.available() else 4
        assert r["flops"] == (r["count"] - 1) * per_pass * features.size * 10  # 10 classes
    limits = {"fp32": {"peak": 100.0}, "int8": {"peak": 400.0}, "bandwidth": {"gb_per_s": 10.0}}
    peak = limits[rows[0]["peak"]]["peak"] * 1e9
    assert roofline.bound(rows[0], limits)["bound_seconds"] == max(rows[0]["flops"] / peak, rows[0]["bytes"] / 10e9)


def test_precondition_compares_both_arms_on_a_feature_file(shared_datasets, tmp_path, capsys):
    """benchmarks/precondition.py fits a 16-bit feature file's rows both ways and reports each arm;
    on CIFAR-10's correlated pixels the preconditioned arm takes far fewer passes to an objective
    no higher, and the held-out rows agree."""
    data = load_dataset("cifar10:test", data_dir=shared_datasets, download=False)
    X = data.images[:, ::2, ::2].reshape(len(data.images), -1).astype(np.float16) / 255
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "x.labels.npy", data.labels)
    assert precondition.main([str(tmp_path / "x.npy"), "--holdout", "1000", "--c-scale", "1", "--threads", "1"]) == 0
    arms = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"]
    plain, pre = arms["plain"], arms["precondition"]
    assert pre["passes"] * 5 < plain["passes"] and pre["objective"] <= plain["objective"] * 1.0001
    assert abs(pre["holdout_accuracy"] - plain["holdout_accuracy"]) <= 0.01


def test_validate_names_each_swept_combination_as_earlier_runs_did():
    """validate.py's rows are skipped by name on a rerun: a max_iter list keeps its earlier names
    ("probe@300"), precondition and c_scale lists add theirs, every combination once."""
    assert validate._sweep("p", {"max_iter": 300}) is None
    assert [r for r, _ in validate._sweep("p", {"max_iter": [150, 300], "c_scale": 4.0})] == ["p@150", "p@300"]
    rows = validate._sweep("p", {"max_iter": [300], "precondition": [False, True], "c_scale": [2.0, 4.0]})
    assert [r for r, _ in rows] == ["p@300+c2", "p@300+precondition+c2", "p@300+c4", "p@300+precondition+c4"]
    assert rows[1][1] == {"max_iter": 300, "precondition": True, "c_scale": 2.0}
    assert validate._row_names("p", {"c_scale": [2.0], "precondition": True}) == ["p+precondition+c2"]


def test_compiled_extraction_times_both_arms_on_the_same_images(shared_datasets):
    """benchmarks/compiled_extraction.py: a preset's model extracts the same images uncompiled and
    compiled (a real torch.compile), a rate for each arm and round, features that agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the extractor's warning that compiling failed
        r = compiled_extraction.measure("mnist-convae", str(shared_datasets), 40, rounds=1)
    assert r["images"] == 40 and r["compile_seconds"] > 0
    assert isinstance(r["compile_mb"], float)  # /proc/self/statm: CI runs on Linux
    assert len(r["images_per_s"]["never"]) == len(r["images_per_s"]["always"]) == 1
    assert r["difference"]["mean"] < 1e-4


def test_linear_probe_times_both_paths_of_a_pass_over_8_bit_codes(tmp_path):
    """benchmarks/linear_probe.py --dtype uint8: codes written as uint8, and a pass timed on the
    int8 products and on float32 chunks converted from the same codes."""
    labels = linear_probe.write_features(tmp_path / "x.npy", 600, 96, 3, "uint8")
    X = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert X.dtype == np.uint8 and X.shape == (600, 96) and 0 < X.max() <= 255 and len(labels) == 600
    timed = {
        products: linear_probe.time_passes(X, labels, "workers", 1, 1, 100, "memmap", products=products)
        for products in ("int8", "float32")
    }
    assert [t["mode"] for t in timed.values()] == ["workers int8", "workers float32"]
    assert all(t["chunk_rows"] == 100 and t["pass_s"] > 0 and t["bytes"] == X.nbytes for t in timed.values())
