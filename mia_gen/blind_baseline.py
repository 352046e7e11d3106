"""The blind baseline: can members be told from non-members without the model at all?

A diagnostic of the split, not an attack (DESIGN.md "Blind baseline"). If a classifier that
never sees the model separates members from non-members by the records alone, the two sets
come from different distributions (e.g. members are digits 0-4, non-members 5-9; or
LAION-mi-style member / non-member images from different sources), and every attack AUC
measured on that split mixes membership leakage with that shift: it overstates leakage.

The classifier is logistic regression on the leading principal components of the flattened
records (standardised first for tabular records), fitted under stratified k-fold
cross-validation: every record is scored by a model that never saw it, so the out-of-fold
AUC is an honest estimate, and it may use the membership labels.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mia_gen.errors import MiaGenError
from mia_gen.metrics import auc, bootstrap_ci

__all__ = ["METHOD", "blind_baseline", "out_of_fold_scores"]

METHOD = "logistic regression on PCA of the records, stratified {k}-fold out-of-fold scores"


def out_of_fold_scores(
    records: torch.Tensor, labels: np.ndarray, seed: int, n_folds: int = 5, n_components: int = 32
) -> np.ndarray:
    """Each record's member-vs-non-member score from a classifier fitted on the other folds.

    Args:
        records: `(N, ...)` float tensor: images `(N, C, H, W)` in [-1, 1] (flattened, not
            standardised: pixels share one scale) or tabular rows `(N, D)` (standardised per column).
        labels: `(N,)`, 1 = member, 0 = non-member.
        seed: seeds the fold assignment; the scores are deterministic given it.
        n_folds: folds of the stratified k-fold (at most the size of the smaller class).
        n_components: principal components kept (fewer when a training fold is smaller).

    Returns:
        `(N,)` float64 scores, higher = more member-like (logistic regression's decision value).
    """
    labels = np.asarray(labels).astype(np.int64)
    records = torch.as_tensor(records)
    # float32: 50,000 CIFAR-10 records take 0.6 GB, not 1.2.
    features = records.detach().cpu().reshape(len(records), -1).float().numpy()
    if features.shape[0] != labels.shape[0]:
        raise MiaGenError(f"blind baseline: {features.shape[0]} records but {labels.shape[0]} labels; "
                          "give one label (1 = member, 0 = non-member) per record.")
    smaller = int(min(labels.sum(), labels.size - labels.sum()))
    if smaller < 2:
        raise MiaGenError(f"blind baseline: the smaller class has {smaller} record(s); cross-validation needs "
                          "at least 2 members and 2 non-members (raise split.n_members / n_non_members, or set "
                          "evaluation.blind_baseline=false).")
    folds = StratifiedKFold(n_splits=min(n_folds, smaller), shuffle=True, random_state=int(seed))
    scores = np.empty(labels.size, dtype=np.float64)
    # Small fits: BLAS threads only contend (about 10x slower on a busy 2-core machine).
    with threadpool_limits(limits=1):
        for train, test in folds.split(features, labels):
            classifier = _fitted(features[train], labels[train], records.ndim > 2, n_components, seed)
            scores[test] = classifier.decision_function(features[test])
    return scores


def _fitted(features: np.ndarray, labels: np.ndarray, images: bool, n_components: int, seed: int):
    """PCA (after per-column standardising for tabular rows) then balanced logistic regression."""
    components = max(1, min(n_components, len(features) - 1, features.shape[1]))
    steps = [] if images else [StandardScaler()]
    # Balanced weights: 64 members against 256 non-members must not tilt the fit.
    classifier = make_pipeline(*steps, PCA(n_components=components, random_state=int(seed)),
                               LogisticRegression(class_weight="balanced", max_iter=2000))
    return classifier.fit(features, labels)


def blind_baseline(
    records: torch.Tensor, labels: np.ndarray, seed: int, n_bootstrap: int = 1000, n_folds: int = 5,
    n_components: int = 32,
) -> dict:
    """AUC of telling members from non-members by the records alone, with its bootstrap 95% interval.

    Args:
        records: `(N, ...)` the evaluated records (see `out_of_fold_scores`).
        labels: `(N,)`, 1 = member, 0 = non-member.
        seed: seeds the folds and the bootstrap.
        n_bootstrap: resamples of the interval (`metrics.bootstrap_ci`, stratified).

    Returns:
        `{"method", "auc", "ci95": [lo, hi], "shifted", "message"}`. `shifted` is True when the
        interval lies above 0.5. An interval below 0.5 is not taken as a shift: a classifier
        cannot truly do worse than chance, and pooled out-of-fold scores of a null split often
        land a little under 0.5 (each fold's fit shifts its scores differently).
    """
    labels = np.asarray(labels).astype(np.int64)
    scores = out_of_fold_scores(records, labels, seed, n_folds=n_folds, n_components=n_components)
    value = auc(labels, scores)
    lo, hi = bootstrap_ci(labels, scores, "auc", n_bootstrap=n_bootstrap, seed=int(seed))
    shifted = lo > 0.5
    if shifted:
        message = (f"DISTRIBUTION SHIFT: members can be told from non-members WITHOUT the model (blind baseline "
                   f"AUC {value:.3f} [{lo:.3f}, {hi:.3f}]). The split is distribution-shifted, so every attack "
                   "AUC here overstates membership leakage; draw members and non-members from the same "
                   "distribution (e.g. a random split of one dataset) before reading the attack numbers.")
    else:
        message = (f"Blind baseline AUC {value:.3f} [{lo:.3f}, {hi:.3f}]: members and non-members are not "
                   "distinguishable without the model (no distribution shift detected).")
    return {"method": METHOD.format(k=min(n_folds, int(min(labels.sum(), labels.size - labels.sum())))),
            "auc": value, "ci95": [lo, hi], "shifted": bool(shifted), "message": message}
