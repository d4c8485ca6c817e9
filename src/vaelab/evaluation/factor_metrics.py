"""Disentanglement metrics of a representation against ground-truth factors, as plain functions
of (codes, factors) with the sample counts as arguments (vaelab.evaluation.disentanglement runs
them under a protocol).

All follow disentanglement_lib (Locatello et al. 2019), on the posterior means of images whose
discrete factors are known (data=dsprites, dsprites_like), with its default protocol
(`Protocol`):

- MIG (Chen et al. 2018): codes discretised into 20-bin histograms per dimension; MI(z_d; v_k)
  between every dimension and factor; per factor the gap between the two most informative
  dimensions over the factor's entropy, averaged. `mi_matrix` (normalised by the factors'
  entropies) is what the heat map shows.
- DCI (Eastwood & Williams 2018): per factor a classifier from the code (gradient-boosted trees:
  scikit-learn's, or the same boosting with LightGBM's histogram trees, the default; or an L1
  logistic regression: `dci_model`) gives the importance R[d, k] of each dimension;
  disentanglement is 1 - the entropy (base K) of each dimension's importances over the factors,
  weighted by the dimension's share of all importance; completeness 1 - the entropy (base D) of
  each factor's importances over the dimensions, averaged; informativeness the classifiers'
  test accuracy, averaged.
- SAP (Kumar et al. 2018): a linear SVM per (dimension, factor) on that one dimension; per
  factor the gap between the two best test accuracies, averaged. An uninformative dimension
  scores chance, not 0, so a perfect code's SAP is below 1 (1/2 for balanced binary factors),
  and a one-dimensional linear classifier cannot separate the middle values of a factor with
  many (dSprites' positions), which keeps SAP small on such data.
- beta-VAE score (Higgins et al. 2017): for pairs of images sharing one factor, the mean
  absolute difference of their codes over a batch of 64 pairs; a logistic regression's
  accuracy at telling which factor was shared (evaluation points).
- FactorVAE score (Kim & Mnih 2018): codes divided by their standard deviation; with one factor
  fixed over a batch of 64 images, the dimension of least variance votes for that factor; a
  majority-vote classifier's accuracy on evaluation votes. Dimensions whose variance is 0 are
  left out.

The codes of the images a score draws come from `codes_of(factor_indices)` (for a full factor
grid, one encoding pass over the grid and then indexing: `encode_grid`). Scores are in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

#: factor indices (n, F) -> codes (n, D)
CodesOf = Callable[[Tensor], Tensor]


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x)


def discretize(codes: np.ndarray, bins: int) -> np.ndarray:
    """Each dimension into `bins` equal-width bins of its own range (disentanglement_lib's
    histogram discretisation), (N, D) int."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], bins)[1]
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def mutual_information(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """MI (nats) between discrete codes (N, D) and factors (N, F): (D, F)."""
    from sklearn.metrics import mutual_info_score

    return np.array(
        [
            [mutual_info_score(factors[:, f], codes[:, d]) for f in range(factors.shape[1])]
            for d in range(codes.shape[1])
        ]
    )


def entropy(factors: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each discrete factor (N, F): (F,)."""
    out = []
    for f in range(factors.shape[1]):
        p = np.unique(factors[:, f], return_counts=True)[1] / len(factors)
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


def mig(codes, factors, bins: int = 20) -> dict:
    """Mutual information gap and the (D, F) MI matrix normalised by the factors' entropies."""
    codes, factors = _np(codes), _np(factors).astype(np.int64)
    mi = mutual_information(discretize(codes, bins), factors)
    h = entropy(factors)
    normalised = np.divide(mi, h[None, :], out=np.zeros_like(mi), where=h[None, :] > 0)
    top = np.sort(normalised, axis=0)[::-1]
    gaps = top[0] - (top[1] if len(top) > 1 else 0)
    return dict(mig=float(gaps[h > 0].mean()) if (h > 0).any() else 0.0, mi_matrix=normalised)


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (base `base`) of each row of non-negative weights (normalised per row)."""
    total = p.sum(1, keepdims=True)
    q = np.divide(p, total, out=np.full_like(p, 1 / p.shape[1]), where=total > 0)
    logs = np.log(q, out=np.zeros_like(q), where=q > 0)
    return -(q * logs).sum(1) / math.log(base) if base > 1 else np.zeros(len(p))


def dci(train_codes, train_factors, test_codes, test_factors, model: str = "gbt", seed=0) -> dict:
    """DCI disentanglement, completeness, informativeness and the (D, F) importance matrix."""
    x_train, x_test = _np(train_codes), _np(test_codes)
    y_train, y_test = _np(train_factors).astype(int), _np(test_factors).astype(int)
    d, f = x_train.shape[1], y_train.shape[1]
    importance = np.zeros((d, f))
    accuracy = []
    for k in range(f):
        if len(np.unique(y_train[:, k])) < 2:  # a constant factor: nothing to predict
            continue
        classifier = _dci_classifier(model, seed)
        classifier.fit(x_train, y_train[:, k])
        if model in ("gbt", "lgbm"):  # each sums to 1 (0 where no split was made)
            importance[:, k] = np.abs(classifier.feature_importances_)
        else:
            importance[:, k] = np.abs(classifier.coef_).sum(0)
        accuracy.append(float((classifier.predict(x_test) == y_test[:, k]).mean()))
    per_dim = 1 - _entropy_rows(importance, f)
    weights = importance.sum(1) / importance.sum() if importance.sum() > 0 else np.zeros(d)
    completeness = 1 - _entropy_rows(importance.T, d)
    active = importance.sum(0) > 0
    return dict(
        dci_disentanglement=float((weights * per_dim).sum()),
        dci_completeness=float(completeness[active].mean()) if active.any() else 0.0,
        dci_informativeness=float(np.mean(accuracy)) if accuracy else 0.0,
        importance_matrix=importance,
    )


def _dci_classifier(model: str, seed: int):
    if model == "gbt":
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(random_state=seed)
    if model == "lgbm":
        # the same boosting (stages, least-squares trees on the log-loss gradient, Newton leaf
        # steps, total-gain importances), its trees grown by LightGBM's histogram learner:
        # vaelab.evaluation.boosting; docs/disentanglement.md has the check against "gbt"
        from vaelab.evaluation.boosting import GradientBoostingClassifier

        return GradientBoostingClassifier(seed=seed)
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    class Lasso:
        """L1 logistic regression on standardised codes; coef_ in the codes' units."""

        def __init__(self) -> None:
            self.pipe = make_pipeline(StandardScaler(), l1_logistic_regression())

        def fit(self, x, y):
            self.pipe.fit(x, y)
            self.coef_ = self.pipe[-1].coef_
            return self

        def predict(self, x):
            return self.pipe.predict(x)

    return Lasso()


def l1_logistic_regression():
    """LogisticRegression with an L1 penalty: `l1_ratio=1` where scikit-learn has deprecated
    `penalty` (1.8+), `penalty="l1"` before."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, C=0.1, solver="saga", max_iter=300)
    return LogisticRegression(penalty="l1", C=0.1, solver="saga", max_iter=300)


def sap(train_codes, train_factors, test_codes, test_factors) -> dict:
    """SAP score and its (D, F) score matrix (test accuracy of one-dimension linear SVMs)."""
    from sklearn.svm import LinearSVC

    x_train, x_test = _np(train_codes), _np(test_codes)
    y_train, y_test = _np(train_factors).astype(int), _np(test_factors).astype(int)
    d, f = x_train.shape[1], y_train.shape[1]
    scores = np.zeros((d, f))
    for i in range(d):
        feature_train, feature_test = x_train[:, i : i + 1], x_test[:, i : i + 1]
        for k in range(f):
            if len(np.unique(y_train[:, k])) < 2 or np.ptp(feature_train) == 0:
                continue  # a constant dimension (or factor) predicts nothing
            svm = LinearSVC(C=0.01, class_weight="balanced")
            svm.fit(feature_train, y_train[:, k])
            scores[i, k] = float((svm.predict(feature_test) == y_test[:, k]).mean())
    top = np.sort(scores, axis=0)[::-1]
    gaps = top[0] - (top[1] if d > 1 else 0)
    return dict(sap=float(gaps.mean()), sap_matrix=scores)


def _fixed_factor_batch(
    sizes: tuple[int, ...], factor: int, n: int, generator: torch.Generator
) -> Tensor:
    """n factor vectors drawn uniformly, all sharing one random value of `factor`."""
    columns = [torch.randint(s, (n,), generator=generator) for s in sizes]
    columns[factor] = torch.full((n,), int(torch.randint(sizes[factor], (1,), generator=generator)))
    return torch.stack(columns, 1)


def beta_vae_score(
    codes_of: CodesOf, sizes, n_train: int, n_eval: int, batch: int = 64, seed: int = 0
) -> dict:
    """Higgins et al. (2017): logistic regression's accuracy at naming the shared factor."""
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(seed)
    sizes = tuple(sizes)
    varying = [f for f, s in enumerate(sizes) if s > 1]

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for _ in range(n):
            k = varying[int(torch.randint(len(varying), (1,), generator=generator))]
            first = _fixed_factor_batch(sizes, k, batch, generator)
            second = torch.stack(
                [torch.randint(s, (batch,), generator=generator) for s in sizes], 1
            )
            second[:, k] = first[:, k]
            features.append(_np((codes_of(first) - codes_of(second)).abs().mean(0)))
            labels.append(k)
        return np.stack(features), np.array(labels)

    x_train, y_train = points(n_train)
    x_eval, y_eval = points(n_eval)
    if len(np.unique(y_train)) < 2:
        return dict(beta_vae_score=1.0)
    classifier = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train)
    return dict(beta_vae_score=float((classifier.predict(x_eval) == y_eval).mean()))


def factor_vae_score(
    codes_of: CodesOf,
    sizes,
    n_train: int,
    n_eval: int,
    batch: int = 64,
    variance_points: int = 10000,
    seed: int = 0,
) -> dict:
    """Kim & Mnih (2018): a majority-vote classifier from the least-variance dimension."""
    generator = torch.Generator().manual_seed(seed)
    sizes = tuple(sizes)
    reference = torch.stack(
        [torch.randint(s, (variance_points,), generator=generator) for s in sizes], 1
    )
    scale = codes_of(reference).double().var(0)
    active = scale > 0
    if not active.any():
        return dict(factor_vae_score=0.0)
    varying = [f for f, s in enumerate(sizes) if s > 1]

    def votes(n: int) -> np.ndarray:
        table = np.zeros((int(active.sum()), len(sizes)), dtype=np.int64)
        for _ in range(n):
            k = varying[int(torch.randint(len(varying), (1,), generator=generator))]
            codes = codes_of(_fixed_factor_batch(sizes, k, batch, generator)).double()
            local = (codes[:, active] / scale[active].sqrt()).var(0)
            table[int(torch.argmin(local)), k] += 1
        return table

    train, evaluation = votes(n_train), votes(n_eval)
    choice = train.argmax(1)  # each dimension's factor
    correct = evaluation[np.arange(len(choice)), choice].sum()
    return dict(factor_vae_score=float(correct / max(1, evaluation.sum())))
