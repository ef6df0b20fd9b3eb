"""Beyond the probe, on real files: rows that know their files (also after a kill and a resume,
sharded, as Parquet), anomaly scores, similar images, and one labelled folder split for the probe."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli_helpers
import convae
from cli_helpers import assert_user_error
from convae.analysis import nearest
from convae.data import load_dataset
from convae.features import FeatureExtractor, extract_to_file, load_features, shard_images, shard_path, shard_range
from convae.probe import ProbeOptions, probe_splits
from killing import kill_when

pytestmark = pytest.mark.usefixtures("one_thread")

ENV_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_convae(*args, check=True):
    """The installed `convae`, on one thread (spinning threads on 2 shared cores are slow)."""
    return cli_helpers.convae(*args, check=check, env={**os.environ, **ENV_THREADS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mnist(shared_datasets):
    return (
        load_dataset("mnist", "train", data_dir=shared_datasets, download=False),
        load_dataset("mnist", "test", data_dir=shared_datasets, download=False),
    )


@pytest.fixture(scope="module")
def folder(mnist, tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """3,000 real MNIST test digits as PNG files in class subfolders: (root, sorted relative paths, labels)."""
    root = tmp_path_factory.mktemp("photos") / "digits"
    test = mnist[1]
    rows = np.concatenate([np.flatnonzero(test.labels == c)[:300] for c in range(10)])
    for i in rows:
        path = root / str(test.labels[i]) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, ..., 0]).save(path)
    paths = sorted(f"{test.labels[i]}/{i:05d}.png" for i in rows)
    return root, paths, np.array([int(p.split("/")[0]) for p in paths])


@pytest.fixture(scope="module")
def small(folder, tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """The first 60 digits of each class of `folder`: 600 files."""
    root = tmp_path_factory.mktemp("small") / "digits"
    firsts = _firsts(folder[1])
    paths = [p for p in folder[1] if int(p.split("/")[1][:-4]) in firsts]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder[0] / p, root / p)
    return root, paths, np.array([int(p.split("/")[0]) for p in paths])


def _firsts(paths: list[str], per_class: int = 60) -> set[int]:
    by_class: dict[str, list[int]] = {}
    for p in paths:
        c, name = p.split("/")
        by_class.setdefault(c, []).append(int(name[:-4]))
    return {i for ids in by_class.values() for i in sorted(ids)[:per_class]}


@pytest.fixture(scope="module")
def run(mnist, tmp_path_factory) -> Path:
    """A small ConvAE trained one epoch on 2,000 MNIST train images (saved as .npy, as a user's array)."""
    root = tmp_path_factory.mktemp("run")
    np.save(root / "train.npy", mnist[0].images[:2000])
    np.save(root / "train.labels.npy", mnist[0].labels[:2000])
    run_convae("fit", root / "train.npy", "--out", root / "run", "--epochs", 1, "--widths", "8,16", "--quiet")
    return root / "run"


# -- rows that know their files -------------------------------------------------------------------
def test_the_index_matches_the_files_row_for_row_after_a_kill_and_a_resume(run, folder, tmp_path):
    root, paths, labels = folder
    out = tmp_path / "feats.npy"
    progress = tmp_path / "feats.npy.progress.json"
    args = ["extract", run, root, "-o", out, "--layers", "all", "--pool", "flatten", "--batch-size", 1, "--quiet"]

    def part_done() -> bool:
        try:
            return json.loads(progress.read_text())["rows_done"] > 0
        except (OSError, ValueError, KeyError):
            return False

    outcome = kill_when(args, part_done, env=ENV_THREADS)
    assert outcome.killed, outcome.stderr
    done = json.loads(progress.read_text())["rows_done"]
    assert 0 < done < len(paths)
    assert not out.exists() and not (tmp_path / "feats.index.csv").exists()  # never a half-written result

    proc = run_convae(*args[:-3], "--quiet")  # the batch size is not part of what is resumed
    assert f"resumed at image {done:,}" in proc.stdout
    rows = read_csv(tmp_path / "feats.index.csv")
    assert [r["path"] for r in rows] == paths  # row for row, the folder's files in order
    assert [int(r["index"]) for r in rows] == list(range(len(paths)))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert [r["class"] for r in rows] == [p.split("/")[0] for p in paths]

    feats = load_features(out)
    X, y = feats  # the pair callers always had
    assert feats.index.paths == paths and np.array_equal(y, labels)
    model, _ = convae.load_model(run)
    ex = FeatureExtractor(model, "all", "flatten")
    for i in (0, done - 1, done, len(paths) - 1):  # each row is its own file's features, both sides of the kill
        image = np.asarray(Image.open(root / paths[i]))[None, ..., None]
        np.testing.assert_allclose(X[i], ex.transform(image)[0], rtol=1e-5, atol=1e-5)


def test_sharded_extractions_keep_the_index_in_order(run, folder, tmp_path):
    data = load_dataset(folder[0])
    model, _ = convae.load_model(run)
    ex = FeatureExtractor(model, "stage1", "avg")
    index = data.source_index()
    for rank in range(3):
        images, labels = shard_images(data.images, data.labels, rank, 3)
        part = index.take(slice(*shard_range(len(data), rank, 3)))
        extract_to_file(ex, images, shard_path(tmp_path / "f.npy", rank, 3), labels=labels, index=part)
    got = load_features(tmp_path / "f.npy")
    assert got.index.paths == folder[1] and got.index.index.tolist() == list(range(len(data)))
    np.testing.assert_array_equal(got.features, ex.transform(data.images))
    # a subset keeps each image's own index and path
    sub = data.subset(np.arange(5, 3000, 700))
    assert sub.source_index().index.tolist() == [5, 705, 1405, 2105, 2805] and sub.paths[1] == folder[1][705]


def test_parquet_has_the_index_then_one_column_per_feature(run, small, tmp_path):
    pd = pytest.importorskip("pandas")
    root, paths, labels = small
    run_convae(
        "extract", run, root, "-o", tmp_path / "f", "--format", "parquet", "--layers", "stage1", "--pool", "grid2", "-q"
    )
    df = pd.read_parquet(tmp_path / "f.parquet")
    assert list(df.columns[:4]) == ["index", "path", "label", "class"]
    assert df["path"].tolist() == paths and df["label"].tolist() == labels.tolist()
    model, _ = convae.load_model(run)
    ex = FeatureExtractor(model, "stage1", "grid2")
    assert list(df.columns[4:]) == ex.feature_names
    np.testing.assert_allclose(df.iloc[:50, 4:].to_numpy(), ex.transform(load_dataset(root).images[:50]), rtol=1e-6)
    again = load_features(tmp_path / "f.parquet")
    assert again.index.paths == paths and again.features.shape == (len(paths), ex.dim)
    proc = run_convae("extract", run, root, "-o", tmp_path / "g.npy", "--format", "parquet", check=False)
    assert_user_error(proc, "--format parquet", "g.npy")


# -- anomaly scores ---------------------------------------------------------------------------------
def test_scores_rank_a_planted_corrupted_image_first(run, small, tmp_path):
    root, paths, _ = small
    data = tmp_path / "data"
    for p in paths[::3]:  # 200 real digits
        (data / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / p, data / p)
    # a file whose pixels a broken writer replaced by a checkerboard of dead and stuck pixels
    bad = (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(bad).save(data / "7" / "corrupted.png")
    out = tmp_path / "scores.csv"
    proc = run_convae(
        "score", run, data, "-o", out, "--threshold-quantile", "0.99", "--layers", "stage2", "--pool", "grid2"
    )
    rows = read_csv(out)
    assert len(rows) == 201 and rows[0]["path"] == "7/corrupted.png" and rows[0]["outlier"] == "True"
    assert [int(r["rank"]) for r in rows] == list(range(1, 202))
    knn = [float(r["knn"]) for r in rows]
    assert knn == sorted(knn, reverse=True)  # worst first
    for score in ("mse", "ssim_error"):
        assert max(rows, key=lambda r: float(r[score]))["path"] == "7/corrupted.png"
    assert sum(r["outlier"] == "True" for r in rows) < 20  # the threshold is a high quantile of the training images'
    assert "7/corrupted.png" in proc.stdout and "above the 0.99 quantile" in proc.stdout
    by_mse = run_convae("score", run, data, "-o", tmp_path / "mse.csv", "--by", "mse", "--train", "none")
    assert (
        read_csv(tmp_path / "mse.csv")[0]["path"] == "7/corrupted.png"
        and "knn" not in read_csv(tmp_path / "mse.csv")[0]
    )
    assert "worst first by mse" in by_mse.stdout
    proc = run_convae(
        "score", run, data, "-o", tmp_path / "s.csv", "--train", "none", "--threshold-quantile", "0.9", check=False
    )
    assert_user_error(proc, "--train")


def test_the_outliers_view_ranks_the_worst_reconstructed_first(run, small):
    model, _ = convae.load_model(run)
    images = load_dataset(small[0]).images[:300]
    found = convae.views.worst_reconstructed(model, images, 5)
    assert found.error_maps.shape == (5, 28, 28) and np.all(np.diff(found.mse) <= 0)
    mse, _ = convae.analysis.reconstruction_errors(model, images)
    np.testing.assert_array_equal(found.rows, np.argsort(-mse, kind="stable")[:5])
    np.testing.assert_allclose(found.mse, mse[found.rows], rtol=1e-5)


# -- similar images ---------------------------------------------------------------------------------
def _self_neighbours(run, root, out, *options):
    """`convae neighbors` of a folder among itself: 3 neighbours each, in stage2/grid2 features."""
    common = ("--k", 3, "--layers", "stage2", "--pool", "grid2")
    return run_convae("neighbors", run, "--index", root, "--query", root, "-o", out, *common, *options)


def test_neighbours_of_an_image_include_itself_first(run, small, tmp_path):
    root, paths, _ = small
    out = tmp_path / "nb.png"
    proc = _self_neighbours(run, root, out, "--show", 4)
    rows = read_csv(tmp_path / "nb.csv")
    assert len(rows) == 3 * len(paths)
    firsts = [r for r in rows if r["rank"] == "1"]
    images = {p: np.asarray(Image.open(root / p)) for p in paths}
    for r in firsts:  # itself, or a pixel-identical image
        assert r["path"] == r["query_path"] or np.array_equal(images[r["path"]], images[r["query_path"]])
        assert float(r["similarity"]) > 0.9999
    assert sum(r["path"] == r["query_path"] for r in firsts) >= len(paths) - 5
    table = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()[2:5]}
    assert set(table) == {"convae/stage2/grid2", "pixels", "random/stage2/grid2"}
    assert all(0.3 < p <= 1 for p in table.values())  # itself counts: precision@3 of 600 digits
    with Image.open(out) as img:
        assert img.format == "PNG" and min(img.size) > 100


def test_neighbours_and_scores_take_the_compile_mode_of_extraction(run, small, tmp_path):
    """`--compile always` (a real torch.compile of the extraction) finds the uncompiled pass's
    neighbours; a mode that is not one of auto/always/never is a one-line error naming --compile."""
    root, _, _ = small
    for mode in ("never", "always"):
        _self_neighbours(run, root, tmp_path / f"{mode}.png", "--baselines", "none", "-q", "--compile", mode)
    plain, fast = read_csv(tmp_path / "never.csv"), read_csv(tmp_path / "always.csv")
    assert len(plain) == len(fast) > 0
    assert sum(a["index"] != b["index"] for a, b in zip(plain, fast)) <= 3  # ties broken otherwise at rounding
    np.testing.assert_allclose(
        [float(r["similarity"]) for r in fast], [float(r["similarity"]) for r in plain], atol=1e-4
    )
    proc = run_convae("score", run, root, "-o", tmp_path / "s.csv", "--compile", "sometimes", check=False)
    assert_user_error(proc, "--compile")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_search_is_exact(metric):
    rng = np.random.default_rng(0)
    index, queries = rng.normal(size=(301, 17)).astype(np.float32), rng.normal(size=(40, 17)).astype(np.float32)
    found = nearest(queries, index, 5, metric=metric, index_chunk=7)
    if metric == "cosine":
        a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (queries, index))
        sims = a @ b.T
    else:
        sims = -np.linalg.norm(queries[:, None] - index[None], axis=2)
    np.testing.assert_array_equal(found.indices, np.argsort(-sims, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(found.similarity, -np.sort(-sims, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    own = nearest(index[:10], index, 2, metric=metric, exclude=np.arange(10), index_chunk=7)
    assert not (own.indices == np.arange(10)[:, None]).any()  # leave-one-out


# -- one labelled folder is enough --------------------------------------------------------------------
def test_the_cv_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [40, 25, 10, 5])  # imbalanced classes
    folds = probe_splits(labels, ProbeOptions(cv=5, baselines="none"))
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))  # every image tested exactly once
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == len(labels)
        assert np.array_equal(np.bincount(labels[test]), [8, 5, 2, 1])  # each class a fifth per fold
    ((train, test),) = probe_splits(labels, ProbeOptions(test_fraction=0.2, baselines="none"))
    assert np.array_equal(np.bincount(labels[test]), [8, 5, 2, 1]) and not set(train) & set(test)
    again = probe_splits(labels, ProbeOptions(test_fraction=0.2, baselines="none"))
    assert np.array_equal(again[0][1], test)  # the seed fixes the split
    with pytest.raises(convae.ConfigError, match="smallest class has 5"):
        probe_splits(labels, ProbeOptions(cv=6, baselines="none"))


def test_probe_one_labelled_folder_by_hold_out_or_cross_validation(run, small, tmp_path):
    root = small[0]
    common = ["--layers", "stage2", "--baselines", "pixels", "--quiet"]
    run_convae("probe", run, "--data", root, "--cv", 3, "-o", tmp_path / "cv.json", *common)
    doc = json.loads((tmp_path / "cv.json").read_text())
    assert doc["split"] == {"cv": 3, "stratified": True, "seed": 0} and doc["data"] == str(root)
    assert [r["features"] for r in doc["rows"]] == ["stage2/grid4", "pixels"]
    for r in doc["rows"]:
        assert r["folds"] == 3 and 0 < r["accuracy_std"] < 0.1 and 0.5 < r["accuracy"] <= 1
        assert isinstance(r["iterations"], int) and r["iterations"] > 0  # the folds' mean, logreg's steps
    assert "(3 folds)" in (tmp_path / "cv.md").read_text()
    run_convae("probe", run, "--data", root, "--test-fraction", 0.2, "-o", tmp_path / "ho.json", *common)
    doc = json.loads((tmp_path / "ho.json").read_text())
    assert doc["split"]["test_fraction"] == 0.2 and "folds" not in doc["rows"][0]
    for args, fragment in (
        (["--data", root], "--test-fraction"),
        (["--data", root, "--cv", 3, "--test-fraction", 0.2], "give one"),
    ):
        assert_user_error(run_convae("probe", run, *args, "-o", tmp_path / "x.json", check=False), fragment)


# -- between two images -------------------------------------------------------------------------------
def test_interpolation_by_paths_decodes_the_line_between_two_codes(run, small, tmp_path):
    root, paths, _ = small
    a, b = paths[0], paths[-1]
    run_convae("show", run, root, "--view", "interpolate", "--index", f"{a},{b}", "-n", 5, "-o", tmp_path / "i.png")
    model, _ = convae.load_model(run)
    ia, ib = (np.asarray(Image.open(root / p))[..., None] for p in (a, b))
    found = convae.views.interpolate_codes(model, ia, ib, 5)
    with torch.inference_mode():
        ends = model.decode(model.encode(convae.tensors.to_float_nchw(np.stack([ia, ib]))))
    np.testing.assert_allclose(found.decoded[[0, -1]], ends.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(found.blended[2], (ia / 255.0 + ib / 255.0) / 2, atol=1e-6)
    ctx = convae.views.ViewContext(model, data=load_dataset(root), indices=["0/nope.png", 1])
    with pytest.raises(convae.ConfigError, match="0/nope.png"):
        ctx.picked()
    assert ctx.name_of(ctx._row(b)) == b and ctx._row(b.split("/")[1]) == len(paths) - 1  # by unique name too
