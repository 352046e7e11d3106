"""The blind baseline: can members be told from non-members without the model at all?

A diagnostic of the split, not an attack (DESIGN.md "Blind baseline"). If a classifier that
never sees the model separates members from non-members by the records alone, the two sets
come from different distributions (e.g. members are digits 0-4, non-members 5-9; or
LAION-mi-style member / non-member images from different sources), and every attack AUC
measured on that split mixes membership leakage with that shift: it overstates leakage.

The classifier is a shrunk Fisher linear discriminant on the leading principal components of the
flattened records (tabular columns standardised first), fitted under stratified k-fold
cross-validation: every record is scored by a discriminant fitted without its label, so the
out-of-fold AUC may use the membership labels. The principal components are fitted once on all
evaluated records: they never see a label.

Whether the split is shifted is decided by a permutation test, not by the AUC's bootstrap interval:
pooled out-of-fold scores of a same-distribution split are not a sample of independent scores, and
the bootstrap interval was anti-conservative (2 of 12 random 64 / 256 splits of digits flagged at a
nominal 2.5%). The null distribution of the same out-of-fold AUC under shuffled labels calibrates
the test exactly: a random split is flagged with probability `ALPHA`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from mia_gen.errors import MiaGenError
from mia_gen.metrics import auc, bootstrap_ci

__all__ = ["ALPHA", "METHOD", "N_PERMUTATIONS", "blind_baseline", "out_of_fold_scores"]

METHOD = ("Fisher discriminant on {c} principal components of the records, stratified {k}-fold out-of-fold "
          "scores; shift decided by a {p}-permutation test at p < {a}")
ALPHA = 0.01  # the permutation test's level: the share of same-distribution splits flagged
N_PERMUTATIONS = 200  # shuffled-label replicates of the out-of-fold AUC (p-values from 1/201)
_SHRINKAGE = 1e-2  # ridge on the pooled covariance, relative to its mean eigenvalue


def _components(records, n_labels: int, n_components: int, seed: int) -> np.ndarray:
    """`(N, c)` float64 principal components of the flattened records (tabular rows `(N, D)` are
    standardised per column first, images share one scale); fitted without labels."""
    records = torch.as_tensor(records)
    # float32: 50,000 CIFAR-10 records take 0.6 GB, not 1.2.
    features = records.detach().cpu().reshape(len(records), -1).float().numpy()
    if features.shape[0] != n_labels:
        raise MiaGenError(f"blind baseline: {features.shape[0]} records but {n_labels} labels; "
                          "give one label (1 = member, 0 = non-member) per record.")
    if records.ndim <= 2:
        features = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    components = max(1, min(n_components, len(features) - 1, features.shape[1]))
    return PCA(n_components=components, random_state=int(seed)).fit_transform(features).astype(np.float64)


def _folds(labels: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    smaller = int(min(labels.sum(), labels.size - labels.sum()))
    if smaller < 2:
        raise MiaGenError(f"blind baseline: the smaller class has {smaller} record(s); cross-validation needs "
                          "at least 2 members and 2 non-members (raise split.n_members / n_non_members, or set "
                          "evaluation.blind_baseline=false).")
    folds = StratifiedKFold(n_splits=min(n_folds, smaller), shuffle=True, random_state=int(seed))
    return list(folds.split(np.zeros(labels.size), labels))


def _discriminant_scores(components: np.ndarray, labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Out-of-fold Fisher discriminant scores `(N,)`: w = (S + lambda I)^-1 (mu_1 - mu_0) from each
    training fold's class means and pooled within-class covariance S, applied to the held-out fold."""
    scores = np.empty(labels.size, dtype=np.float64)
    for train, test in _folds(labels, n_folds, seed):
        z, y = components[train], labels[train]
        means = [z[y == c].mean(0) for c in (0, 1)]
        centred = np.concatenate([z[y == c] - means[c] for c in (0, 1)])
        within = centred.T @ centred / max(len(z) - 2, 1)
        ridge = _SHRINKAGE * np.trace(within) / len(within) + 1e-12
        weights = np.linalg.solve(within + ridge * np.eye(len(within)), means[1] - means[0])
        scores[test] = components[test] @ weights
    return scores


def out_of_fold_scores(
    records: torch.Tensor, labels: np.ndarray, seed: int, n_folds: int = 5, n_components: int = 32
) -> np.ndarray:
    """Each record's member-vs-non-member score from a discriminant fitted on the other folds.

    Args:
        records: `(N, ...)` float: images `(N, C, H, W)` in [-1, 1] or tabular rows `(N, D)`.
        labels: `(N,)`, 1 = member, 0 = non-member.
        seed: seeds the fold assignment; the scores are deterministic given it.
        n_folds: folds of the stratified k-fold (at most the size of the smaller class).
        n_components: principal components kept (fewer when there are fewer records or features).

    Returns:
        `(N,)` float64 scores, higher = more member-like.
    """
    labels = np.asarray(labels).astype(np.int64)
    with threadpool_limits(limits=1):  # small problems: BLAS threads only contend
        components = _components(records, labels.size, n_components, seed)
        return _discriminant_scores(components, labels, n_folds, seed)


def blind_baseline(
    records: torch.Tensor, labels: np.ndarray, seed: int, n_bootstrap: int = 1000, n_folds: int = 5,
    n_components: int = 32, n_permutations: int = N_PERMUTATIONS, alpha: float = ALPHA,
) -> dict:
    """AUC of telling members from non-members by the records alone, its bootstrap 95% interval, and a
    permutation test of "no shift".

    Args:
        records: `(N, ...)` the evaluated records (see `out_of_fold_scores`).
        labels: `(N,)`, 1 = member, 0 = non-member.
        seed: seeds the folds, the bootstrap and the permutations.
        n_bootstrap: resamples of the interval (`metrics.bootstrap_ci`, stratified).
        n_permutations: shuffled-label replicates of the whole cross-validated AUC.
        alpha: the test's level; `shifted` when the permutation p-value is below it.

    Returns:
        `{"method", "auc", "ci95": [lo, hi], "p_value", "null_auc_95", "shifted", "message"}`:
        `null_auc_95` is the 95th percentile of the AUC under shuffled labels (what chance reaches here).
    """
    labels = np.asarray(labels).astype(np.int64)
    with threadpool_limits(limits=1):
        components = _components(records, labels.size, n_components, seed)
        scores = _discriminant_scores(components, labels, n_folds, seed)
        value = auc(labels, scores)
        rng = np.random.default_rng([int(seed), 11])
        null = np.array([auc(shuffled, _discriminant_scores(components, shuffled, n_folds, seed))
                         for shuffled in (rng.permutation(labels) for _ in range(int(n_permutations)))])
    lo, hi = bootstrap_ci(labels, scores, "auc", n_bootstrap=n_bootstrap, seed=int(seed))
    p_value = float((1 + np.sum(null >= value)) / (1 + len(null)))
    shifted = p_value < alpha
    summary = (f"blind baseline AUC {value:.3f} [{lo:.3f}, {hi:.3f}], permutation p = {p_value:.3g} "
               f"(chance reaches {np.percentile(null, 95):.3f} in 95% of shuffles)")
    if shifted:
        message = (f"DISTRIBUTION SHIFT: members can be told from non-members WITHOUT the model ({summary}). "
                   "The split is distribution-shifted, so every attack AUC here overstates membership leakage; "
                   "draw members and non-members from the same distribution (e.g. a random split of one "
                   "dataset) before reading the attack numbers.")
    else:
        message = (f"{summary[0].upper()}{summary[1:]}: members and non-members are not distinguishable without "
                   "the model (no distribution shift detected).")
    k = len(_folds(labels, n_folds, seed))
    return {"method": METHOD.format(c=components.shape[1], k=k, p=int(n_permutations), a=alpha),
            "auc": value, "ci95": [lo, hi], "p_value": p_value, "null_auc_95": float(np.percentile(null, 95)),
            "shifted": bool(shifted), "message": message}
