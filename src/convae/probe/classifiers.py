"""The probe's classifiers: scikit-learn's, and two written here for wide features.

:class:`LinearSVM` (the squared hinge loss in the primal, by L-BFGS on every core) and
:class:`Whitener` (regularized PCA whitening) are scikit-learn estimators; ``CLASSIFIERS``
builds each probe classifier by name with C scaled to the feature dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .linear import StreamingLinearSVM, StreamingLogisticRegression
from .options import CLASSIFIER_NAMES


def logreg_c(dim: int) -> float:
    """The logistic regression's C for `dim` standardized features: 64 / dim (at most 1).

    Standardized features make a weight vector's logits grow like sqrt(dim), so a fixed C
    regularizes wide features less than narrow ones; scaling C by 1/dim (as SVC's gamma="scale"
    does for its kernel) keeps it even. Measured best on MNIST's 2048-value code (C ~0.03) and on
    digits' 256-value code (C >= 0.1): see benchmarks/RESULTS.md.
    """
    return min(1.0, 64.0 / max(int(dim), 1))


def linsvm_c(dim: int) -> float:
    """The linear SVM's C for `dim` standardized features: 8 / dim (at most 0.1), by logreg_c's reasoning.

    Picked on validation splits (the last 10,000 train images): C = 0.001 was best on MNIST's
    6,144 values (0.01 and 0.1 lower) and 0.0003-0.001 on CIFAR-10's 12,288 (0.01: -2.8 points,
    0.1: -5); see benchmarks/RESULTS.md.
    """
    return min(0.1, 8.0 / max(int(dim), 1))


class LinearSVM(ClassifierMixin, BaseEstimator):
    """One-vs-rest linear SVM with the squared hinge loss (an L2-SVM), fitted in the primal by L-BFGS.

    It minimizes ``0.5 * ||w_k||^2 + C * sum_i max(0, 1 - y_ik (x_i . w_k + b_k))^2`` per class,
    LinearSVC's default objective except that the intercept is not penalized. LinearSVC's
    liblinear is single-threaded and copies dense features into a sparse format; on 60,000
    images of 6,144 features its dual solver did not finish in 15 minutes. Here every
    iteration is two dense matrix products, in the features' own dtype, on every core (the
    L2-SVM that Coates et al. fitted to their CIFAR-10 features the same way).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-5):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("LinearSVM needs at least 2 classes in y; got 1 class")
        n, d = X.shape
        # +1 for the class, -1 for the rest; two classes need one column
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        if k == 1:
            targets = np.where(codes == 1, 1.0, -1.0).astype(X.dtype)[:, None]
        else:
            targets = -np.ones((n, k), dtype=X.dtype)
            targets[np.arange(n), codes] = 1.0
        # the objective divided by C * n: the same minimum, gradients on a scale tol can judge
        ridge = 1.0 / (2.0 * self.C * n)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[: d * k].reshape(d, k), theta[d * k :]
            margin = np.maximum(0.0, 1.0 - targets * (X @ w.astype(X.dtype) + b.astype(X.dtype)))  # (n, k)
            loss = float(np.sum(margin.astype(np.float64) ** 2)) / n + ridge * float(np.sum(w**2))
            dscore = (-2.0 / n) * targets * margin  # d loss / d score
            grad_w = (X.T @ dscore).astype(np.float64) + 2.0 * ridge * w
            return loss, np.concatenate([grad_w.ravel(), dscore.sum(axis=0, dtype=np.float64)])

        result = minimize(
            loss_grad,
            np.zeros(d * k + k),
            jac=True,
            method="L-BFGS-B",
            options=dict(maxiter=self.max_iter, gtol=self.tol, ftol=1e-12),
        )
        self.coef_ = result.x[: d * k].reshape(d, k).T.copy()  # (k, d), as scikit-learn's linear models
        self.intercept_ = result.x[d * k :].copy()
        self.n_iter_ = int(result.nit)
        if self.n_iter_ >= self.max_iter:
            warnings.warn(
                f"LinearSVM stopped at max_iter={self.max_iter} before converging (tol={self.tol}); "
                "raise max_iter for the exact optimum",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        picked = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[picked]


class Whitener(TransformerMixin, BaseEstimator):
    """Regularized PCA whitening: features decorrelated, each principal axis scaled to unit variance.

    ``(x - mean) @ U / sqrt(eigenvalue + eps * mean eigenvalue)``, rescaled so the whitened
    features' variance averages 1 (the scale logreg_c assumes). `eps` keeps the weakest axes,
    mostly noise, from being raised all the way to the signal's scale. A linear classifier's L2
    penalty then weighs every direction by its variance in the data instead of by its units:
    on MNIST's preset features, logistic regression went from 0.9900 to 0.9933 on a validation
    split (eps 0.1; 0.9925-0.9933 for eps 0.03-0.3), while Fashion-MNIST's and CIFAR-10's lost
    0.9 and 2.4 points; see benchmarks/RESULTS.md.
    No rotation back (ZCA): L2-penalized linear models do not see a rotation.
    """

    def __init__(self, eps: float = 0.1, batch_size: int = 4096):
        self.eps = eps
        self.batch_size = batch_size

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=(np.float32, np.float64))
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        n, d = X.shape
        self.mean_ = X.mean(axis=0, dtype=np.float64)
        mean, cov = self.mean_.astype(X.dtype), np.zeros((d, d))
        for start in range(0, n, self.batch_size):  # bounded extra memory, float64 sums
            centered = X[start : start + self.batch_size] - mean
            cov += centered.T @ centered
        eigenvalues, axes = np.linalg.eigh(cov / max(n - 1, 1))
        eigenvalues, axes = np.clip(eigenvalues[::-1], 0.0, None), axes[:, ::-1]  # strongest first
        floor = self.eps * max(float(eigenvalues.mean()), np.finfo(np.float64).tiny)
        variance = eigenvalues / (eigenvalues + floor)  # of each whitened axis
        scale = 1.0 / np.sqrt((eigenvalues + floor) * max(float(variance.mean()), np.finfo(np.float64).tiny))
        self.eigenvalues_ = eigenvalues
        self.projection_ = (axes * scale).astype(X.dtype)  # (d, d): column j is axis j, scaled
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=(np.float32, np.float64), reset=False)
        mean, projection = self.mean_.astype(X.dtype), self.projection_.astype(X.dtype, copy=False)
        out = np.empty((len(X), projection.shape[1]), dtype=X.dtype)
        for start in range(0, len(X), self.batch_size):  # no centred copy of the whole matrix
            out[start : start + self.batch_size] = (X[start : start + self.batch_size] - mean) @ projection
        return out


# name -> classifier for (seed, number of labelled train images, feature dimension, C scale,
# iteration cap or None for the classifier's own). logreg and linsvm stream the features
# (convae.probe.linear): scikit-learn's LogisticRegression objective and LinearSVM's, with the
# standardization folded into the weights, so the probe holds no standardized copy of the
# features and the fit reads them in place (float16 too): CIFAR-10's 100,000 x 12,800 train
# features took 17.9 GB through StandardScaler and scikit-learn's lbfgs, which copy them twice.
CLASSIFIERS: dict[str, Callable[[int, int, int, float, int | None], BaseEstimator]] = {
    "logreg": lambda seed, n, dim, c, it: StreamingLogisticRegression(C=c * logreg_c(dim), max_iter=it or 300),
    "linsvm": lambda seed, n, dim, c, it: StreamingLinearSVM(C=c * linsvm_c(dim), max_iter=it or 1000),
    "rbfsvm": lambda seed, n, dim, c, it: SVC(kernel="rbf", C=10.0 * c),
    "rf": lambda seed, n, dim, c, it: RandomForestClassifier(n_estimators=200, random_state=seed),
    "knn": lambda seed, n, dim, c, it: KNeighborsClassifier(n_neighbors=min(5, n)),
    "mlp": lambda seed, n, dim, c, it: MLPClassifier(
        hidden_layer_sizes=(256,), alpha=1e-3, max_iter=it or 300, random_state=seed
    ),
}

if tuple(CLASSIFIERS) != CLASSIFIER_NAMES:  # the option check knows the names without importing this
    raise ImportError("convae.probe: CLASSIFIERS and options.CLASSIFIER_NAMES disagree")
