"""The scikit-learn estimator: check_estimator, pipelines, grid search, pickling, inputs, decoding."""

import copy
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from convae import ConvAutoencoder
from convae.errors import ConfigError, ConvaeError

TINY = dict(epochs=2, channels=(4, 8), batch_size=64, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits as a float table (values 0..16) and as uint8 8x8 images."""
    X, y = load_digits(return_X_y=True)
    images = np.rint(X * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return X[:600], y[:600], images[:600]


@pytest.fixture(scope="module")
def fitted(digits):
    _, _, images = digits
    return ConvAutoencoder(**TINY).fit(images)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
def test_passes_check_estimator_with_no_check_skipped():
    # Every check runs and passes; the array-API one skips itself unless SCIPY_ARRAY_API=1.
    results = check_estimator(ConvAutoencoder(epochs=1, channels=(4,), batch_size=16), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])) for r in results if r["status"] == "failed"]
    assert failed == []
    assert {r["check_name"] for r in results if r["status"] == "skipped"} <= {"check_array_api_input"}


def test_in_a_pipeline_with_logistic_regression_on_a_flat_table(digits):
    X, y, _ = digits
    ae = ConvAutoencoder(epochs=5, channels=(8, 16), batch_size=64, layers="stage1", pool="grid4")
    pipe = make_pipeline(ae, StandardScaler(), LogisticRegression(max_iter=300))
    pipe.fit(X[:400], y[:400])
    assert pipe.score(X[400:], y[400:]) > 0.75  # 400 labelled images, a tiny model trained for 5 epochs
    assert ae.image_shape_ == (8, 8, 1) and ae.input_format_ == "table"
    assert ae.input_range_ == (0.0, 16.0)  # floats outside [0, 1]: the range fit saw
    assert ae.n_features_in_ == 64 and ae.transform(X[:3]).shape == (3, 8 * 4 * 4)


def test_grid_search_over_the_architecture(digits):
    X, y, _ = digits
    pipe = make_pipeline(ConvAutoencoder(**TINY, pool="avg"), LogisticRegression(max_iter=200))
    grid = GridSearchCV(pipe, {"convautoencoder__channels": [(4,), (4, 8)]}, cv=2)
    grid.fit(X[:300], y[:300])
    assert len(grid.cv_results_["params"]) == 2
    assert grid.best_params_["convautoencoder__channels"] in [(4,), (4, 8)]
    widths = grid.best_estimator_[0].config_.model.channels
    assert widths == grid.best_params_["convautoencoder__channels"]


def test_params_are_plain_and_clone_keeps_them():
    est = ConvAutoencoder(channels=(8, 16), layers="stage1,bottleneck", pool="grid4", image_shape=(8, 8, 1))
    params = est.get_params()
    assert params["channels"] == (8, 16) and params["layers"] == "stage1,bottleneck"
    twin = clone(est).set_params(pool="avg")
    assert twin.get_params()["pool"] == "avg" and est.pool == "grid4"


def test_the_same_images_in_every_layout_give_the_same_features(fitted, digits):
    _, _, images = digits
    est = copy.deepcopy(fitted).set_params(layers="stage1", pool="flatten")  # layers and pool need no refit
    ref = est.transform(images[:20])
    nhwc = images[:20, :, :, None]
    np.testing.assert_array_equal(est.transform(nhwc), ref)
    np.testing.assert_array_equal(
        est.transform(nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255), ref
    )  # NCHW floats
    np.testing.assert_array_equal(est.transform(images[:20].reshape(20, -1)), ref)  # a table of H*W*C
    np.testing.assert_array_equal(est.transform(torch.from_numpy(nhwc)), ref)
    with pytest.raises(ValueError, match=r"shape \(6, 6, 1\).*fitted on \(8, 8, 1\)"):
        est.transform(np.zeros((2, 6, 6), np.uint8))


def test_image_shape_reads_rows_of_color_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 6, 10, 3), dtype=np.uint8)
    est = ConvAutoencoder(epochs=1, channels=(4,), image_shape=(6, 10, 3)).fit(images.reshape(40, -1))
    assert est.image_shape_ == (6, 10, 3)
    np.testing.assert_array_equal(est.transform(images.reshape(40, -1)), est.transform(images))
    with pytest.raises(ValueError, match=r"image_shape \(6, 10, 3\) holds 180"):
        ConvAutoencoder(epochs=1, image_shape=(6, 10, 3)).fit(images.reshape(40, -1)[:, :100])


def test_a_float_table_is_read_with_the_range_fit_saw(digits):
    X, _, images = digits
    est = ConvAutoencoder(**TINY).fit(X)  # floats 0..16, rescaled to [0, 1] then 8-bit, as images are
    np.testing.assert_array_equal(est.transform(X), est.transform(images))
    np.testing.assert_array_equal(est.transform(X * 2), est.transform(np.minimum(X * 2, 16)))  # clipped to it


def test_feature_names_and_pandas_output(fitted, digits):
    _, _, images = digits
    est = clone(fitted).set_params(layers="stage1,stage2", pool="avg,grid2")
    est.fit(images)
    names = est.get_feature_names_out()
    assert names[0] == "stage1/avg/c0" and "stage2/grid2/c7_g1_1" in names and len(names) == len(set(names))
    est.set_output(transform="pandas")
    frame = est.transform(images[:4])
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(names) and frame.shape == (4, len(names))


def test_inverse_transform_decodes_codes_and_score_is_negative_mse(fitted, digits):
    _, _, images = digits
    codes = fitted.transform(images[:10])
    decoded = fitted.inverse_transform(codes)
    assert decoded.shape == (10, 8, 8, 1) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, fitted.reconstruct(images[:10]), atol=1e-5)
    mse = np.mean((decoded - images[:10, :, :, None] / 255.0) ** 2)
    assert fitted.score(images[:10]) == pytest.approx(-mse, rel=1e-4)
    with pytest.raises(ValueError, match="decodes bottleneck codes"):
        clone(fitted).set_params(pool="avg").fit(images[:50]).inverse_transform(codes)


def test_inverse_transform_of_a_padded_table_returns_rows_of_its_width():
    rng = np.random.default_rng(0)
    X = rng.random((30, 7))  # 7 values per row: read as 3x3 images, zero-padded
    est = ConvAutoencoder(epochs=1, channels=(4,)).fit(X)
    assert est.image_shape_ == (3, 3, 1)
    assert est.inverse_transform(est.transform(X)).shape == (30, 7)
    assert est.reconstruct(X).shape == (30, 7)


def test_pickle_round_trip_stores_weights_as_bytes(fitted, digits):
    _, _, images = digits
    state = fitted.__getstate__()
    assert "model_" not in state and isinstance(state["_weights"], bytes)
    assert hasattr(fitted, "model_")  # pickling does not touch the live estimator
    twin = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(twin.transform(images[:16]), fitted.transform(images[:16]))
    assert twin.get_params() == fitted.get_params() and not twin.model_.training


def test_save_and_load_a_run_directory(fitted, digits, tmp_path):
    _, _, images = digits
    fitted.save(tmp_path / "run")
    loaded = ConvAutoencoder.load(tmp_path / "run", layers="stage1", pool="grid2")
    assert loaded.get_params()["channels"] == (4, 8) and loaded.pool == "grid2"
    expected = copy.deepcopy(fitted).set_params(layers="stage1", pool="grid2")
    # equal on CPU; on CUDA the two may pick different cuDNN algorithms (1e-7 apart)
    np.testing.assert_allclose(loaded.transform(images[:8]), expected.transform(images[:8]), rtol=1e-5, atol=1e-6)
    assert len(loaded.history_) == 2


def test_bad_layers_fail_before_any_training(digits):
    _, _, images = digits
    est = ConvAutoencoder(epochs=50, layers="stage9")
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) stage9"):
        est.fit(images)
    assert not hasattr(est, "model_")
    est = ConvAutoencoder(epochs=50, precision="bf16")
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, got 'bf16'"):
        est.fit(images)
    assert not hasattr(est, "model_")


def test_input_errors_are_value_errors_and_one_line_convae_errors():
    est = ConvAutoencoder(epochs=1)
    with pytest.raises(ValueError, match="1 feature"):
        est.fit(np.zeros((10, 1)))
    with pytest.raises(ValueError, match="must lie in 0..255") as err:
        est.fit(np.full((4, 8, 8), 300, dtype=np.int64))
    assert isinstance(err.value, ConvaeError) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="NaN"):
        est.fit(np.full((4, 8, 8), np.nan))
