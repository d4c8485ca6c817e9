"""scikit-learn's gradient-boosted trees (the classifier disentanglement_lib's DCI uses), grown
by LightGBM's histogram-based tree learner: the same algorithm, about 60x faster here.

`GradientBoostingClassifier().fit(x, y)` with scikit-learn's defaults (Friedman 2001, as
`sklearn.ensemble.GradientBoostingClassifier` does it, read from its `_gb.py`):

- raw scores start at the log of the class frequencies;
- each of 100 stages fits one regression tree per class (one in all for two classes) of depth
  3 to the negative gradient of the log-loss, y_k - p_k, by least squares: a split's gain is the
  decrease of the squared error, n_l n_r / n (mean_l - mean_r)^2;
- each leaf's value is one Newton step, sum(y_k - p_k) / sum(p_k (1 - p_k)), times (K - 1) / K
  for K > 2 classes (scikit-learn keeps the factor), and the scores move by 0.1 times it;
- `feature_importances_`: each dimension's total gain over all trees, normalised to sum to 1.

LightGBM finds the splits: given gradients and unit hessians, its gain is exactly that
squared-error decrease, and its leaf values are replaced by the Newton steps above before the
next stage. What differs from scikit-learn is only where a split may fall (between LightGBM's
histogram bins, `max_bin` per dimension, instead of between any two sorted values) and ties.
LightGBM's own multiclass objective would weight the gains by the hessians p (1 - p) instead;
on cleanly separable codes that credits noise dimensions after the fit and moved DCI by 0.03.
"""

from __future__ import annotations

import numpy as np


class GradientBoostingClassifier:
    """Fit and predict as scikit-learn's, with `feature_importances_` (see the module)."""

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        max_depth: int = 3,
        max_bin: int = 1023,
        seed: int = 0,
    ) -> None:
        self.n_estimators, self.learning_rate = n_estimators, learning_rate
        self.max_depth, self.max_bin, self.seed = max_depth, max_bin, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> GradientBoostingClassifier:
        import lightgbm

        self.classes_, labels = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        trees = 1 if k == 2 else k  # trees per stage
        onehot = np.eye(k)[labels][:, 1:] if k == 2 else np.eye(k)[labels]
        prior = np.bincount(labels, minlength=k) / len(labels)
        self.init_ = np.log(prior[1] / prior[0])[None] if k == 2 else np.log(prior)
        params = {
            "objective": "none",  # gradients from `fit`, unit hessians: least-squares splits
            "num_class": trees,
            "max_depth": self.max_depth,
            "num_leaves": 2**self.max_depth,
            "learning_rate": 1.0,  # the leaf values are set below, shrinkage included
            "min_data_in_leaf": 1,
            "min_sum_hessian_in_leaf": 0.0,
            "lambda_l2": 0.0,
            "max_bin": self.max_bin,
            "min_data_in_bin": 1,
            "feature_pre_filter": False,
            "boost_from_average": False,
            "seed": self.seed,
            "deterministic": True,
            "verbosity": -1,
        }
        self.booster_ = None
        if not (x.max(0) > x.min(0)).any():  # nothing to split on: the prior, no importance
            self.feature_importances_ = np.zeros(x.shape[1])
            return self
        binning = {"max_bin": self.max_bin, "min_data_in_bin": 1, "feature_pre_filter": False}
        data = lightgbm.Dataset(x, free_raw_data=False, params=binning)
        booster = lightgbm.Booster(params, data)
        scores = np.tile(self.init_, (len(x), 1))
        for stage in range(self.n_estimators):
            p = _probabilities(scores)
            residual = onehot - p  # the negative gradient, (N, trees)
            gradient = -residual
            booster.update(fobj=lambda _scores, _data, g=gradient: (g, np.ones_like(g)))
            leaves = booster.predict(x, pred_leaf=True, start_iteration=stage, num_iteration=1)
            leaves = leaves.reshape(len(x), trees).astype(int)
            for c in range(trees):
                tree = stage * trees + c
                n_leaves = leaves[:, c].max() + 1
                numerator = np.bincount(leaves[:, c], residual[:, c], n_leaves)
                hessian = p[:, c] * (1 - p[:, c])
                denominator = np.bincount(leaves[:, c], hessian, n_leaves)
                factor = (k - 1) / k if k > 2 else 1.0
                step = np.where(
                    np.abs(denominator) < 1e-150,
                    0.0,
                    factor * numerator / np.where(denominator == 0, 1, denominator),
                )
                for leaf in range(n_leaves):
                    booster.set_leaf_output(tree, leaf, self.learning_rate * step[leaf])
                scores[:, c] += self.learning_rate * step[leaves[:, c]]
        gains = booster.feature_importance("gain").astype(float)
        self.feature_importances_ = gains / gains.sum() if gains.sum() > 0 else gains
        self.booster_ = booster
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.booster_ is None:  # constant inputs: the most frequent class
            return np.full(
                len(x),
                self.classes_[np.argmax(self.init_)]
                if len(self.init_) > 1
                else self.classes_[int(self.init_[0] > 0)],
            )
        raw = self.booster_.predict(x, raw_score=True).reshape(len(x), -1) + self.init_
        if raw.shape[1] == 1:
            return self.classes_[(raw[:, 0] > 0).astype(int)]
        return self.classes_[raw.argmax(1)]


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """(N, 1) log-odds -> P(class 1); (N, K) raw scores -> softmax."""
    if scores.shape[1] == 1:
        return 1 / (1 + np.exp(-scores))
    e = np.exp(scores - scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
