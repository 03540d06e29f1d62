"""Linear-probe accuracy: how linearly readable the labels are from frozen features.

The standard check of an unsupervised representation (Hjelm et al. 2019; Oord et al. 2018):
freeze the encoder, fit a multinomial logistic regression from its features to the labels
on the training split, report accuracy on the test split. Features are standardised first
(with the training split's mean and spread), so the score does not depend on the feature
scale an encoder happens to use — an untrained network's features may be ~10⁻³ in size,
and an unscaled L2 penalty would then judge the scale, not the information.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = ["linear_probe_accuracy"]


def _array(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def linear_probe_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    C: float = 1.0,
    max_iter: int = 5000,
) -> float:
    """Test accuracy of a logistic regression fitted on standardised frozen features.

    :param train_features: ``(N, F)`` features of the training split (tensor or array).
    :param train_labels: ``(N,)`` integer labels.
    :param test_features: ``(M, F)`` features of the test split, same encoder.
    :param test_labels: ``(M,)`` integer labels.
    :param float C: inverse L2 strength of scikit-learn's ``LogisticRegression`` (lbfgs,
        deterministic).
    :param int max_iter: iteration cap of the solver.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = _array(train_features), _array(train_labels)
    xte, yte = _array(test_features), _array(test_labels)
    for what, f, y in (("train", xtr, ytr), ("test", xte, yte)):
        if f.ndim != 2 or y.ndim != 1 or len(f) != len(y) or len(f) == 0:
            raise InputError(
                f"linear_probe_accuracy: {what} features must be (N, F) with N = len(labels) "
                f"> 0, got features {f.shape} and labels {y.shape}"
            )
        if not np.isfinite(f).all():
            raise InputError(f"linear_probe_accuracy: {what} features contain NaN/inf")
    if xtr.shape[1] != xte.shape[1]:
        raise InputError(
            f"linear_probe_accuracy: train has {xtr.shape[1]} features, test {xte.shape[1]}"
        )
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(xtr), ytr)
    return float(clf.score(scaler.transform(xte), yte))
