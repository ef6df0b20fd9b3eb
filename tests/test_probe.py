"""`run_probe` and `convae probe`: classifiers on each layer's features, beside honest baselines."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from convae import ConvAutoencoder
from convae.data import load_dataset
from convae.errors import ConfigError
from convae.features import FeatureExtractor
from convae.models import code_size
from convae.probe import (
    COLUMNS,
    FeatureSet,
    LinearSVM,
    ProbeOptions,
    Whitener,
    calibrate,
    evaluate_feature_sets,
    evaluate_features,
    label_subsets,
    markdown_table,
    mirrored,
    predict_with_mirrors,
    probe_feature_files,
    probe_feature_sets,
    run_probe,
    write_results,
)
from convae.probe.classifiers import CLASSIFIERS
from convae.probe.driver import _layer_sets, _pca_dims, column_order

CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """A ConvAE trained briefly on digits:train, and the dense autoencoder to compare with."""
    train, _ = digits
    root = tmp_path_factory.mktemp("probe")
    ConvAutoencoder(epochs=6, channels=(16, 32), batch_size=64, lr=3e-3, seed=0).fit(
        train.images, run_dir=root / "conv", data_spec="digits"
    )
    ConvAutoencoder(arch="dense", hidden=(64,), latent_dim=16, epochs=3, batch_size=64, seed=0).fit(
        train.images, run_dir=root / "dense", data_spec="digits"
    )
    return root / "conv", root / "dense"


def _accuracy(rows, features, k="all", classifier="logreg"):
    (row,) = [
        r for r in rows if r["features"] == features and r["labels_per_class"] == k and r["classifier"] == classifier
    ]
    return row["accuracy"]


def test_probe_on_digits_beats_the_pixel_baseline(runs, digits):
    conv, _ = runs
    rows = run_probe(conv, *digits, labels_per_class="10,all", baselines="pixels")
    # by default every stage and the bottleneck; stage2 is the bottleneck here (no latent layer)
    assert list(dict.fromkeys(r["features"] for r in rows)) == ["stage1/grid4", "bottleneck/grid4", "pixels"]
    for k in (10, "all"):
        pixels = _accuracy(rows, "pixels", k)
        best = max(_accuracy(rows, f"{layer}/grid4", k) for layer in ("stage1", "bottleneck"))
        assert best > pixels + 0.005, (k, best, pixels)
    assert _accuracy(rows, "stage1/grid4") > 0.95


def test_rows_name_every_baseline_and_follow_the_schema(runs, digits):
    conv, dense = runs
    rows = run_probe(
        conv,
        *digits,
        layers="stage2,bottleneck",
        pool="avg",
        classifiers="logreg,knn",
        compare=[dense],
        labels_per_class="5,all",
        seeds=2,
    )
    assert all(list(r) == list(COLUMNS) for r in rows)
    features = list(dict.fromkeys(r["features"] for r in rows))
    assert features == [
        "stage2/avg",
        "bottleneck/avg",
        "random/stage2/avg",
        "random/bottleneck/avg",
        "dense/bottleneck/avg",  # the dense run has no stage2: only the bottleneck is shared
        "pixels",
        "pca",
    ]
    assert [r["labels_per_class"] for r in rows] == [5] * 14 + ["all"] * 14  # grouped by labels per class
    by = {(r["features"], r["classifier"], r["labels_per_class"]): r for r in rows}
    assert by[("stage2/avg", "knn", 5)]["seeds"] == 2 and by[("stage2/avg", "knn", "all")]["seeds"] == 1
    assert (
        by[("stage2/avg", "logreg", "all")]["dim"] == 32 and by[("dense/bottleneck/avg", "logreg", "all")]["dim"] == 16
    )
    assert by[("pca", "logreg", "all")]["dim"] == 32  # the compared features' size
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and r["fit_seconds"] >= 0
        # the optimizer's iterations where there is one (the probe hides ConvergenceWarning)
        if r["classifier"] == "knn":
            assert r["iterations"] is None
        else:
            assert isinstance(r["iterations"], int) and 1 <= r["iterations"] <= 300, r


def test_a_fit_stopped_at_max_iter_says_so_in_its_iterations(runs, digits):
    """The probe hides ConvergenceWarning: a row's iterations is where a fit cut short shows."""
    conv, _ = runs
    rows = run_probe(conv, *digits, layers="bottleneck", pool="avg", baselines="none", max_iter=3)
    assert [r["iterations"] for r in rows] == [3]
    assert "| 3 |" in markdown_table(rows).splitlines()[-1]


def test_random_weights_is_the_same_architecture_untrained(runs, digits):
    conv, _ = runs
    rows = run_probe(conv, *digits, layers="bottleneck", pool="avg", baselines="random")
    assert [r["features"] for r in rows] == ["bottleneck/avg", "random/bottleneck/avg"]
    assert rows[0]["dim"] == rows[1]["dim"] and rows[0]["accuracy"] != rows[1]["accuracy"]


def test_random_weights_get_batchnorm_statistics_from_the_train_images_without_training(runs, digits):
    train, _ = digits
    model = ConvAutoencoder.load(runs[0]).model_
    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()
    weights = {k: v.clone() for k, v in untrained.state_dict().items() if "running" not in k and "num_batches" not in k}
    calibrate(untrained, train.images, ["stage2"], batch_size=100)
    assert not untrained.training
    assert all(torch.equal(v, untrained.state_dict()[k]) for k, v in weights.items())  # no weight moved
    # stage1's normalized pre-activation over those images: mean 0, variance 1 per channel
    pre = []
    block = untrained.encoder["stage1"].conv1
    block[1].register_forward_hook(lambda m, args, out: pre.append(out.clone()))
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        untrained.forward_intermediates(x, ["stage1.conv1"])
    z = pre[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
    torch.testing.assert_close(z.mean(1), torch.zeros(len(z)), atol=1e-2, rtol=0)
    torch.testing.assert_close(z.var(1), torch.ones(len(z)), atol=2e-2, rtol=0)
    assert block[1].momentum == 0.1  # restored


def test_layers_joined_with_plus_are_probed_as_one_concatenated_feature_set(runs, digits):
    conv, dense = runs
    rows = run_probe(
        conv, *digits, layers="bottleneck+stage1,stage1", pool="avg,max", baselines="random,pca", compare=[dense]
    )
    assert [r["features"] for r in rows] == [
        "stage1+bottleneck/avg",
        "stage1+bottleneck/max",
        "stage1/avg",
        "stage1/max",  # network order inside
        "random/stage1+bottleneck/avg",
        "random/stage1+bottleneck/max",
        "random/stage1/avg",
        "random/stage1/max",
        # the dense run has neither feature set: its own default layers
        "dense/fc1/avg",
        "dense/fc1/max",
        "dense/bottleneck/avg",
        "dense/bottleneck/max",
        "pca",
        "pca",
    ]
    by = {r["features"]: r for r in rows}
    assert by["stage1+bottleneck/avg"]["dim"] == 16 + 32 and by["stage1/max"]["dim"] == 16
    assert [r["dim"] for r in rows if r["features"] == "pca"] == [16, 48]  # each feature set's size
    # the group is exactly the two layers' features side by side
    model = ConvAutoencoder.load(conv)
    X = digits[1].images[:5]
    both = model.set_params(layers="stage1,bottleneck", pool="avg").transform(X)
    singles = [model.set_params(layers=name).transform(X) for name in ("stage1", "bottleneck")]
    np.testing.assert_array_equal(both, np.hstack(singles))
    with pytest.raises(ConfigError, match="unknown layer"):
        run_probe(conv, *digits, layers="stage1+stage9", baselines="none")


def test_a_concatenated_set_of_adjacent_blocks_is_a_view_with_the_same_values(runs, digits):
    # wide concatenated sets (MNIST's 6,144 values) took seconds and gigabytes to copy
    conv, _ = runs
    model = ConvAutoencoder.load(conv).model_
    train, test = (d.images[:40] for d in digits)
    extractor = FeatureExtractor(model, ["stage1.conv1.split", "stage1", "stage2.conv1.split"], "grid2")
    joined, apart, single = _layer_sets(
        extractor,
        [("stage1.conv1.split", "stage1"), ("stage1.conv1.split", "stage2.conv1.split"), ("stage1",)],
        train,
        test,
        "",
        False,
    )
    assert (
        joined.name == "stage1.conv1.split+stage1/grid2" and apart.name == "stage1.conv1.split+stage2.conv1.split/grid2"
    )
    everything = extractor.transform(train)
    singles = {b.layer: everything[:, b.columns] for b in extractor.blocks}
    np.testing.assert_array_equal(joined.train, np.hstack([singles["stage1.conv1.split"], singles["stage1"]]))
    np.testing.assert_array_equal(
        apart.train, np.hstack([singles["stage1.conv1.split"], singles["stage2.conv1.split"]])
    )
    # adjacent blocks: a view of the extracted features, as one layer's set is; apart: a copy
    assert np.shares_memory(joined.train, single.train) and not np.shares_memory(apart.train, single.train)
    assert joined.test.shape == (40, joined.dim)
    # each layer's columns, what normalize="whiten-layers" whitens on their own
    assert joined.layer_widths == (singles["stage1.conv1.split"].shape[1], singles["stage1"].shape[1])
    assert apart.layer_widths == (singles["stage1.conv1.split"].shape[1], singles["stage2.conv1.split"].shape[1])
    assert single.layer_widths == (single.dim,)


def test_the_probe_lays_out_columns_so_every_set_of_the_preset_shape_is_a_view(runs, digits):
    """The MNIST preset's sets ("stage2,bottleneck,a.split+b.split"): with network order the
    joined set was a copy (737 MB on MNIST); in order of first use each set is a view."""
    conv, _ = runs
    model = ConvAutoencoder.load(conv).model_
    train, test = (d.images[:40] for d in digits)
    groups = [("stage2",), ("bottleneck",), ("stage1.conv1.split", "stage2.conv1.split")]
    assert column_order(groups) == ["stage2", "bottleneck", "stage1.conv1.split", "stage2.conv1.split"]
    ours = FeatureExtractor(model, column_order(groups), "grid4", keep_order=True)
    sets = _layer_sets(ours, groups, train, test, "", False)
    assert [fs.name for fs in sets] == [
        "stage2/grid4",
        "bottleneck/grid4",
        "stage1.conv1.split+stage2.conv1.split/grid4",
    ]
    whole_train, whole_test = sets[0].train.base, sets[0].test.base  # the extracted matrices
    assert whole_train.shape == (40, ours.dim) and whole_test.shape == (40, ours.dim)
    assert all(fs.train.base is whole_train and fs.test.base is whole_test for fs in sets)
    network = FeatureExtractor(model, column_order(groups), "grid4")  # the same values, columns reordered
    reference = network.transform(train)
    by_layer = {b.layer: reference[:, b.columns] for b in network.blocks}
    np.testing.assert_array_equal(
        sets[2].train, np.hstack([by_layer["stage1.conv1.split"], by_layer["stage2.conv1.split"]])
    )
    np.testing.assert_array_equal(sets[1].train, by_layer["bottleneck"])
    # several poolings: each pooling's blocks together, so a joined set is a view at each of them
    two = FeatureExtractor(model, column_order(groups), "avg,grid2", keep_order=True)
    joined = [fs for fs in _layer_sets(two, groups, train, test, "", False) if "+" in fs.name]
    assert [fs.name for fs in joined] == [
        "stage1.conv1.split+stage2.conv1.split/avg",
        "stage1.conv1.split+stage2.conv1.split/grid2",
    ]
    assert joined[0].train.base is joined[1].train.base is not None


def test_sign_split_layers_are_probed_like_any_layer_and_their_random_twins_too(runs, digits):
    conv, _ = runs
    rows = run_probe(
        conv, *digits, layers="stage1.conv1.split+stage2.conv1.split,stage1", pool="grid2", baselines="random"
    )
    assert [r["features"] for r in rows] == [
        "stage1.conv1.split+stage2.conv1.split/grid2",
        "stage1/grid2",
        "random/stage1.conv1.split+stage2.conv1.split/grid2",
        "random/stage1/grid2",
    ]
    assert rows[0]["dim"] == (2 * 16 + 2 * 32) * 4 and rows[1]["dim"] == 16 * 4
    assert rows[0]["accuracy"] > 0.9
    # the estimator takes the same names
    feats = (
        ConvAutoencoder.load(conv).set_params(layers="stage2.conv1.split", pool="avg").transform(digits[1].images[:3])
    )
    assert feats.shape == (3, 64) and (feats >= 0).all()


@pytest.mark.parametrize("binary", [False, True])
def test_scores_averaged_with_identical_mirror_rows_give_each_classifiers_own_prediction(binary):
    # decision_function (logreg, linsvm, rbfsvm; 1-D when binary) or predict_proba (knn, rf, mlp)
    from sklearn.datasets import load_digits
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from convae.probe import CLASSIFIERS

    x, y = load_digits(return_X_y=True)
    if binary:
        y = np.where(y == 3, "three", "other")
    for name, make in CLASSIFIERS.items():
        clf = make_pipeline(StandardScaler(), make(0, 1000, x.shape[1], 1.0, None)).fit(x[:1000], y[:1000])
        ours = predict_with_mirrors(clf, np.concatenate([x[1000:], x[1000:]]))
        # the RBF SVM predicts by one-vs-one votes, its scores are one-vs-rest: ties may differ
        assert (ours == clf.predict(x[1000:])).mean() >= (0.99 if name == "rbfsvm" else 1.0), name


def test_flip_tta_scores_each_test_image_with_its_mirror_image(runs, digits):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from convae.probe import CLASSIFIERS

    conv, _ = runs
    model = ConvAutoencoder.load(conv).model_
    (train, y_train), (test, y_test) = ((d.images[:300], d.labels[:300]) for d in digits)
    extractor = FeatureExtractor(model, ["stage1"], "grid2")
    (fs,) = _layer_sets(extractor, [("stage1",)], train, test, "", False, True, True)
    assert fs.mirrored and fs.test_mirrored and fs.train.shape == fs.test.shape == (600, fs.dim)
    np.testing.assert_array_equal(fs.test[300:], extractor.transform(np.ascontiguousarray(mirrored(test))))
    plain, row = evaluate_features([fs], y_train, y_test)  # one fit: the test images alone, then with mirrors
    clf = make_pipeline(StandardScaler(), CLASSIFIERS["logreg"](0, 300, fs.dim, 1.0, None))
    scores = clf.fit(fs.train, np.concatenate([y_train, y_train])).decision_function(fs.test)
    expected = (clf.classes_[(scores[:300] + scores[300:]).argmax(1)] == y_test).mean()
    assert row["augment"] == "flip-tta" and row["accuracy"] == pytest.approx(expected)
    assert plain["augment"] == "flip" and plain["accuracy"] == pytest.approx(
        (clf.predict(fs.test[:300]) == y_test).mean()
    )
    rows = run_probe(conv, *digits, layers="stage1", pool="grid2", baselines="pixels", augment="flip-tta")
    assert [(r["features"], r["augment"]) for r in rows] == [
        ("stage1/grid2", "flip"), ("stage1/grid2", "flip-tta"), ("pixels", "flip"), ("pixels", "flip-tta"),
    ]  # fmt: skip


def test_feature_sets_extracted_once_fit_to_run_probes_rows(runs, digits):
    """probe_feature_sets + evaluate_feature_sets: run_probe in two steps, so one extraction can
    be fitted several ways (benchmarks/validate.py chooses the iteration cap so)."""
    conv, _ = runs
    options = ProbeOptions(layers="stage1,stage1+stage2", pool="grid2", baselines="none", augment="flip")
    sets = probe_feature_sets(conv, *digits, options)
    assert [s.name for s in sets] == ["stage1/grid2", "stage1+stage2/grid2"]
    assert all(s.mirrored and len(s.train) == 2 * len(digits[0]) for s in sets)
    rows = evaluate_feature_sets(sets, digits[0].labels, digits[1].labels, options)
    same = ("features", "dim", "augment", "accuracy", "macro_f1")  # all but the seconds
    assert [{k: r[k] for k in same} for r in rows] == [
        {k: r[k] for k in same} for r in run_probe(conv, *digits, options)
    ]
    fewer = evaluate_feature_sets(sets, digits[0].labels, digits[1].labels, options.replace(max_iter=1))
    assert [r["features"] for r in fewer] == [r["features"] for r in rows]
    assert any(f["accuracy"] != r["accuracy"] for f, r in zip(fewer, rows))


def test_precondition_reaches_the_streaming_classifiers_and_the_results(runs, digits, monkeypatch, tmp_path):
    """--precondition (a preset's too) has logreg and linsvm take their steps in a block
    whitening's coordinates (blocks of 16 columns here; digits' 1,437 rows pass its 512): the
    same minimum, so the same accuracy but for a few images; results.json records it; a value
    that is not a boolean is refused."""
    from convae.probe import linear

    conv, _ = runs
    built = []
    monkeypatch.setattr(linear, "_PRECONDITION_BLOCK_COLUMNS", 16)
    real = linear._block_preconditioner
    monkeypatch.setattr(linear, "_block_preconditioner", lambda *a: built.append(1) or real(*a))
    options = ProbeOptions(layers="stage1", pool="grid2", baselines="none", classifiers="logreg,linsvm", max_iter=5000)
    sets = probe_feature_sets(conv, *digits, options)
    plain = evaluate_feature_sets(sets, digits[0].labels, digits[1].labels, options)
    assert not built
    pre = evaluate_feature_sets(sets, digits[0].labels, digits[1].labels, options.replace(precondition=True))
    assert len(built) == 2  # one fit per classifier
    for a, b in zip(plain, pre):
        assert a["classifier"] == b["classifier"] and abs(a["accuracy"] - b["accuracy"]) <= 0.006
    assert ProbeOptions.with_preset(None, precondition=True).precondition is True
    with pytest.raises(ConfigError, match="precondition must be true or false"):
        ProbeOptions(precondition="yes")
    args = ("probe", conv, "--train", "digits", "--test", "digits:test", "--layers", "stage1", "--baselines", "none")
    proc = convae(*args, "--precondition", "-q", "-o", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["precondition"] is True


def test_the_compile_option_reaches_the_extractor_and_results_json(runs, digits, tmp_path, monkeypatch):
    """ProbeOptions.compile (`convae probe --compile`) is the extractor's: "always" runs the probe's
    extraction compiled (here through a stand-in for torch.compile that records its calls), "auto"
    does not for the digits' 1,437 + 360 images; results.json records it; an unknown mode is refused."""
    conv, _ = runs
    calls = []

    def recording(fn, **settings):
        def compiled(x):
            calls.append(len(x))
            return fn(x)

        return compiled

    monkeypatch.setattr(torch, "compile", recording)
    options = ProbeOptions(layers="stage1", pool="grid2", baselines="none")
    want = probe_feature_sets(conv, *digits, options)
    assert calls == []
    got = probe_feature_sets(conv, *digits, options.replace(compile="always"))
    assert calls and set(calls) == {calls[0]}  # every batch the same, padded, shape
    np.testing.assert_allclose(got[0].train, want[0].train, rtol=1e-5, atol=1e-6)  # the stand-in: the same pass
    with pytest.raises(ConfigError, match="compile must be one of auto, always, never, got 'yes'"):
        ProbeOptions(compile="yes")
    args = ("probe", conv, "--train", "digits", "--test", "digits:test", "--layers", "stage1", "--baselines", "none")
    proc = convae(*args, "--compile", "never", "-q", "-o", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["compile"] == "never"


def test_the_probe_extracts_its_test_features_after_the_first_fit(runs, digits, monkeypatch):
    """run_probe holds the train features alone while its first classifier fits (the fit's working
    memory and the test features are never held at once): the test features are extracted when
    that fit scores them, once for every set and classifier after it, the random baseline alike;
    the rows are those of features extracted up front (probe_feature_sets)."""
    from convae.probe import driver
    from convae.probe.linear import StreamingLinearSVM, StreamingLogisticRegression

    conv, _ = runs
    train, test = digits
    events = []
    extract = driver._features
    monkeypatch.setattr(
        driver, "_features", lambda ex, images, *a: events.append(len(images)) or extract(ex, images, *a)
    )
    for cls in (StreamingLogisticRegression, StreamingLinearSVM):
        monkeypatch.setattr(cls, "fit", lambda self, X, y, fit=cls.fit: events.append("fit") or fit(self, X, y))
    options = dict(layers="stage1,bottleneck", pool="grid2", classifiers="logreg,linsvm")
    rows = run_probe(conv, train, test, baselines="random", **options)
    n, m = len(train.images), len(test.images)
    assert events == [n, "fit", m, *["fit"] * 3] * 2  # trained, then random weights: 2 sets x 2 classifiers
    opts = ProbeOptions(baselines="random", **options)
    sets = probe_feature_sets(conv, train, test, opts)
    want = evaluate_feature_sets(sets, train.labels, test.labels, opts)
    assert [(r["features"], r["accuracy"]) for r in rows[: len(want)]] == [(r["features"], r["accuracy"]) for r in want]


def test_deferred_rows_are_made_once_for_all_views_and_a_failed_make_can_be_retried():
    from convae.probe.evaluate import DeferredRows, rows_of

    calls = []
    whole = np.arange(12.0).reshape(3, 4)

    def make():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("the first try fails")
        return whole

    rows = DeferredRows(make, 3)
    left, picked = rows.columns(slice(0, 2)), rows.columns(np.array([3, 1]))
    nested = picked.columns(slice(1, 2))
    assert len(left) == len(nested) == 3 and calls == []  # nothing made yet
    with pytest.raises(MemoryError):
        left.array()
    np.testing.assert_array_equal(left.array(), whole[:, :2])
    np.testing.assert_array_equal(rows_of(nested), whole[:, [1]])
    np.testing.assert_array_equal(rows_of(rows), whole)
    assert len(calls) == 2  # the failed try and one more, for every view


def test_pca_with_the_dimension_of_the_bottleneck_is_expressible(runs, digits):
    conv, _ = runs
    est = ConvAutoencoder.load(conv)
    code = code_size(est.config_.model)  # 32 x 2 x 2 = 128, more than the 64 pixels
    assert _pca_dims([code], (1437, 64)) == [0.95]  # too large: keep 95% of the variance instead
    rows = run_probe(est, *digits, layers="bottleneck", pool="avg", baselines="pca", pca_dims=[8, 20])
    assert [(r["features"], r["dim"]) for r in rows] == [("bottleneck/avg", 32), ("pca", 8), ("pca", 20)]
    assert _pca_dims([512, 1024, 2048], (60000, 784)) == [512]


def test_pca_is_not_whitened_so_nearly_all_components_match_the_pixels(runs, digits):
    conv, _ = runs
    rows = run_probe(
        conv, *digits, layers="bottleneck", pool="avg", baselines="pixels,pca", pca_dims=[63], labels_per_class="10,all"
    )
    for k in (10, "all"):
        assert _accuracy(rows, "pca", k) == pytest.approx(_accuracy(rows, "pixels", k), abs=0.015)


def test_default_layers_are_the_stages_and_the_bottleneck_without_repeats():
    from convae.models import ModelConfig, build_model

    def layers(**kw):
        return build_model(ModelConfig(channels=(8, 16, 32), **kw)).hierarchy_layers()

    assert layers() == ["stage1", "stage2", "bottleneck"]  # the bottleneck is stage3's maps
    assert layers(latent_channels=4) == ["stage1", "stage2", "stage3", "bottleneck"]
    assert layers(bottleneck="dense") == ["stage1", "stage2", "stage3", "bottleneck"]
    assert build_model(ModelConfig(arch="dense", hidden=(32, 16))).hierarchy_layers() == ["fc1", "fc2", "bottleneck"]


def test_label_subsets_are_stratified_and_seeded():
    y = np.repeat(np.arange(4), [3, 10, 10, 10])
    a, b = label_subsets(y, 5, seeds=2)
    assert np.bincount(y[a]).tolist() == [3, 5, 5, 5]  # a class with fewer labels gives them all
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(label_subsets(y, 5, seeds=2)[0], a)
    (everything,) = label_subsets(y, "all", seeds=5)
    assert len(everything) == len(y)


def test_evaluate_features_works_on_any_precomputed_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 4)) + 4 * np.eye(4)[y]  # a cluster per class, on its own axis
    rows = list(evaluate_features([FeatureSet("mine", x, x)], y, y, classifiers=["linsvm", "rf"], labels_per_class=[5]))
    assert [(r["features"], r["classifier"]) for r in rows] == [("mine", "linsvm"), ("mine", "rf")]
    assert all(r["accuracy"] > 0.9 for r in rows)


@pytest.mark.parametrize("binary", [False, True])
def test_linear_svm_finds_linearsvcs_solution(binary):
    # the same objective (LinearSVC's intercept all but unpenalized by a large intercept_scaling)
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    x, y = load_digits(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    if binary:
        y = np.where(y == 3, "three", "other")
    ours = LinearSVM(C=0.05).fit(x[:1400], y[:1400])
    theirs = LinearSVC(C=0.05, tol=1e-8, max_iter=100_000, intercept_scaling=1000).fit(x[:1400], y[:1400])
    assert ours.coef_.shape == theirs.coef_.shape and list(ours.classes_) == list(theirs.classes_)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=0.01 * np.abs(theirs.coef_).max())
    np.testing.assert_allclose(ours.decision_function(x[1400:]), theirs.decision_function(x[1400:]), atol=0.02)
    assert (ours.predict(x[1400:]) == theirs.predict(x[1400:])).mean() > 0.99


def test_linear_svm_says_when_it_stopped_early():
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning

    x, y = load_digits(return_X_y=True)
    with pytest.warns(ConvergenceWarning, match="max_iter=3"):
        svm = LinearSVM(C=1.0, max_iter=3).fit(x, y)
    assert svm.n_iter_ == 3


@pytest.mark.parametrize("estimator", [LinearSVM(), Whitener()], ids=lambda e: type(e).__name__)
def test_the_probes_own_estimators_pass_check_estimator(estimator):
    from sklearn.utils.estimator_checks import check_estimator

    failed = [c for c in check_estimator(estimator, on_fail=None) if c["status"] == "failed"]
    assert failed == []


def test_whitener_decorrelates_features_and_floors_the_weak_axes():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6)) * np.array([10.0, 5.0, 2.0, 1.0, 0.3, 0.1])[:, None]  # unequal axes
    x = (rng.normal(size=(4000, 6)) @ mixing + 3.0).astype(np.float32)
    whitener = Whitener(eps=1e-6, batch_size=512).fit(x)  # batches: the same sums as one pass
    white = whitener.transform(x)
    assert white.dtype == np.float32 and white.shape == x.shape
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(6), atol=0.02)
    # a real floor: a noise axis (a millionth of the mean variance) is not raised to the signal's scale
    x[:, 5] = 3.0 + 0.005 * rng.normal(size=4000)
    floored = np.var(Whitener(eps=0.1).fit_transform(x), axis=0)
    assert floored.mean() == pytest.approx(1.0, rel=0.01)
    assert floored.min() < 0.01 * floored.max()
    with pytest.raises(ValueError, match="eps must be positive"):
        Whitener(eps=0).fit(x)


def test_whitening_is_for_all_labels_when_there_are_at_least_as_many_as_features(digits):
    train, test = digits
    sets = [FeatureSet("pixels", _pixels_of(train), _pixels_of(test))]  # 64 features, 1,437 labels
    rows = {}
    for normalize in ("standard", "whiten"):
        rows[normalize] = {
            r["labels_per_class"]: r
            for r in evaluate_features(
                sets, train.labels, test.labels, labels_per_class=[10, "all"], normalize=normalize
            )
        }
    assert [rows["whiten"][k]["normalize"] for k in (10, "all")] == ["standard", "whiten"]
    assert all(r["normalize"] == "standard" for r in rows["standard"].values())
    assert rows["whiten"][10]["accuracy"] == rows["standard"][10]["accuracy"]  # a label subset: standardized
    assert rows["whiten"]["all"]["accuracy"] != rows["standard"]["all"]["accuracy"]
    assert rows["whiten"]["all"]["accuracy"] > 0.93  # standardized: 0.97
    assert rows["whiten"]["all"]["fit_seconds"] > 0
    wide = [FeatureSet("wide", np.tile(sets[0].train, 30)[:1000], np.tile(sets[0].test, 30))]  # 1,920 > 1,000 labels
    (row,) = evaluate_features(wide, train.labels[:1000], test.labels, normalize="whiten")
    assert row["normalize"] == "standard"
    with pytest.raises(
        ConfigError, match="normalize must be one of standard, whiten, whiten-layers, whiten-blocks, got 'zca'"
    ):
        run_probe(None, train, test, normalize="zca")


def _pixels_of(data):
    return data.images.reshape(len(data.images), -1).astype(np.float32)


def test_probe_user_errors(runs, digits):
    conv, _ = runs
    train, test = digits
    with pytest.raises(
        ConfigError, match="classifiers: unknown svm: choose from logreg, linsvm, rbfsvm, rf, knn, mlp$"
    ):
        run_probe(conv, train, test, classifiers="svm")
    with pytest.raises(ConfigError, match="baselines: unknown ica"):
        run_probe(conv, train, test, baselines="ica")
    with pytest.raises(ConfigError, match="labels per class '0'"):
        run_probe(conv, train, test, labels_per_class="0,all")
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, got 'bf16'"):
        run_probe(conv, train, test, precision="bf16")
    with pytest.raises(ConfigError, match="has no labels"):
        run_probe(conv, (train.images, None), test)
    with pytest.raises(ConfigError, match="model takes 8x8x1"):
        run_probe(conv, (np.zeros((4, 9, 9, 1), np.uint8), np.zeros(4)), test)


def test_write_results_gives_json_rows_and_a_markdown_table(tmp_path):
    rows = [
        dict(
            features="stage2/grid4",
            classifier="logreg",
            normalize="whiten",
            dim=1024,
            labels_per_class="all",
            seeds=1,
            accuracy=0.991,
            accuracy_std=0.0,
            macro_f1=0.99,
            fit_seconds=12.3,
        )
    ]
    json_path, md = write_results(rows, tmp_path / "results.json", run="runs/mnist")
    doc = json.loads(json_path.read_text())
    assert doc["rows"] == rows and doc["run"] == "runs/mnist"
    assert md == tmp_path / "results.md"
    assert "| stage2/grid4 | logreg | whiten | none | 1024 | all | 0.9910 | - | 0.9900 | 12.30 |" in md.read_text()
    with pytest.raises(ConfigError, match=r"name it \.json"):
        write_results(rows, tmp_path / "results.csv")


# -- the command line --------------------------------------------------------------------------
def convae(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([CONVAE, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_cli_probe_prints_the_table_and_writes_json_and_markdown(runs, tmp_path):
    conv, dense = runs
    out = tmp_path / "res" / "results.json"
    proc = convae(
        "probe",
        conv,
        "--train",
        "digits:train",
        "--test",
        "digits:test",
        "-o",
        out,
        "--layers",
        "stage1,bottleneck",
        "--pool",
        "avg",
        "--classifiers",
        "logreg,knn",
        "--compare",
        dense,
        "--labels-per-class",
        "10,all",
        "--seeds",
        "2",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    features = {r["features"] for r in rows}
    assert features == {
        "stage1/avg",
        "bottleneck/avg",
        "random/stage1/avg",
        "random/bottleneck/avg",
        "dense/bottleneck/avg",
        "pixels",
        "pca",
    }
    assert len(rows) == 2 * 2 * 8  # labels per class x classifiers x (7 feature sets, pca twice: dims 16 and 32)
    assert proc.stdout.splitlines()[0].split()[:5] == ["features", "classifier", "normalize", "augment", "dim"]
    assert "random/stage1/avg" in proc.stdout and f"wrote {out}" in proc.stdout
    assert (tmp_path / "res" / "results.md").read_text().count("\n| ") == len(rows) + 1


def test_cli_probe_baselines_none(runs, tmp_path):
    conv, _ = runs
    proc = convae(
        "probe",
        conv,
        "--train",
        "digits",
        "--test",
        "digits:test",
        "-o",
        tmp_path / "r.json",
        "--layers",
        "bottleneck",
        "--pool",
        "max",
        "--baselines",
        "none",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["features"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]] == ["bottleneck/max"]


def test_cli_probe_normalize_whiten_applies_to_every_row(runs, tmp_path):
    conv, _ = runs
    common = [
        "probe",
        conv,
        "--train",
        "digits",
        "--test",
        "digits:test",
        "--layers",
        "stage1",
        "--baselines",
        "pixels",
        "-q",
    ]
    rows = {}
    for normalize in ("standard", "whiten", "whiten-layers", "whiten-blocks"):
        proc = convae(*common, "--normalize", normalize, "-o", tmp_path / f"{normalize}.json")
        assert proc.returncode == 0, proc.stderr
        rows[normalize] = {
            r["features"]: r["accuracy"] for r in json.loads((tmp_path / f"{normalize}.json").read_text())["rows"]
        }
    assert list(rows["whiten"]) == ["stage1/grid4", "pixels"]
    assert all(rows["whiten"][f] != rows["standard"][f] for f in rows["whiten"])  # both rows whitened
    assert rows["whiten"]["stage1/grid4"] > 0.9
    # one layer, and the pixels: one block, the same whitening
    assert rows["whiten-layers"] == rows["whiten-blocks"] == rows["whiten"]


def test_whiten_layers_whitens_each_layer_on_its_own(digits):
    """normalize="whiten-layers" whitens each of a set's layers on its own: a streaming classifier
    folds it in (its `whiten_blocks`), any other gets a copy with a Whitener per layer."""
    train, test = digits
    x, xt = _pixels_of(train), _pixels_of(test)
    widths = (24, 40)
    sets = [FeatureSet("two layers", x, xt, layer_widths=widths)]
    rows = {
        r["classifier"]: r
        for r in evaluate_features(
            sets, train.labels, test.labels, classifiers=["logreg", "knn"], normalize="whiten-layers"
        )
    }
    assert {r["normalize"] for r in rows.values()} == {"whiten-layers"}
    logreg = CLASSIFIERS["logreg"](0, len(x), x.shape[1], 1.0, None).set_params(whiten=0.1, whiten_blocks=widths)
    assert rows["logreg"]["accuracy"] == logreg.fit(x, train.labels).score(xt, test.labels)
    per_layer = [make_pipeline(StandardScaler(), Whitener()).fit(x[:, a:b]) for a, b in ((0, 24), (24, 64))]

    def copy(v):
        return np.hstack([w.transform(v[:, a:b]) for w, (a, b) in zip(per_layer, ((0, 24), (24, 64)))])

    knn = CLASSIFIERS["knn"](0, len(x), x.shape[1], 1.0, None).fit(copy(x), train.labels)
    assert rows["knn"]["accuracy"] == knn.score(copy(xt), test.labels)


def test_whiten_blocks_cuts_each_layer_into_even_blocks_of_at_most_the_cap(digits):
    """normalize="whiten-blocks" whitens each layer's columns in consecutive blocks of at most
    `whiten_block_columns`, as even as can be, each on its own; a layer narrower than that is one block."""
    train, test = digits
    x, xt = _pixels_of(train), _pixels_of(test)
    sets = [FeatureSet("two layers", x, xt, layer_widths=(24, 40)), FeatureSet("narrow", x[:, :16], xt[:, :16])]
    rows = list(
        evaluate_features(
            sets, train.labels, test.labels, classifiers=["logreg"], normalize="whiten-blocks", whiten_block_columns=16
        )
    )
    assert [r["normalize"] for r in rows] == ["whiten-blocks"] * 2
    for row, (columns, blocks) in zip(rows, ((64, (12, 12, 14, 13, 13)), (16, None))):
        logreg = CLASSIFIERS["logreg"](0, len(x), columns, 1.0, None).set_params(whiten=0.1, whiten_blocks=blocks)
        assert row["accuracy"] == logreg.fit(x[:, :columns], train.labels).score(xt[:, :columns], test.labels)


def test_cli_probe_preset_gives_the_recommended_layers_and_pooling_unless_overridden(runs, tmp_path):
    conv, _ = runs
    common = [
        "probe",
        conv,
        "--train",
        "digits",
        "--test",
        "digits:test",
        "--baselines",
        "none",
        "-q",
        "--preset",
        "digits",
    ]
    proc = convae(*common, "-o", tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr
    assert [r["features"] for r in json.loads((tmp_path / "a.json").read_text())["rows"]] == [
        "stage1/grid4",
        "bottleneck/grid4",
    ]  # the digits preset's probe: stage1,bottleneck pooled grid4
    proc = convae(*common, "-o", tmp_path / "b.json", "--pool", "max", "--layers", "stage1+bottleneck")
    assert proc.returncode == 0, proc.stderr
    assert [r["features"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == ["stage1+bottleneck/max"]


def test_cli_probe_preset_whose_layers_the_run_lacks_is_one_line_before_loading_data(runs, tmp_path):
    _, dense = runs  # the dense autoencoder has no stages
    proc = convae(
        "probe", dense, "--train", "digits", "--test", "digits:test", "-o", tmp_path / "r.json", "--preset", "mnist"
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"convae: error: --preset mnist does not fit {dense}: layers: unknown layer(s) stage1, stage2, stage3"
    )
    assert "give --layers instead" in line


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--preset", "imagenet"], "unknown preset 'imagenet': choose from digits, mnist"),
        (["--classifiers", "svm"], "classifiers: unknown svm"),
        (["--labels-per-class", "ten"], "labels per class 'ten'"),
        (["--baselines", "pixel"], "baselines: unknown pixel"),
        (["--pool", "grid3"], "unknown pooling grid3"),
        (["--normalize", "zca"], "normalize must be one of standard, whiten, whiten-layers, whiten-blocks, got 'zca'"),
        (["--whiten-block-columns", "0"], "whiten block columns must be a positive integer, got 0"),
        (["-o", "results.txt"], "name it .json"),
    ],
)
def test_cli_probe_user_errors_are_one_line_with_exit_code_2(runs, tmp_path, args, fragment):
    conv, _ = runs
    # said before any data is loaded: the --train file does not exist
    proc = convae(
        "probe", conv, "--train", "not-loaded.npy", "--test", "digits:test", "-o", "r.json", "-q", *args, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convae: error:") and fragment in lines[0], proc.stderr


def test_cli_probe_on_unlabelled_data_is_a_user_error(runs, tmp_path):
    conv, _ = runs
    np.save(tmp_path / "unlabelled.npy", np.zeros((10, 8, 8), np.uint8))
    proc = convae(
        "probe", conv, "--train", tmp_path / "unlabelled.npy", "--test", "digits:test", "-o", tmp_path / "r.json"
    )
    assert proc.returncode == 2 and "has no labels" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_features_held_in_16_or_8_bits_probe_as_float32_do(runs, digits, dtype):
    """--dtype float16 halves the probe's memory, uint8 (8-bit codes of each column's range)
    halves it again; the streaming classifiers read either as it is, the others standardize the
    codes (columns with negative values: tests/test_features.py's codes test)."""
    conv, _ = runs
    common = dict(layers="stage1,bottleneck", pool="grid2", baselines="none", classifiers="logreg,knn")
    full = run_probe(conv, *digits, **common)
    low = run_probe(conv, *digits, dtype=dtype, **common)
    assert len(full) == len(low) == 4
    for a, b in zip(full, low):
        assert (a["features"], a["classifier"]) == (b["features"], b["classifier"])
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.006  # 2 of 360 images


def _bad_features(kind):
    """A (features, labels) pair a classifier cannot fit, and the words its message must hold."""
    x, y = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32), np.arange(40) % 4
    if kind == "none":
        return x, y, ""
    if kind == "nan":
        x[17, 2] = np.nan
        return x, y, "row 17 holds NaN"
    if kind == "inf":
        x[3, 0] = np.inf
        return x, y, "row 3 holds NaN or infinite"
    if kind == "lengths":
        return x, y[:30], "30 labels for 40 rows"
    if kind == "empty":
        return x[:0], y[:0], "no rows of features"
    if kind == "one-class":
        return x, np.zeros(40, np.int64), "every row has label 0"
    return x, y.astype(np.float64) + 0.5, "labels must be class indices"  # float labels


@pytest.mark.parametrize("kind", ["nan", "inf", "lengths", "empty", "one-class", "float-labels"])
def test_feature_files_a_classifier_cannot_fit_are_refused_naming_the_file(tmp_path, kind):
    good_x, good_y, _ = _bad_features("none")
    x, y, words = _bad_features(kind)
    np.save(tmp_path / "train.npy", x)
    np.save(tmp_path / "train.labels.npy", y)
    np.save(tmp_path / "test.npy", good_x)
    np.save(tmp_path / "test.labels.npy", good_y)
    with pytest.raises(ConfigError, match="train.npy") as err:
        probe_feature_files(tmp_path / "train.npy", tmp_path / "test.npy")
    assert words in str(err.value)


def test_cli_probe_of_feature_files_with_nan_rows_is_one_line(runs, tmp_path):
    from cli_helpers import assert_user_error, convae

    x, y, _ = _bad_features("nan")
    for name in ("train", "test"):
        np.save(tmp_path / f"{name}.npy", x)
        np.save(tmp_path / f"{name}.labels.npy", y)
    proc = convae("probe", runs[0], "--train", tmp_path / "train.npy", "--test", tmp_path / "test.npy",
                  "-o", tmp_path / "r.json", check=False)  # fmt: skip
    assert_user_error(proc, "train.npy", "row 17 holds NaN")
    assert not (tmp_path / "r.json").exists()
