"""The streaming linear classifiers (convae.probe.linear) against scikit-learn and convae's LinearSVM, on real data."""

from __future__ import annotations

import gzip
import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from convae.probe import LinearSVM, Whitener, int8, linear, linsvm_c, logreg_c
from convae.probe.linear import StreamingLinearSVM, StreamingLogisticRegression

# Test accuracy within 0.05 points of the reference; objectives within this relative distance
# (float32 passes against float64 references stop at slightly different points)
ACCURACY_TOLERANCE = 0.0005
OBJECTIVE_RTOL = 1e-5
MNIST_TRAIN = 3000


@parametrize_with_checks([StreamingLogisticRegression(), StreamingLinearSVM()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _read_idx(path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


@pytest.fixture(scope="module")
def mnist(shared_datasets):
    """The first MNIST_TRAIN train images and the 10,000 test images, pixels in [0, 1] as float32."""
    folder = shared_datasets / "mnist"
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {folder}")

    def load(prefix, n=None):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        return images.reshape(len(images), -1).astype(np.float32) / 255, labels.astype(np.int64)

    return (*load("train", MNIST_TRAIN), *load("t10k"))


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:1200].astype(np.float32), y[:1200], X[1200:].astype(np.float32), y[1200:]


def objective(Z: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, C: float, loss: str) -> float:
    """``C * sum(loss) + ||W||^2 / 2`` in float64 on standardized rows Z, written independently of both fits."""
    scores = Z @ W.T + b
    rows = np.arange(len(y))
    if loss == "multinomial":
        top = scores.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        total = np.sum(lse - scores[rows, y])
    elif loss == "binomial":
        total = np.sum(np.logaddexp(0.0, scores[:, 0]) - y * scores[:, 0])
    else:  # squared hinge, one-vs-rest (one column for two classes)
        signs = np.where(y == 1, 1.0, -1.0)[:, None] if W.shape[0] == 1 else -np.ones_like(scores)
        if W.shape[0] > 1:
            signs[rows, y] = 1.0
        total = np.sum(np.maximum(0.0, 1.0 - signs * scores) ** 2)
    return float(C * total + 0.5 * np.sum(W * W))


def standardized_solution(model) -> tuple[np.ndarray, np.ndarray]:
    """The streaming model's weights on standardized features (its coef_ apply to X as given)."""
    return model.coef_ * model.scale_, model.intercept_ + model.coef_ @ model.mean_


def compare_logreg(data, C: float, tol: float) -> tuple[float, float, float, float]:
    Xtr, ytr, Xte, yte = data
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol, max_iter=5000))
    reference.fit(Xtr.astype(np.float64), ytr)
    ours = StreamingLogisticRegression(C=C, tol=tol, max_iter=5000).fit(Xtr, ytr)
    Z = StandardScaler().fit_transform(Xtr.astype(np.float64))
    loss = "binomial" if len(ours.classes_) == 2 else "multinomial"
    theirs = objective(Z, ytr, reference[-1].coef_, reference[-1].intercept_, C, loss)
    mine = objective(Z, ytr, *standardized_solution(ours), C, loss)
    assert ours.objective_ == pytest.approx(mine, rel=OBJECTIVE_RTOL)  # what the fit reports is what it reached
    return reference.score(Xte, yte), ours.score(Xte, yte), theirs, mine


@pytest.mark.parametrize("C", [None, 0.05])
def test_logistic_regression_matches_scikit_learn_on_digits(digits, one_thread, C):
    C = C or logreg_c(digits[0].shape[1])
    their_accuracy, my_accuracy, theirs, mine = compare_logreg(digits, C, tol=1e-8)
    assert my_accuracy == pytest.approx(their_accuracy, abs=ACCURACY_TOLERANCE)
    assert mine == pytest.approx(theirs, rel=OBJECTIVE_RTOL)


def test_logistic_regression_matches_scikit_learn_on_mnist(mnist, one_thread):
    their_accuracy, my_accuracy, theirs, mine = compare_logreg(mnist, logreg_c(784), tol=1e-6)
    assert my_accuracy == pytest.approx(their_accuracy, abs=ACCURACY_TOLERANCE)
    assert mine == pytest.approx(theirs, rel=OBJECTIVE_RTOL)


@pytest.fixture(scope="module")
def cifar_pixels(shared_datasets):
    """CIFAR-10's 10,000 test images at 16 x 16 (every other pixel: 768 strongly correlated columns) and labels."""
    from convae import load_dataset

    data = load_dataset("cifar10:test", data_dir=shared_datasets, download=False)
    X = np.ascontiguousarray(data.images[:, ::2, ::2]).reshape(len(data.images), -1).astype(np.float32) / 255
    return X, data.labels.astype(np.int64)


@pytest.mark.parametrize("estimator", [StreamingLogisticRegression, StreamingLinearSVM])
def test_preconditioned_steps_reach_the_same_minimum(cifar_pixels, mnist, one_thread, monkeypatch, estimator):
    """precondition=True: L-BFGS in a block whitening's coordinates minimizes the same objective,
    the penalty on the standardized weights. On correlated columns (CIFAR-10's pixels) it stops
    at scikit-learn's tol in a fraction of the passes, at an objective no higher; on MNIST's
    pixels (blocks of 200 columns here) both fits run to a tight tol reach the same minimum and
    predictions. objective_ reports what was reached."""
    loss = "multinomial" if estimator is StreamingLogisticRegression else "squared_hinge"
    c_of = logreg_c if estimator is StreamingLogisticRegression else linsvm_c
    X, y = cifar_pixels
    C = c_of(X.shape[1])
    plain = estimator(C=C, tol=1e-4, max_iter=2000).fit(X, y)
    pre = estimator(C=C, tol=1e-4, max_iter=2000, precondition=True).fit(X, y)
    assert pre.n_passes_ * 5 < plain.n_passes_  # measured: 16 against 340 (logreg), 24 against 515 (linsvm)
    assert pre.objective_ <= plain.objective_ * (1 + OBJECTIVE_RTOL)
    Xtr, ytr, Xte, _ = mnist
    monkeypatch.setattr(linear, "_PRECONDITION_BLOCK_COLUMNS", 200)
    C = c_of(784)
    plain = estimator(C=C, tol=1e-7, max_iter=5000).fit(Xtr, ytr)
    pre = estimator(C=C, tol=1e-7, max_iter=5000, precondition=True).fit(Xtr, ytr)
    Z = StandardScaler().fit_transform(Xtr.astype(np.float64))
    reached = objective(Z, ytr, *standardized_solution(pre), C, loss)
    assert pre.objective_ == pytest.approx(reached, rel=OBJECTIVE_RTOL)
    assert reached == pytest.approx(objective(Z, ytr, *standardized_solution(plain), C, loss), rel=OBJECTIVE_RTOL)
    assert np.mean(pre.predict(Xte) == plain.predict(Xte)) >= 1 - ACCURACY_TOLERANCE


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_preconditioning_needs_rows_and_leaves_whitened_fits_alone(mnist, one_thread):
    """Below 512 rows, or with `whiten`, precondition=True fits as without it, bit for bit; the
    blocks narrow as the features widen, their factors 128 MB at most."""
    Xtr, ytr, _, _ = mnist
    for rows, options in ((500, {}), (3000, {"whiten": 0.1})):
        plain = StreamingLogisticRegression(max_iter=30, **options).fit(Xtr[:rows], ytr[:rows])
        pre = StreamingLogisticRegression(max_iter=30, precondition=True, **options).fit(Xtr[:rows], ytr[:rows])
        np.testing.assert_array_equal(pre.coef_, plain.coef_)
    X = np.zeros((600, 40_000), dtype=np.float16)
    X[np.arange(600), np.arange(600)] = 1.0
    basis = linear._block_preconditioner(
        linear._Rows(X, torch.device("cpu"), None, 1, 1), np.zeros(40_000), np.ones(40_000)
    )
    widths = {b - a for a, b in basis.blocks}
    assert max(widths) <= 839 and sum(w * w * 4 for w in (b - a for a, b in basis.blocks)) <= 128 << 20


def test_two_classes_with_string_labels_match_scikit_learn(digits, one_thread):
    """Two classes: one weight vector and the binomial loss, as scikit-learn; labels of any type."""
    Xtr, ytr, Xte, yte = digits
    names = np.array(["three", "eight"])
    keep_tr, keep_te = np.isin(ytr, [3, 8]), np.isin(yte, [3, 8])
    data = (Xtr[keep_tr], names[(ytr[keep_tr] == 8).astype(int)], Xte[keep_te], names[(yte[keep_te] == 8).astype(int)])
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, tol=1e-8, max_iter=5000)).fit(*data[:2])
    ours = StreamingLogisticRegression(C=0.1, tol=1e-8, max_iter=5000).fit(*data[:2])
    assert ours.coef_.shape == (1, Xtr.shape[1]) and list(ours.classes_) == sorted(names)
    assert np.mean(ours.predict(data[2]) == reference.predict(data[2])) >= 1 - ACCURACY_TOLERANCE
    np.testing.assert_allclose(ours.predict_proba(data[2]), reference.predict_proba(data[2]), atol=1e-4)
    assert ours.decision_function(data[2]).shape == (len(data[2]),)
    y01 = (data[1] == "three").astype(int)  # classes_ sorted, "eight" < "three": "three" is the positive class
    Z = StandardScaler().fit_transform(data[0].astype(np.float64))
    theirs = objective(Z, y01, reference[-1].coef_, reference[-1].intercept_, 0.1, "binomial")
    assert objective(Z, y01, *standardized_solution(ours), 0.1, "binomial") == pytest.approx(theirs, rel=OBJECTIVE_RTOL)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_a_16_or_8_bit_memmap_is_read_in_place_and_predicts_the_same(mnist, one_thread, tmp_path, dtype):
    """float16, or uint8 codes (here the pixels' own bytes: 255 x the values, an affine map of
    each column that standardizing undoes), read in place: the float32 fit's predictions."""
    Xtr, ytr, Xte, yte = mnist
    C = logreg_c(Xtr.shape[1])
    reference = StreamingLogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(Xtr, ytr)
    low = (lambda x: x.astype(np.float16)) if dtype == "float16" else (lambda x: np.rint(x * 255).astype(np.uint8))
    np.save(tmp_path / "train.npy", low(Xtr))
    np.save(tmp_path / "test.npy", low(Xte))
    train16 = np.load(tmp_path / "train.npy", mmap_mode="r")
    test16 = np.load(tmp_path / "test.npy", mmap_mode="r")
    tracemalloc.start()  # numpy's allocations: a copy of X, even a float16 one, would show
    try:
        model = StreamingLogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(train16, ytr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # L-BFGS's history (2 x 10 parameter vectors, 1.3 MB) is most of it; a float16 copy alone would
    # be X's size, a float32 copy of the uint8 codes 4x theirs
    bound = train16.nbytes * (1 if dtype == "float16" else 2)
    assert peak < bound, f"fit allocated {peak:,} bytes through numpy for {train16.nbytes:,} of X"
    assert model.score(test16, yte) == pytest.approx(reference.score(Xte, yte), abs=ACCURACY_TOLERANCE)
    assert np.mean(model.predict(test16) == reference.predict(Xte)) >= 1 - ACCURACY_TOLERANCE
    assert not train16.flags.writeable and isinstance(train16, np.memmap)


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_linear_svm_matches_convae_linear_svm(dataset, request, one_thread):
    Xtr, ytr, Xte, yte = request.getfixturevalue(dataset)
    C = linsvm_c(Xtr.shape[1])
    reference = make_pipeline(StandardScaler(), LinearSVM(C=C)).fit(Xtr.astype(np.float64), ytr)
    ours = StreamingLinearSVM(C=C).fit(Xtr, ytr)
    assert ours.score(Xte, yte) == pytest.approx(reference.score(Xte, yte), abs=ACCURACY_TOLERANCE)
    Z = StandardScaler().fit_transform(Xtr.astype(np.float64))
    theirs = objective(Z, ytr, reference[-1].coef_, reference[-1].intercept_, C, "hinge")
    assert objective(Z, ytr, *standardized_solution(ours), C, "hinge") == pytest.approx(theirs, rel=OBJECTIVE_RTOL)


def test_two_class_linear_svm_matches_convae_linear_svm(digits, one_thread):
    Xtr, ytr, Xte, yte = digits
    keep_tr, keep_te = np.isin(ytr, [1, 7]), np.isin(yte, [1, 7])
    reference = make_pipeline(StandardScaler(), LinearSVM(C=0.01)).fit(Xtr[keep_tr].astype(np.float64), ytr[keep_tr])
    ours = StreamingLinearSVM(C=0.01).fit(Xtr[keep_tr], ytr[keep_tr])
    assert ours.coef_.shape == (1, Xtr.shape[1])
    np.testing.assert_allclose(
        ours.decision_function(Xte[keep_te]), reference.decision_function(Xte[keep_te]), atol=1e-3
    )


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("whiten", [None, 0.1])
def test_threads_and_chunks_change_nothing_but_speed(mnist, one_thread, whiten):
    """Row groups are summed in a fixed order, and the whitening's blocks are the same whatever
    thread multiplies them: any number of threads gives the same bits."""
    Xtr, ytr, Xte, _ = mnist
    fits = [
        StreamingLogisticRegression(C=0.1, max_iter=30, n_threads=t, chunk_rows=c, whiten=whiten).fit(Xtr, ytr)
        for t, c in ((1, 100), (2, 100), (2, None))
    ]
    np.testing.assert_array_equal(fits[0].coef_, fits[1].coef_)
    assert fits[0].n_passes_ == fits[1].n_passes_
    # other chunks: other float32 sums, carried by 30 unconverged steps (largest difference 1.1e-3
    # on an Intel host with AMX, below 1e-3 on an AMD one)
    np.testing.assert_allclose(fits[2].decision_function(Xte), fits[0].decision_function(Xte), atol=3e-3)
    assert torch.get_num_threads() == 1  # the caller's setting (one_thread's) is back


def test_int8_digits_rebuild_each_row_to_its_precision():
    rng = np.random.default_rng(0)
    M = torch.from_numpy(rng.normal(size=(5, 300)) * np.array([[1e-6], [1.0], [1e3], [0.0], [1.0]]))
    M[4, :] = -M[4].abs()  # a row whose largest magnitude is negative
    for n_digits, dtype in ((3, torch.float32), (4, torch.float64)):
        D, w = int8.digits(M.to(dtype), n_digits)
        assert D.dtype == torch.int8 and D.shape == (5 * n_digits, 300) and int(D.abs().max()) <= 65
        rebuilt = (w.T.reshape(n_digits, 5, 1) * D.double().view(n_digits, 5, 300)).sum(0)
        top = M.abs().amax(1, keepdim=True)
        assert ((rebuilt - M).abs() <= top * 2.0 ** -(7 * n_digits - 1) * 1.01 + 1e-300).all()
    assert not D[3::5].any()  # the zero row: zero digits


@pytest.mark.parametrize(("kind", "k"), [("multinomial", 10), ("hinge", 10), ("binomial", 1)])
def test_int8_passes_give_the_float32_objective_and_gradient(mnist, one_thread, kind, k):
    """uint8 codes' passes run on int8 products (convae.probe.int8): the objective and its
    gradient of a float32 pass over the same codes, in chunks of their own size (a ragged last)."""
    Xtr, ytr, _, _ = mnist
    codes = np.rint(Xtr[:3001] * 255).astype(np.uint8)
    y = ytr[:3001].astype(np.int64) if k > 1 else (ytr[:3001] % 2).astype(np.float32)
    rng = np.random.default_rng(1)
    fits = []
    for X in (codes, codes.astype(np.float32)):
        rows = linear._Rows(X, torch.device("cpu"), 700, 2, 3, k)
        mean, var = linear._column_stats(rows)
        basis = linear._Basis(mean, linear._scale(mean, var, rows.n))
        objective = linear._Objective(rows, kind, y, k, basis, 0.1)
        fits.append((rows.code_rows, *objective(rng.normal(scale=0.05, size=k * 784 + k))))
        rng = np.random.default_rng(1)
        rows.close()
    (code_rows, f8, g8), (float_rows, f32, g32) = fits
    assert code_rows == 700 and float_rows == 0
    assert f8 == pytest.approx(f32, rel=1e-6)
    np.testing.assert_allclose(g8, g32, rtol=0, atol=1e-5 * np.abs(g32).max())


def test_int8_chunks_of_narrow_codes_fill_their_bytes():
    """A chunk of narrow codes is CHUNK_BYTES of them: its sums' int32 range allows 129,000 rows."""
    if not int8.available():
        pytest.skip("this torch has no CPU int8 product")
    cpu = torch.device("cpu")
    assert int8.chunk_rows(20_000, 2_048, cpu, None) == int8.CHUNK_BYTES // 2_048  # 12,288 rows: one chunk
    assert int8.chunk_rows(1_000_000, 64, cpu, None) == int8.MAX_CHUNK_ROWS
    assert 255 * 65 * int8.MAX_CHUNK_ROWS < 2**31  # a chunk's gradient sums stay exact in int32


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_without_the_int8_kernel_codes_take_the_float32_path(mnist, one_thread, monkeypatch):
    Xtr, ytr, Xte, _ = mnist
    codes, test = np.rint(Xtr[:2000] * 255).astype(np.uint8), np.rint(Xte * 255).astype(np.uint8)
    assert linear._Rows(codes, torch.device("cpu"), None, 1, 1).code_rows > 0
    on_int8 = StreamingLogisticRegression(C=0.1, max_iter=50).fit(codes, ytr[:2000])
    monkeypatch.setattr(int8, "available", lambda: False)
    assert linear._Rows(codes, torch.device("cpu"), None, 1, 1).code_rows == 0
    on_float32 = StreamingLogisticRegression(C=0.1, max_iter=50).fit(codes, ytr[:2000])
    assert np.mean(on_int8.predict(test) == on_float32.predict(test)) >= 0.995


def test_without_standardization_it_fits_x_as_given(digits, one_thread):
    Xtr, ytr, Xte, yte = digits
    reference = LogisticRegression(C=0.01, tol=1e-8, max_iter=5000).fit(Xtr.astype(np.float64), ytr)
    ours = StreamingLogisticRegression(C=0.01, tol=1e-8, max_iter=5000, standardize=False).fit(Xtr, ytr)
    np.testing.assert_array_equal(ours.mean_, 0.0)
    np.testing.assert_array_equal(ours.scale_, 1.0)
    assert ours.score(Xte, yte) == pytest.approx(reference.score(Xte, yte), abs=ACCURACY_TOLERANCE)
    theirs = objective(Xtr.astype(np.float64), ytr, reference.coef_, reference.intercept_, 0.01, "multinomial")
    # raw pixels (0-16, an unpenalized intercept) are badly conditioned: float32 passes stop above the
    # optimum by an amount that depends on the host's kernels (2e-5 on one host, 2.7e-4 on another,
    # 406 iterations against scikit-learn's 3,316 in float64)
    assert ours.objective_ == pytest.approx(theirs, rel=1e-3)
    assert ours.objective_ >= theirs * (1 - OBJECTIVE_RTOL)


@pytest.mark.parametrize("estimator", [StreamingLogisticRegression, StreamingLinearSVM])
@pytest.mark.parametrize("standardize", [True, False])
def test_folded_whitening_fits_what_a_whitened_copy_fits(mnist, one_thread, estimator, standardize, tmp_path):
    """``whiten=eps`` reaches the solution of the same classifier on Whitener(eps)'s copy of the
    (standardized) features: the same penalty on the weights, without the copy. MNIST's blank
    pixels are constant columns: the floor keeps the covariance positive definite."""
    Xtr, ytr, Xte, yte = mnist
    np.save(tmp_path / "x.npy", Xtr.astype(np.float16))
    X16 = np.load(tmp_path / "x.npy", mmap_mode="r")  # read in place, as the probe's features
    whitener = make_pipeline(*([StandardScaler()] if standardize else []), Whitener(eps=0.1))
    copy = whitener.fit_transform(np.asarray(X16, dtype=np.float32))
    C = 4 * logreg_c(Xtr.shape[1])
    reference = estimator(C=C, tol=1e-7, max_iter=3000, standardize=False).fit(copy, ytr)
    ours = estimator(C=C, tol=1e-7, max_iter=3000, standardize=standardize, whiten=0.1).fit(X16, ytr)
    assert ours.objective_ == pytest.approx(reference.objective_, rel=OBJECTIVE_RTOL)
    theirs = reference.predict(whitener.transform(Xte))
    assert np.mean(ours.predict(Xte) == theirs) >= 1 - ACCURACY_TOLERANCE
    with pytest.raises(ValueError, match="whiten"):
        estimator(whiten=0.0).fit(Xtr[:100], ytr[:100])


@pytest.mark.parametrize("estimator", [StreamingLogisticRegression, StreamingLinearSVM])
def test_whitened_blocks_fit_what_a_whitener_per_block_fits(mnist, one_thread, estimator):
    """``whiten_blocks`` whitens each block of columns on its own: the solution of the same
    classifier on a copy with a Whitener per block (MNIST's pixels as blocks of rows of the image,
    uneven widths)."""
    Xtr, ytr, Xte, _ = mnist
    widths = [196, 392, 196]
    edges = np.cumsum([0, *widths])
    whiteners = [
        make_pipeline(StandardScaler(), Whitener(eps=0.1)).fit(Xtr[:, a:b]) for a, b in zip(edges[:-1], edges[1:])
    ]

    def copy(X):
        return np.hstack([w.transform(X[:, a:b]) for w, a, b in zip(whiteners, edges[:-1], edges[1:])])

    C = 4 * logreg_c(Xtr.shape[1])
    reference = estimator(C=C, tol=1e-7, max_iter=3000, standardize=False).fit(copy(Xtr), ytr)
    ours = estimator(C=C, tol=1e-7, max_iter=3000, whiten=0.1, whiten_blocks=widths).fit(Xtr, ytr)
    assert ours.objective_ == pytest.approx(reference.objective_, rel=OBJECTIVE_RTOL)
    assert np.mean(ours.predict(Xte) == reference.predict(copy(Xte))) >= 1 - ACCURACY_TOLERANCE
    whole = estimator(C=C, tol=1e-7, max_iter=3000, whiten=0.1).fit(Xtr, ytr)
    assert whole.objective_ != pytest.approx(ours.objective_, rel=OBJECTIVE_RTOL)  # another whitening
    with pytest.raises(ValueError, match="whiten_blocks must be positive widths adding up to the 784 columns"):
        estimator(whiten=0.1, whiten_blocks=[196, 392]).fit(Xtr[:100], ytr[:100])


def _standardized_rows(X: np.ndarray, tmp_path):
    """X as a float16 memmap (as the probe reads its features), its rows, column means and scales."""
    np.save(tmp_path / "x.npy", X.astype(np.float16))
    X16 = np.load(tmp_path / "x.npy", mmap_mode="r")
    rows = linear._Rows(X16, torch.device("cpu"), None, 1, 1)
    mean, var = linear._column_stats(rows)
    return X16, rows, mean, linear._scale(mean, var, rows.n)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_either_order_of_the_score_product_fits_the_same(mnist, one_thread, monkeypatch):
    """The passes compute a chunk's scores k rows first or rows first, whichever this CPU runs
    faster (timed once): both orders, forced, reach the same fit but for float32 rounding."""
    Xtr, ytr, Xte, _ = mnist
    assert isinstance(linear._k_rows_first(100, Xtr.shape[1], 10), bool)
    fits = []
    for order in (True, False):
        monkeypatch.setattr(linear, "_k_rows_first", lambda *shape, order=order: order)
        fits.append(StreamingLogisticRegression(C=0.1, max_iter=30, chunk_rows=100).fit(Xtr, ytr))
    np.testing.assert_allclose(fits[0].decision_function(Xte), fits[1].decision_function(Xte), atol=3e-3)


@pytest.mark.parametrize("k_rows_first", [True, False])
def test_passes_read_larger_chunks_where_scores_are_computed_rows_first(monkeypatch, k_rows_first):
    monkeypatch.setattr(linear, "_k_rows_first", lambda *shape: k_rows_first)
    X = np.zeros((10_000, 1000), dtype=np.float16)
    rows = linear._Rows(X, torch.device("cpu"), None, 1, 1, 10)
    base = linear._CHUNK_BYTES // (4 * 1000)
    assert rows.k_rows_first is k_rows_first
    assert rows.chunk_rows == (base if k_rows_first else linear._ROWS_FIRST_CHUNKS * base)
    assert linear._Rows(X, torch.device("cpu"), 100, 1, 1, 10).chunk_rows == 100  # the caller's, either way


@pytest.mark.parametrize("estimated", [False, True])
def test_whitened_products_are_the_inverse_factors(mnist, one_thread, monkeypatch, estimated, tmp_path):
    """The whitening's products by triangular solves with its Cholesky factor U are the products
    with U's inverse (scipy's), and its gain is the exact one computed from that inverse, or
    (wide features, forced here for MNIST's 784 columns) Hutchinson's estimate of it to 0.5%."""
    if estimated:
        monkeypatch.setattr(linear, "_EXACT_TRACE_COLUMNS", 0)
    Xtr, _, _, _ = mnist
    _, rows, mean, scale = _standardized_rows(Xtr, tmp_path)
    basis = linear._whitened_basis(rows, mean, scale, 0.1, None)
    ((_, _, lower, gain),) = basis.whitened
    U = lower.numpy().T.astype(np.float64)
    np.testing.assert_array_equal(np.tril(U, -1), 0.0)
    R = scipy.linalg.solve_triangular(U, np.eye(rows.d), lower=False)  # U^-1
    W = np.random.default_rng(0).standard_normal((10, rows.d))
    dense_weights = W @ R.T * (gain / scale)
    dense_gradient = (W / scale) @ R * gain
    np.testing.assert_allclose(basis.weights(W), dense_weights, rtol=1e-4, atol=1e-4 * np.abs(dense_weights).max())
    np.testing.assert_allclose(basis.gradient(W), dense_gradient, rtol=1e-4, atol=1e-4 * np.abs(dense_gradient).max())
    # the gain: 1 / sqrt(1 - floor ||U^-1||^2 / d), the floor 0.1 x the mean variance; U.T @ U =
    # cov + floor, whose mean diagonal is 1.1 x the mean variance
    floor = 0.1 * float(np.mean(np.diagonal(U.T @ U))) / 1.1
    exact = 1.0 / np.sqrt(1.0 - floor * float(np.square(R).sum()) / rows.d)
    assert gain == pytest.approx(exact, rel=5e-3 if estimated else 1e-5)


def test_bf16_covariance_matches_float32(mnist, monkeypatch, tmp_path):
    """The whitening's covariance from bf16 tile products (used where the CPU has native bf16 and
    the features are wide) is the float32 syrk's to bf16 rounding, tiles of uneven widths
    included, and the whitened fit predicts the same (forced here at 784 columns, tiles of 300)."""
    Xtr, ytr, Xte, _ = mnist
    X16, rows, mean, scale = _standardized_rows(Xtr, tmp_path)
    monkeypatch.setattr(linear, "_BF16_TILE_COLUMNS", 300)
    low = np.triu(linear._covariance_bf16(rows, mean, scale))
    X32 = np.asarray(X16, dtype=np.float32)  # read in place: centring must not write into it
    rows32 = linear._Rows(X32, torch.device("cpu"), None, 1, 1)
    np.testing.assert_array_equal(np.triu(linear._covariance_bf16(rows32, mean, scale)), low)
    np.testing.assert_array_equal(X32, np.asarray(X16, dtype=np.float32))
    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 10**9)
    full = np.triu(linear._covariance(rows, mean, scale))
    assert np.linalg.norm(low - full) <= 2**-8 * np.linalg.norm(full)  # bf16 keeps 8 significant bits
    # a column with one large value: its square carries twice that value's rounding and the
    # product's own (at most 2^-8 relative each)
    np.testing.assert_allclose(np.diagonal(low), np.diagonal(full), rtol=3 * 2**-8, atol=1e-6)
    fp32 = StreamingLogisticRegression(whiten=0.1).fit(X16, ytr)
    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 0)
    monkeypatch.setattr(linear, "bf16_products", lambda device: True)
    bf16 = StreamingLogisticRegression(whiten=0.1).fit(X16, ytr)
    assert np.mean(bf16.predict(Xte) == fp32.predict(Xte)) >= 0.995


def test_an_indefinite_bf16_covariance_is_computed_again_in_float32(mnist, monkeypatch, tmp_path):
    """Where the bf16 covariance's rounding outweighs a small floor, its Cholesky factorization
    fails: the covariance is computed again in float32 and the fit is the float32 path's (here the
    bf16 covariance is made indefinite on purpose). Where float32's fails too, a ValueError names
    `whiten`."""
    Xtr, ytr, Xte, _ = mnist
    X16, *_ = _standardized_rows(Xtr[:2000], tmp_path)
    y = ytr[:2000]
    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 10**9)
    fp32 = StreamingLogisticRegression(whiten=0.1, max_iter=50).fit(X16, y)
    tries = []

    def indefinite(rows, mean, scale, picks=None, columns=None):
        tries.append("bf16")
        cov = np.zeros((rows.d, rows.d), dtype=np.float32, order="F")
        cov[0, 0] = -1e3  # no floor makes this positive definite
        return cov

    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 0)
    monkeypatch.setattr(linear, "bf16_products", lambda device: True)
    monkeypatch.setattr(linear, "_covariance_bf16", indefinite)
    again = StreamingLogisticRegression(whiten=0.1, max_iter=50).fit(X16, y)
    assert tries == ["bf16"]
    np.testing.assert_array_equal(again.coef_, fp32.coef_)

    def fails(cov, n_threads):
        raise np.linalg.LinAlgError("2-th leading minor not positive definite")

    monkeypatch.setattr(linear, "_upper_cholesky", fails)
    with pytest.raises(ValueError, match=r"whiten=0.001 .* raise whiten"):
        StreamingLogisticRegression(whiten=0.001, max_iter=5).fit(X16, y)
    assert tries == ["bf16", "bf16"]


def test_whitening_from_sampled_rows(mnist, monkeypatch, tmp_path):
    """``whiten_rows=m`` computes the whitening's covariance from m evenly spaced rows, the first
    and the last among them, centred and scaled by every row's statistics, in both covariance
    paths; "auto" takes 20,000 rows (2 per column if more), every row of smaller matrices.
    Not the default: on the mnist preset it cost 0.09 points of validation accuracy."""
    Xtr, ytr, Xte, yte = mnist
    X16, rows, mean, scale = _standardized_rows(Xtr, tmp_path)
    picks = linear._covariance_rows(rows.n, rows.d, 1000)
    assert len(picks) == 1000 and picks[0] == 0 and picks[-1] == rows.n - 1 and (np.diff(picks) > 0).all()
    for every in ("auto", None, rows.n, 10**6):
        assert linear._covariance_rows(rows.n, rows.d, every) is None
    assert len(linear._covariance_rows(10**6, 784, "auto")) == 20_000
    assert len(linear._covariance_rows(10**6, 12_800, "auto")) == 25_600
    Z = (np.asarray(X16[picks], dtype=np.float64) - mean) / scale
    expected = np.triu(Z.T @ Z / (len(picks) - 1))
    low = np.triu(linear._covariance_bf16(rows, mean, scale, picks))
    assert np.linalg.norm(low - expected) <= 2**-8 * np.linalg.norm(expected)
    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 10**9)
    full = np.triu(linear._covariance(rows, mean, scale, picks))
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-4)
    sampled = StreamingLogisticRegression(whiten=0.1, whiten_rows=1500).fit(X16, ytr)
    every_row = StreamingLogisticRegression(whiten=0.1, whiten_rows=None).fit(X16, ytr)
    assert sampled.score(Xte, yte) >= every_row.score(Xte, yte) - 0.01
    for bad in (1, "all"):
        with pytest.raises(ValueError, match="whiten_rows"):
            StreamingLogisticRegression(whiten=0.1, whiten_rows=bad).fit(Xtr[:100], ytr[:100])


def test_wide_whitening_factors_with_mkl(mnist, monkeypatch, tmp_path):
    """Covariances of _OPENBLAS_CHOLESKY_COLUMNS columns and more (where the bundled OpenBLAS's
    threaded spotrf segfaults) are factored by torch's in place: the same factor as scipy's to
    float32 rounding, the whitened fit's the same predictions (forced here at 784 columns); a
    matrix that is not positive definite raises as scipy's does."""
    Xtr, ytr, Xte, _ = mnist
    _, rows, mean, scale = _standardized_rows(Xtr[:5000], tmp_path)
    monkeypatch.setattr(linear, "_BF16_COVARIANCE_COLUMNS", 10**9)
    cov = linear._covariance(rows, mean, scale)
    cov[np.diag_indices_from(cov)] += 0.1
    expected = linear.cholesky(cov, lower=False, check_finite=False)
    monkeypatch.setattr(linear, "_OPENBLAS_CHOLESKY_COLUMNS", 0)
    factor = linear._upper_cholesky(cov, n_threads=2)
    assert factor is cov  # in place: one d x d matrix, as scipy's overwrite_a
    np.testing.assert_allclose(factor, expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(np.linalg.LinAlgError, match="positive definite"):
        linear._upper_cholesky(np.asfortranarray(-np.eye(4, dtype=np.float32)), n_threads=1)
    mkl = StreamingLogisticRegression(whiten=0.1).fit(Xtr[:5000], ytr[:5000])
    monkeypatch.setattr(linear, "_OPENBLAS_CHOLESKY_COLUMNS", 10**9)
    openblas = StreamingLogisticRegression(whiten=0.1).fit(Xtr[:5000], ytr[:5000])
    assert np.mean(mkl.predict(Xte) == openblas.predict(Xte)) >= 0.995


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_constant_columns_and_non_finite_values(digits, tmp_path):
    Xtr, ytr, _, _ = digits
    assert (Xtr.std(axis=0) == 0).any()  # digits has blank pixels: scale 1, as StandardScaler
    model = StreamingLogisticRegression(max_iter=5).fit(Xtr, ytr)
    scaler = StandardScaler().fit(Xtr.astype(np.float64))
    np.testing.assert_allclose(model.scale_, scaler.scale_, rtol=1e-12)
    np.testing.assert_allclose(model.mean_, scaler.mean_, rtol=1e-12)
    np.testing.assert_array_equal(model.scale_ == 1, scaler.scale_ == 1)
    bad = Xtr.astype(np.float16)
    bad[7, 3] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="NaN or infinity"):
        StreamingLogisticRegression().fit(np.load(tmp_path / "bad.npy", mmap_mode="r"), ytr)
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.predict(np.load(tmp_path / "bad.npy", mmap_mode="r"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("estimator", [StreamingLogisticRegression, StreamingLinearSVM])
def test_cuda_fits_as_the_cpu(mnist, estimator):
    Xtr, ytr, Xte, yte = mnist
    X16 = Xtr.astype(np.float16)
    cpu = estimator(C=0.1, tol=1e-6, max_iter=2000).fit(X16, ytr)
    gpu = estimator(C=0.1, tol=1e-6, max_iter=2000, device="cuda").fit(X16, ytr)
    streamed = estimator(C=0.1, tol=1e-6, max_iter=2000, device="cuda", chunk_rows=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streamed.fit(X16, ytr)
    for model in (gpu, streamed):
        assert model.score(Xte, yte) == pytest.approx(cpu.score(Xte, yte), abs=ACCURACY_TOLERANCE)
        assert model.objective_ == pytest.approx(cpu.objective_, rel=OBJECTIVE_RTOL)
