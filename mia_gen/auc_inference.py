"""Inference on an AUC: its standard error, simultaneous intervals and the sample size that would decide.

- `delong_variance`: the variance of the empirical AUC (Mann-Whitney statistic) by DeLong, DeLong &
  Clarke-Pearson (Biometrics 1988), computed with midranks in O(N log N) (Sun & Xu, IEEE SPL 2014); ties
  count one half, as in `sklearn.metrics.roc_auc_score`.
- `hanley_mcneil_variance`: Hanley & McNeil (Radiology 1982), eq. 2, the variance at a given AUC under their
  exponential approximation; it needs no scores, so it also predicts the variance at other sample sizes.
- `normal_interval`: AUC +- z se, clipped to [0, 1]; `bonferroni_level`: the per-check confidence that gives
  a family of checks simultaneous confidence.
- `records_to_decide`: how many members and non-members (in the current ratio) would make an interval of
  the same confidence narrow enough to decide between the sides of a threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, rankdata

from mia_gen.errors import MiaGenError


def _classes(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise MiaGenError(f"labels and scores must be 1-D and aligned, got {labels.shape} and {scores.shape}.")
    if not np.isfinite(scores).all():
        raise MiaGenError("AUC inference needs finite scores; leave unscored records out (and count them).")
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if positives.size < 2 or negatives.size < 2:
        raise MiaGenError(f"AUC inference needs at least 2 members and 2 non-members, got {positives.size} and "
                          f"{negatives.size}.")
    return positives, negatives


def delong_auc_variance(labels, scores) -> tuple[float, float]:
    """(AUC, its DeLong variance) of scores `(N,)` (higher = member) against labels `(N,)` (1 member, 0 not).

    V10_i = P(Y < X_i) + P(Y = X_i) / 2 for member i over non-members Y, V01_j alike for non-member j;
    var = s^2(V10) / m + s^2(V01) / n (sample variances, ddof 1), m members and n non-members.
    """
    positives, negatives = _classes(labels, scores)
    m, n = positives.size, negatives.size
    everything = rankdata(np.concatenate([positives, negatives]))  # midranks: ties count one half
    within_positives, within_negatives = rankdata(positives), rankdata(negatives)
    v10 = (everything[:m] - within_positives) / n
    v01 = 1.0 - (everything[m:] - within_negatives) / m
    auc = float(v10.mean())
    return auc, float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


def hanley_mcneil_variance(auc: float, n_members: int, n_non_members: int) -> float:
    """Hanley & McNeil (1982), eq. 2: (A(1-A) + (m-1)(Q1 - A^2) + (n-1)(Q2 - A^2)) / (m n), with
    Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A); m members, n non-members."""
    a, m, n = float(auc), float(n_members), float(n_non_members)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    return max((a * (1.0 - a) + (m - 1.0) * (q1 - a * a) + (n - 1.0) * (q2 - a * a)) / (m * n), 0.0)


def bonferroni_level(confidence: float, n_checks: int) -> float:
    """The two-sided confidence of each of `n_checks` intervals that hold together with `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise MiaGenError(f"confidence must lie in (0, 1), got {confidence}.")
    if n_checks < 1:
        raise MiaGenError(f"a family needs at least one check, got {n_checks}.")
    return 1.0 - (1.0 - confidence) / n_checks


def normal_interval(estimate: float, variance: float, level: float) -> list[float]:
    """estimate +- z_{(1+level)/2} sqrt(variance), clipped to [0, 1]."""
    half = float(norm.ppf((1.0 + level) / 2.0)) * math.sqrt(max(variance, 0.0))
    return [max(0.0, estimate - half), min(1.0, estimate + half)]


def records_to_decide(auc: float, gap: float, n_members: int, n_non_members: int, level: float,
                      limit: float = 1e7) -> tuple[int, int] | None:
    """The fewest (members, non-members), scaled together from the current sizes, at which an interval of
    `level` around `auc` (Hanley-McNeil variance) has half-width below `gap`, the distance from `auc` to the
    threshold it must clear; None when the estimate sits on the threshold or more than `limit` x the
    records would be needed."""
    if not gap > 0:
        return None
    z = float(norm.ppf((1.0 + level) / 2.0))

    def narrow_enough(k: float) -> bool:
        return z * math.sqrt(hanley_mcneil_variance(auc, k * n_members, k * n_non_members)) < gap

    low, high = 1.0, 1.0
    while not narrow_enough(high):
        low, high = high, high * 2.0
        if high > limit:
            return None
    for _ in range(60):  # bisection on the scale factor
        middle = (low + high) / 2.0
        low, high = (low, middle) if narrow_enough(middle) else (middle, high)
    return math.ceil(high * n_members), math.ceil(high * n_non_members)
