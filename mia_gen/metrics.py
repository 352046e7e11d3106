"""Membership inference metrics: ROC, AUC, ASR, TPR at low FPR, and bootstrap intervals.

Conventions (DESIGN.md "Metrics"): labels are 1 = member, 0 = non-member; a higher score
means "more likely a member". TPR at FPR <= alpha is the largest TPR among ROC points whose
FPR is at most alpha (not the point closest to alpha, as some reference code reports).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from mia_gen.errors import MiaGenError
from mia_gen.groups import group_labels

__all__ = [
    "UnresolvableMetricWarning",
    "asr",
    "auc",
    "bootstrap_ci",
    "calibrated_sign",
    "evaluate_scores",
    "fpr_is_resolvable",
    "roc_points",
    "tpr_at_fpr",
]

# Bound on the elements of one bootstrap chunk's work arrays (about 32 MB of int64 each).
_CHUNK_ELEMENTS = 4_000_000


class UnresolvableMetricWarning(UserWarning):
    """A TPR at FPR <= alpha was asked for with fewer than 1/alpha non-members."""


def _validate(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert inputs.

    Args:
        labels: array-like of shape `(N,)`, values in {0, 1} (bools allowed); 1 = member.
        scores: array-like of shape `(N,)`, finite floats; higher = more likely a member.

    Returns:
        `(labels, scores)` as `int64` and `float64` numpy arrays of shape `(N,)`.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise MiaGenError(
            f"labels and scores must be 1-D arrays of the same length; got shapes "
            f"{labels.shape} and {scores.shape}. Pass one label (1 = member, 0 = non-member) "
            "and one score per record."
        )
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    unexpected = ~np.isin(labels, (0, 1))
    if unexpected.any():
        raise MiaGenError(
            f"labels must be 1 (member) or 0 (non-member); found {int(unexpected.sum())} other "
            f"value(s), e.g. {labels[unexpected][:5].tolist()}. Map your labels to 0/1 first."
        )
    labels = labels.astype(np.int64)
    n_members = int(labels.sum())
    n_non_members = labels.size - n_members
    if n_members == 0 or n_non_members == 0:
        raise MiaGenError(
            f"membership metrics need both classes; got {n_members} member(s) and "
            f"{n_non_members} non-member(s). Evaluate the attack on members AND non-members "
            "(check the split's `members` / `non_members` lists)."
        )
    not_finite = ~np.isfinite(scores)
    if not_finite.any():
        n_nan = int(np.isnan(scores).sum())
        n_inf = int(not_finite.sum()) - n_nan
        first = int(np.flatnonzero(not_finite)[0])
        raise MiaGenError(
            f"{int(not_finite.sum())} of {scores.size} scores are not finite ({n_nan} NaN, "
            f"{n_inf} inf; first at index {first}). This is a bug in the attack or in its input "
            "(e.g. a diverged optimisation, an empty sample store, a division by zero); fix it "
            "there. Records are never dropped silently, because that would bias the metrics."
        )
    return labels, scores


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every point of the ROC curve (none dropped, so low-FPR points survive).

    Args:
        labels: shape `(N,)`, 1 = member, 0 = non-member; both classes present.
        scores: shape `(N,)`, finite; higher = more likely a member.

    Returns:
        `(fpr, tpr, thresholds)`, each of shape `(P,)` with `P = n_distinct_scores + 1`;
        fpr and tpr in [0, 1], non-decreasing, starting at (0, 0) (threshold `inf`).
    """
    labels, scores = _validate(labels, scores)
    return roc_curve(labels, scores, drop_intermediate=False)


def auc(labels, scores) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`), in [0, 1]; 0.5 = chance."""
    labels, scores = _validate(labels, scores)
    return float(roc_auc_score(labels, scores))


def calibrated_sign(labels, scores) -> int:
    """The score direction learnt on labelled calibration records: -1 when their AUC is below 0.5
    (the attack's scores run the wrong way), else +1 (a tie keeps the declared direction).

    Args:
        labels: shape `(K,)` of the calibration records, 1 = member, 0 = non-member.
        scores: shape `(K,)`, the attack's declared scores of those records.
    """
    return -1 if auc(labels, scores) < 0.5 else 1


def asr(labels, scores) -> float:
    """Attack success rate: the best balanced accuracy `(tpr + 1 - fpr) / 2` over thresholds.

    In [0.5, 1]: the threshold above every score (call everything a non-member) gives 0.5.
    """
    fpr, tpr, _ = roc_points(labels, scores)
    return float(_asr_from_curve(fpr, tpr))


def tpr_at_fpr(labels, scores, alpha: float) -> float:
    """The largest TPR among ROC points with FPR <= alpha, in [0, 1].

    With fewer than `1 / alpha` non-members, the only such point may be FPR = 0: the value
    is then a TPR at zero false positives, not at alpha (`evaluate_scores` warns about it).
    """
    _check_alpha(alpha)
    fpr, tpr, _ = roc_points(labels, scores)
    return float(_tpr_at_fpr_from_curve(fpr, tpr, alpha))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise MiaGenError(
            f"alpha (the FPR bound of tpr_at_fpr) must be in (0, 1); got {alpha}. "
            "Use e.g. 0.1, 0.01, 0.001."
        )


# Metrics read off ROC curves given as arrays `(..., P)` whose last axis walks the curve from
# (0, 0) to (1, 1); the leading axes batch bootstrap resamples.


def _auc_from_curve(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    # Trapezoids over every point: equal to the Mann-Whitney U / (n_pos n_neg), ties counted 1/2.
    return np.sum(np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]), axis=-1) / 2.0


def _asr_from_curve(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    return np.max((tpr + 1.0 - fpr) / 2.0, axis=-1)


def _tpr_at_fpr_from_curve(fpr: np.ndarray, tpr: np.ndarray, alpha: float) -> np.ndarray:
    # The curve starts at (0, 0), so at least one point qualifies and the max is well defined.
    return np.max(np.where(fpr <= alpha, tpr, 0.0), axis=-1)


CurveMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _curve_metric(name: str) -> CurveMetric:
    """Resolve `"auc"`, `"asr"` or `"tpr_at_fpr@<alpha>"` to a batched curve metric."""
    if name == "auc":
        return _auc_from_curve
    if name == "asr":
        return _asr_from_curve
    if name.startswith("tpr_at_fpr@"):
        try:
            alpha = float(name.split("@", 1)[1])
        except ValueError:
            alpha = float("nan")
        _check_alpha(alpha)
        return lambda fpr, tpr: _tpr_at_fpr_from_curve(fpr, tpr, alpha)
    raise MiaGenError(
        f"Unknown metric '{name}'. Use 'auc', 'asr', 'tpr_at_fpr@<alpha>' (e.g. "
        "'tpr_at_fpr@0.01'), or pass a function (labels, scores) -> float."
    )


def _resampled_indices(
    n_members: int, n_non_members: int, n_bootstrap: int, seed: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified bootstrap draws, chunk by chunk.

    Yields `(member_idx, non_member_idx)` of shapes `(b, n_members)` and `(b, n_non_members)`
    (b <= chunk, summing to n_bootstrap): indices into the members and into the non-members,
    drawn with replacement. The stream depends only on the sizes, `seed` and `chunk`.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        yield rng.integers(0, n_members, (b, n_members)), rng.integers(0, n_non_members, (b, n_non_members))


def _chunk_size(n_records: int, n_distinct: int, n_bootstrap: int) -> int:
    return max(1, min(n_bootstrap, _CHUNK_ELEMENTS // (n_records + n_distinct + 1)))


def _bootstrap_curve_values(
    labels: np.ndarray,
    scores: np.ndarray,
    metrics: Mapping[str, CurveMetric],
    n_bootstrap: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Each curve metric on `n_bootstrap` stratified resamples, all metrics on the same ones.

    Vectorised: a resample is a count per original record, so its ROC curve is a cumulative
    sum of per-distinct-score counts (distinct scores sorted from high to low).

    Returns:
        `{name: values}` with values of shape `(n_bootstrap,)`.
    """
    distinct, group = np.unique(-scores, return_inverse=True)  # group 0 = highest score
    n_distinct = distinct.size
    member_group, non_member_group = group[labels == 1], group[labels == 0]
    n_members, n_non_members = member_group.size, non_member_group.size
    chunk = _chunk_size(scores.size, n_distinct, n_bootstrap)
    values: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for member_idx, non_member_idx in _resampled_indices(n_members, n_non_members, n_bootstrap, seed, chunk):
        rows = np.arange(member_idx.shape[0])[:, None] * n_distinct
        curves = []
        classes = ((member_idx, member_group, n_members), (non_member_idx, non_member_group, n_non_members))
        for idx, groups, n in classes:
            counts = np.bincount((rows + groups[idx]).ravel(), minlength=rows.size * n_distinct)
            cumulative = np.cumsum(counts.reshape(-1, n_distinct), axis=1) / n
            curves.append(np.concatenate([np.zeros((cumulative.shape[0], 1)), cumulative], axis=1))
        tpr, fpr = curves
        for name, metric in metrics.items():
            values[name].append(metric(fpr, tpr))
    return {name: np.concatenate(parts) for name, parts in values.items()}


def _percentile_interval(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def _check_bootstrap_args(n_bootstrap: int, level: float) -> None:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        raise MiaGenError(f"n_bootstrap must be a positive integer; got {n_bootstrap}. 1000 is usual.")
    if not 0.0 < level < 1.0:
        raise MiaGenError(f"level must be in (0, 1); got {level}. Use 0.95 for a 95% interval.")


def bootstrap_ci(
    labels,
    scores,
    metric: str | Callable[[np.ndarray, np.ndarray], float],
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap interval of a metric, resampling members and non-members separately.

    Stratifying keeps both class sizes fixed, so every resample has both classes and the
    FPR resolution (1 / n_non_members) of the original evaluation.

    Args:
        labels: shape `(N,)`, 1 = member, 0 = non-member.
        scores: shape `(N,)`, finite; higher = more likely a member.
        metric: `"auc"`, `"asr"` or `"tpr_at_fpr@<alpha>"` (vectorised over resamples), or a
            function `(labels, scores) -> float`, called once per resample.
        n_bootstrap: number of resamples.
        level: coverage of the interval, in (0, 1).
        seed: the resamples depend only on the class sizes and the seed.

    Returns:
        `[lo, hi]`: the `(1 - level) / 2` and `(1 + level) / 2` quantiles of the metric.
    """
    labels, scores = _validate(labels, scores)
    _check_bootstrap_args(n_bootstrap, level)
    if isinstance(metric, str):
        values = _bootstrap_curve_values(labels, scores, {metric: _curve_metric(metric)}, n_bootstrap, seed)
        return _percentile_interval(values[metric], level)
    member_scores, non_member_scores = scores[labels == 1], scores[labels == 0]
    n_members, n_non_members = member_scores.size, non_member_scores.size
    resampled_labels = np.r_[np.ones(n_members, np.int64), np.zeros(n_non_members, np.int64)]
    # Same draws as the vectorised path (same chunking), so both give the same interval.
    chunk = _chunk_size(scores.size, np.unique(scores).size, n_bootstrap)
    values = [
        float(metric(resampled_labels, np.concatenate([member_scores[m], non_member_scores[n]])))
        for member_idx, non_member_idx in _resampled_indices(n_members, n_non_members, n_bootstrap, seed, chunk)
        for m, n in zip(member_idx, non_member_idx)
    ]
    return _percentile_interval(np.asarray(values), level)


def fpr_is_resolvable(alpha: float, n_non_members: int) -> bool:
    """Whether n_non_members (>= 1/alpha) can show an FPR as small as alpha other than 0."""
    return n_non_members * alpha >= 1.0 - 1e-9  # tolerance: 1000 * 0.001 may round below 1


def _unresolvable_warning(alpha: float, n_non_members: int) -> str | None:
    if fpr_is_resolvable(alpha, n_non_members):
        return None
    return (
        f"TPR@FPR<={alpha}: only {n_non_members} non-members (fewer than 1/alpha = "
        f"{math.ceil(1 / alpha - 1e-9)}), so the smallest non-zero FPR is 1/{n_non_members} = "
        f"{1 / n_non_members:.3g} > {alpha}; the value is the TPR at zero false positives and "
        f"is not resolvable at this alpha. Evaluate on at least {math.ceil(1 / alpha - 1e-9)} "
        "non-members to report it."
    )


def evaluate_scores(
    labels,
    scores,
    alphas: Sequence[float] = (0.1, 0.01, 0.001),
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """All metrics of one attack's scores, with stratified bootstrap 95% intervals.

    Args:
        labels: shape `(N,)`, 1 = member, 0 = non-member; both classes present.
        scores: shape `(N,)`, finite; higher = more likely a member.
        alphas: FPR bounds for `tpr_at_fpr`, each in (0, 1).
        n_bootstrap: resamples for the intervals; 0 skips them (every interval is `None`).
        seed: bootstrap seed; the result is deterministic for a given seed.

    Returns:
        A JSON-serialisable dict: `{"auc", "asr", "tpr_at_fpr": {str(alpha): ...}, "ci95":
        {"auc": [lo, hi], "asr": [lo, hi], "tpr_at_fpr": {str(alpha): [lo, hi]}},
        "n_members", "n_non_members", "warnings": [str, ...]}`. A warning (also emitted as
        `UnresolvableMetricWarning`) is added for each alpha with fewer than 1/alpha non-members.
    """
    labels, scores = _validate(labels, scores)
    for alpha in alphas:
        _check_alpha(alpha)
    n_members = int(labels.sum())
    n_non_members = int(labels.size - n_members)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    keys = {str(alpha): alpha for alpha in alphas}

    curve_metrics: dict[str, CurveMetric] = {"auc": _auc_from_curve, "asr": _asr_from_curve}
    for key, alpha in keys.items():
        curve_metrics[key] = lambda f, t, alpha=alpha: _tpr_at_fpr_from_curve(f, t, alpha)
    if n_bootstrap:
        _check_bootstrap_args(n_bootstrap, 0.95)
        samples = _bootstrap_curve_values(labels, scores, curve_metrics, n_bootstrap, seed)
        ci = {name: _percentile_interval(values, 0.95) for name, values in samples.items()}
    else:
        ci = dict.fromkeys(curve_metrics)

    messages = [m for m in (_unresolvable_warning(a, n_non_members) for a in alphas) if m is not None]
    for message in messages:
        warnings.warn(message, UnresolvableMetricWarning, stacklevel=2)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "asr": float(_asr_from_curve(fpr, tpr)),
        "tpr_at_fpr": {key: float(_tpr_at_fpr_from_curve(fpr, tpr, a)) for key, a in keys.items()},
        "ci95": {"auc": ci["auc"], "asr": ci["asr"], "tpr_at_fpr": {key: ci[key] for key in keys}},
        "n_members": n_members,
        "n_non_members": n_non_members,
        "warnings": messages,
    }


def group_auc(labels, groups, group_scores) -> float:
    """AUC of deciding groups of records jointly (co-membership, Liu et al. ICDM'19).

    labels (`(Q,)`, 1 = member): the queries' membership. groups (`(G, n)`): positions into the queries,
    each group all members or all non-members (`mia_gen.groups.draw_groups`). group_scores (`(G,)`):
    one score per group, higher = "all n are members".
    """
    return auc(group_labels(groups, labels), np.asarray(group_scores, dtype=np.float64))
