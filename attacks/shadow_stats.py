"""The scoring cores of the shadow-model attacks LiRA and RMIA: pure numpy on per-record statistics.

Inputs are a statistic per (model, record[, query]): the target model's `target` `(N[, Q])` and the
K shadow (reference) models' `shadows` `(K, N[, Q])`, with the zoo's IN/OUT matrix `membership`
`(K, N)` (`mia_gen.zoo`). Here a statistic is a loss or a distance (e.g. the denoising loss): a
member has a LOWER value. Every score is "higher = more likely a member" (DESIGN.md).

LiRA has two estimators. `estimator="reference"` (the default) computes what the paper's code
computes (tensorflow/privacy `research/mi_lira_2021/plot.py`, `generate_ours` and
`generate_ours_offline`): medians and np.std over the same number of shadows for every record, a
two-sided offline test. `estimator="unbiased"`: sample means, ddof=1 variances, a one-sided offline test.

A record that cannot be scored (no OUT shadow, no IN shadow online, one shadow on a side with
per-record variances) gets a NaN score and a reason (`ShadowScores.reasons`), and the call warns
with the counts (`UnscoredRecordsWarning`); no record is scored from a degenerate Gaussian.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from mia_gen.errors import MiaGenError

ESTIMATORS = ("reference", "unbiased")

# Variance floor of the "unbiased" estimator (squared units of the statistic): a record whose shadows
# agree exactly (a duplicated record, a perfectly memorised one) keeps a finite, very narrow Gaussian.
MIN_VARIANCE = 1e-12
# What the reference code adds to every standard deviation (plot.py: `std + 1e-30`).
REFERENCE_STD_EPSILON = 1e-30

# Below this spread (in log) across records, offline RMIA's Pr(x) is a constant: the correction does nothing.
CONSTANT_CORRECTION = 1e-9

NO_IN = "no IN shadow"
NO_OUT = "no OUT shadow"
ONE_IN = "one IN shadow: no per-record variance (use global_variance=True or more shadows)"
ONE_OUT = "one OUT shadow: no per-record variance (use global_variance=True or more shadows)"


class UnscoredRecordsWarning(UserWarning):
    """Some records were not scored (NaN); `ShadowScores.reasons` says why for each."""


@dataclass
class ShadowScores:
    """scores (`np.ndarray` `(N,)`, float64): higher = more likely a member; NaN where not scored.

    reasons (`np.ndarray` `(N,)` of str): "" for a scored record, else why it was not scored.
    """

    scores: np.ndarray
    reasons: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        """bool `(N,)`: the records that have a score."""
        return self.reasons == ""


# ---- LiRA ------------------------------------------------------------------------------------------
def lira_online(target: np.ndarray, shadows: np.ndarray, membership: np.ndarray, *,
                estimator: str = "reference", global_variance: bool = False,
                min_variance: float | None = None) -> ShadowScores:
    """LiRA online (Carlini et al., S&P'22, Algorithm 1 with the IN and OUT fits).

    For each record r and query q, Gaussians N(mu_in, s_in^2) and N(mu_out, s_out^2) are fitted to the
    shadows' statistic over the IN and the OUT shadows; the score is the log-likelihood ratio of the
    observed statistic `o = target[r, q]`, averaged over the Q queries (as the paper's code averages
    over augmentations):

        LLR = mean_q [ log N(o; mu_in, s_in^2) - log N(o; mu_out, s_out^2) ].

    It needs no sign convention: a member's loss is near mu_in whichever side mu_in lies.

    `estimator="reference"` (default) is `generate_ours` of the paper's code
    (tensorflow/privacy `research/mi_lira_2021/plot.py`): every record keeps its FIRST n_in IN shadows
    and first n_out OUT shadows in model order, n_in / n_out the smallest IN / OUT count over the
    records; mu = the median, s = np.std (ddof=0) + 1e-30 over those shadows. With `global_variance`
    (the code's `fix_variance`), s_in = s_out = np.std of ALL the kept IN values (all records, shadows
    and queries, so it includes the spread between records; the code takes the IN values for s_out too,
    and so do we). It differs from the code
    only in that (1) a record with no IN or no OUT shadow, or only one on a side with per-record
    variances (std 0), is reported (NaN, reason, warning) instead of the code's NaN / infinite scores,
    and (2) n_in and n_out are the smallest counts over the SCORED records only, so an unscored record
    does not shrink every record's fit to 0 or 1 shadows.

    `estimator="unbiased"`: mu = the sample mean, s^2 = the ddof=1 variance over all the side's
    shadows (no truncation), floored at `min_variance`. With `global_variance`, one variance per side
    and query pooled over the records: the squared deviations from each record's own mean, summed, over
    sum_r (n_r - 1).

    Args:
        target: `(N,)` or `(N, Q)`, the target model's statistic (e.g. a loss; Q queries such as
            timesteps or noise draws).
        shadows: `(K, N)` or `(K, N, Q)`, the shadows' statistic on the same records and queries.
        membership: bool `(K, N)`, True where record r is in shadow k's training set.
        estimator: "reference" or "unbiased" (above).
        global_variance: one standard deviation per side instead of one per record (the paper's "global
            variance", for few shadows); a record then needs >= 1 shadow a side instead of >= 2.
        min_variance: "unbiased" only: the variance floor (> 0, squared units of the statistic; None =
            `MIN_VARIANCE`). The reference estimator adds 1e-30 to the std instead and refuses a value.
    """
    target, shadows, membership = _check_inputs(target, shadows, membership)
    floor = _check_estimator(estimator, min_variance, None)
    if estimator == "reference":
        (fit_in, fit_out), reasons = _fit_reference(shadows, membership, global_variance, online=True)
    else:
        fit_in, reason_in = _fit_unbiased(shadows, membership, global_variance, floor, "IN")
        fit_out, reason_out = _fit_unbiased(shadows, ~membership, global_variance, floor, "OUT")
        reasons = _join(reason_in, reason_out)
    llr = norm.logpdf(target, *fit_in) - norm.logpdf(target, *fit_out)
    return _finish(llr.mean(axis=1), reasons, "LiRA online")


def lira_offline(target: np.ndarray, shadows: np.ndarray, membership: np.ndarray, *,
                 estimator: str = "reference", global_variance: bool = False,
                 min_variance: float | None = None, members_lower: bool | None = None) -> ShadowScores:
    """LiRA offline (Carlini et al., S&P'22, Algorithm 1 offline): a test against the OUT fit alone.

    `estimator="reference"` (default) is `generate_ours_offline` of the paper's code
    (tensorflow/privacy `research/mi_lira_2021/plot.py`), a two-sided test: the score is

        mean_q [ -log N(o; mu_out, s_out^2) ],

    high when `o` lies far from the OUT fit in either direction. The OUT fit is as in `lira_online`
    (first n_out OUT shadows in model order, median, np.std + 1e-30); with `global_variance` s_out is
    np.std of ALL the kept OUT values. Differences from the code: as in `lira_online`, over the OUT side.

    `estimator="unbiased"`: the OUT fit of `lira_online`'s "unbiased" estimator, and the paper's
    one-sided test. The paper's Lambda for a statistic where members are HIGHER is 1 - Pr[Z > o],
    Z ~ N(mu_out, s_out^2); for a loss (members LOWER) it is Pr[Z >= o]. The score is -log(1 - Lambda):

        members_lower:  -log Pr[Z <= o] = -log Phi((o - mu_out) / s_out)
        otherwise:      -log Pr[Z >= o] = -log Phi((mu_out - o) / s_out),

    a strictly increasing function of Lambda that keeps its resolution for the strongest members, where
    the low-FPR metrics are decided. Q queries: the mean of the per-query scores, i.e. Fisher's
    combination -2 sum_q log p_q of the one-sided p-values, divided by 2Q.

    Args:
        target, shadows, membership, estimator, global_variance, min_variance: as in `lira_online`
            (only the OUT shadows are used; a record needs >= 2 of them, or >= 1 with `global_variance`).
        members_lower: "unbiased" only: True (None = True) for a loss / distance, False for a statistic
            where members are higher. The reference test is two-sided and refuses a value.
    """
    target, shadows, membership = _check_inputs(target, shadows, membership)
    floor = _check_estimator(estimator, min_variance, members_lower)
    if estimator == "reference":
        (_, (mu_out, s_out)), reasons = _fit_reference(shadows, membership, global_variance, online=False)
        return _finish(-norm.logpdf(target, mu_out, s_out).mean(axis=1), reasons, "LiRA offline")
    (mu_out, s_out), reasons = _fit_unbiased(shadows, ~membership, global_variance, floor, "OUT")
    z = (target - mu_out) / s_out
    lower = members_lower is None or members_lower
    return _finish(-norm.logcdf(z if lower else -z).mean(axis=1), reasons, "LiRA offline")


def _check_estimator(estimator: str, min_variance: float | None, members_lower: bool | None) -> float:
    """The variance floor of the "unbiased" estimator; refuses settings the chosen estimator ignores."""
    if estimator not in ESTIMATORS:
        raise MiaGenError(f"LiRA's estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}.")
    if estimator == "reference":
        for name, value in (("min_variance", min_variance), ("members_lower", members_lower)):
            if value is not None:
                raise MiaGenError(
                    f"LiRA's {name} applies to estimator='unbiased' only; the reference estimator (the paper's "
                    "code) adds 1e-30 to the std and tests offline two-sided. Drop it or set estimator='unbiased'.")
        return 0.0
    if min_variance is None:
        return MIN_VARIANCE
    if not (np.isfinite(min_variance) and min_variance > 0):
        raise MiaGenError(f"LiRA's min_variance must be a positive number, got {min_variance!r}.")
    return float(min_variance)


def _fit_reference(shadows: np.ndarray, membership: np.ndarray, global_variance: bool, online: bool):
    """The reference code's fits `((mu_in, s_in), (mu_out, s_out))`, each `(N, Q)` (the IN fit None offline),
    and the reasons `(N,)`. Unscored records get NaN fits."""
    need = 1 if global_variance else 2
    reasons_out = _count_reasons((~membership).sum(axis=0), need, NO_OUT, ONE_OUT)
    reasons = _join(_count_reasons(membership.sum(axis=0), need, NO_IN, ONE_IN), reasons_out) if online else reasons_out
    scored = reasons == ""
    if not scored.any():  # _finish refuses
        nan = np.full(shadows.shape[1:], np.nan)
        return ((nan, nan) if online else None, (nan, nan)), reasons
    kept_out = _first_shadows(shadows, ~membership, scored)
    mu_out, s_out = np.median(kept_out, axis=0), np.std(kept_out, axis=0)
    fit_in = None
    if online:
        kept_in = _first_shadows(shadows, membership, scored)
        mu_in, s_in = np.median(kept_in, axis=0), np.std(kept_in, axis=0)
        if global_variance:  # plot.py: std_in = std_out = np.std(dat_in)
            s_in = s_out = np.full(s_in.shape, np.std(kept_in[:, scored]))
        fit_in = (mu_in, s_in + REFERENCE_STD_EPSILON)
    elif global_variance:
        s_out = np.full(s_out.shape, np.std(kept_out[:, scored]))
    return (fit_in, (mu_out, s_out + REFERENCE_STD_EPSILON)), reasons


def _first_shadows(shadows: np.ndarray, side: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """`(n, N, Q)`: for each record its first n shadows (model order) where `side` is True, n the smallest
    such count over the `scored` records (the reference code's truncation). Unscored records may hold
    other shadows' values; callers mask them."""
    n = int(side.sum(axis=0)[scored].min())
    first = np.argsort(~side, axis=0, kind="stable")[:n]  # (n, N): the side's shadows first, in model order
    return np.take_along_axis(shadows, first[:, :, None], axis=0)


def _count_reasons(count: np.ndarray, need: int, none: str, one: str) -> np.ndarray:
    return np.where(count == 0, none, np.where(count >= need, "", one)).astype(object)


def _join(reasons_in: np.ndarray, reasons_out: np.ndarray) -> np.ndarray:
    return np.array(["; ".join(r for r in pair if r) for pair in zip(reasons_in, reasons_out)], dtype=object)


def _fit_unbiased(shadows: np.ndarray, side: np.ndarray, global_variance: bool, min_variance: float,
                  side_name: str) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Per-record Gaussian fits `(mean, std)`, each `(N, Q)`, over the shadows where `side` is True
    (the `side_name` shadows, "IN" or "OUT"), and the reasons `(N,)` ("" where the fit is usable).
    Unusable fits are NaN."""
    count = side.sum(axis=0)  # (N,)
    weight = side[:, :, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (shadows * weight).sum(axis=0) / count[:, None]
        squares = (((shadows - mean) ** 2) * weight).sum(axis=0)  # (N, Q), NaN where count == 0
        if global_variance:
            usable = count >= 1
            dof = int((count[usable] - 1).sum())
            if usable.any() and dof < 1:
                raise MiaGenError(
                    f"LiRA's global variance needs some record with >= 2 {side_name} shadows, but each record "
                    "has at most one; train more shadow models (n_shadows >= 4).")
            variance = np.broadcast_to(squares[usable].sum(axis=0) / max(dof, 1), mean.shape)
        else:
            usable = count >= 2
            variance = squares / (count[:, None] - 1)
    none, one = (NO_IN, ONE_IN) if side_name == "IN" else (NO_OUT, ONE_OUT)
    reasons = _count_reasons(count, 1 if global_variance else 2, none, one)
    std = np.where(usable[:, None], np.sqrt(np.maximum(variance, min_variance)), np.nan)
    mean = np.where(usable[:, None], mean, np.nan)
    return (mean, std), reasons


# ---- RMIA ------------------------------------------------------------------------------------------
def negative(statistic: np.ndarray) -> np.ndarray:
    """log Pr(x | theta) = -L for a loss L, i.e. Pr(x | theta) = exp(-L) in (0, 1] for L >= 0."""
    return -statistic


def rmia(target: np.ndarray, references: np.ndarray, target_population: np.ndarray,
         reference_population: np.ndarray, *, membership: np.ndarray | None = None,
         population_membership: np.ndarray | None = None, offline_a: float | None = None,
         gamma: float = 1.0, log_probability: Callable[[np.ndarray], np.ndarray] = negative) -> ShadowScores:
    """RMIA (Zarifzadeh et al., ICML'24, "Low-Cost High-Power Membership Inference Attacks").

    Score(x) = Pr_z[ LR(x, z) >= gamma ] over the population records z (here the fraction of the
    given z), with the pairwise likelihood ratio

        LR(x, z) = [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)],

    Pr(. | theta) the target model's "probability" of a record and Pr(.) its average over reference
    models. For generative models Pr(x | theta) comes from a statistic through `log_probability`
    (default: exp(-L) for a loss L). Pr(.) is estimated the same way for x and z (so LR(x, x) = 1):

    - online (`offline_a=None`): Pr(x) = mean over all K reference models of Pr(x | theta_k);
    - offline (`offline_a=a` in [0, 1]): from the OUT models only, with the paper's linear
      approximation Pr_IN(x) = a * Pr_OUT(x) + (1 - a) in Pr(x) = (Pr_IN(x) + Pr_OUT(x)) / 2, i.e.
      Pr(x) = 0.5 * ((1 + a) * Pr_OUT(x) + (1 - a)),
      Pr_OUT(x) the mean of Pr(x | theta_k) over the models k where x is OUT. It assumes
      probabilities in [0, 1] (a loss >= 0 under exp(-L)); a = 1 uses Pr_OUT alone.

    Everything runs in log space (exp(-L) of a summed image loss underflows).

    Args:
        target: `(N,)` the target model's statistic on the records x to score (average several
            queries, e.g. noise draws, into one statistic first).
        references: `(K, N)` the reference models' statistic on those records.
        target_population: `(M,)` the target model's statistic on the population records z.
        reference_population: `(K, M)` the reference models' statistic on them.
        membership: bool `(K, N)`, IN/OUT of x in the reference models; needed offline.
        population_membership: bool `(K, M)`, IN/OUT of z; None = z is OUT for every model.
        offline_a: None for online, else the paper's a in [0, 1].
        gamma: the LR threshold (> 0).
        log_probability: statistic -> log Pr(record | model), elementwise.
    """
    target = _float_array(target, "target", 1)
    target_population = _float_array(target_population, "target_population", 1)
    references = _float_array(references, "references", 2)
    reference_population = _float_array(reference_population, "reference_population", 2)
    k = references.shape[0]
    if references.shape != (k, target.size) or reference_population.shape != (k, target_population.size):
        raise MiaGenError(
            f"RMIA: references must be (K, N) = (K, {target.size}) and reference_population (K, M) = "
            f"(K, {target_population.size}) with the same K reference models, got {references.shape} and "
            f"{reference_population.shape}.")
    if target_population.size == 0:
        raise MiaGenError("RMIA needs population records z to compare against; none were given.")
    if not (np.isfinite(gamma) and gamma > 0):
        raise MiaGenError(f"RMIA's gamma must be a positive number, got {gamma!r}.")
    if offline_a is not None and not 0.0 <= offline_a <= 1.0:
        raise MiaGenError(f"RMIA's offline a must lie in [0, 1], got {offline_a!r} (a = 1: no correction).")
    if offline_a is not None and membership is None:
        raise MiaGenError("Offline RMIA needs the reference models' IN/OUT matrix (membership) to average "
                          "over the OUT models only.")
    if population_membership is None:
        population_membership = np.zeros(reference_population.shape, dtype=bool)
    log_marginal_x, reasons = _log_marginal(log_probability(references), membership, offline_a, "membership")
    log_marginal_z, reasons_z = _log_marginal(log_probability(reference_population), population_membership,
                                              offline_a, "population_membership")
    if (reasons_z != "").any():
        raise MiaGenError(f"Offline RMIA: {int((reasons_z != '').sum())} population record(s) z are IN every "
                          "reference model, so Pr(z) has no OUT estimate; leave them out of the population.")
    if offline_a is not None and offline_a < 1:
        spread = np.ptp(log_marginal_x[np.isfinite(log_marginal_x)]) if np.isfinite(log_marginal_x).sum() > 1 else 1.0
        if spread < CONSTANT_CORRECTION:
            raise MiaGenError(
                f"Offline RMIA: Pr(x) = 0.5 ((1 + a) Pr_OUT(x) + (1 - a)) is the same for every record (it varies by "
                f"{spread:.1e} in log): Pr_OUT(x) is negligible beside 1 - a = {1 - offline_a:g}, so the scores "
                "would rank records exactly as the plain statistic does. Map the statistic to probabilities on its "
                "own scale (attack.rmia.temperature=auto, the statistic's per-dimension scale) or set offline_a=1.")
    log_ratio_x = log_probability(target) - log_marginal_x  # (N,), NaN where not scored
    log_ratio_z = log_probability(target_population) - log_marginal_z  # (M,)
    # LR(x, z) >= gamma  <=>  log_ratio_z + log(gamma) <= log_ratio_x
    thresholds = np.sort(log_ratio_z + np.log(gamma))
    count = np.searchsorted(thresholds, np.nan_to_num(log_ratio_x, nan=-np.inf), side="right")
    scores = np.where(reasons == "", count / thresholds.size, np.nan)
    return _finish(scores, reasons, "RMIA offline" if offline_a is not None else "RMIA online")


def _log_marginal(log_probs: np.ndarray, membership: np.ndarray | None, offline_a: float | None,
                  name: str) -> tuple[np.ndarray, np.ndarray]:
    """log Pr(record) `(n,)` over reference models (`log_probs` `(K, n)`), and the reasons `(n,)`."""
    k, n = log_probs.shape
    if not np.isfinite(log_probs).all():
        raise MiaGenError("RMIA: log_probability gave NaN or infinite values; check the statistic and the map.")
    if offline_a is None:
        return logsumexp(log_probs, axis=0) - np.log(k), np.full(n, "", dtype=object)
    out = ~_bool_matrix(membership, (k, n), name)
    if offline_a < 1 and (log_probs[out] > 0).any():
        raise MiaGenError("Offline RMIA's a-correction assumes probabilities in [0, 1], but log_probability "
                          "gave Pr > 1 (a negative loss?); use offline_a=1 or a map into [0, 1].")
    n_out = out.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # records with no OUT model: NaN, reported
        log_mean_out = logsumexp(np.where(out, log_probs, -np.inf), axis=0) - np.log(n_out)
        # 0.5 * ((1 + a) Pr_OUT + (1 - a)), in logs; log(1 - a) = -inf for a = 1
        log_marginal = np.log(0.5) + np.logaddexp(np.log1p(offline_a) + log_mean_out, np.log1p(-offline_a))
    reasons = np.where(n_out == 0, NO_OUT, "").astype(object)
    return np.where(n_out > 0, log_marginal, np.nan), reasons


# ---- shared checks ---------------------------------------------------------------------------------
def _check_inputs(target, shadows, membership) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """target `(N, Q)`, shadows `(K, N, Q)` float64 and membership bool `(K, N)`, checked."""
    target = np.asarray(target, dtype=np.float64)
    shadows = np.asarray(shadows, dtype=np.float64)
    if target.ndim == 1:
        target = target[:, None]
    if shadows.ndim == 2:
        shadows = shadows[:, :, None]
    if target.ndim != 2 or shadows.ndim != 3 or shadows.shape[1:] != target.shape or target.size == 0:
        raise MiaGenError(
            f"LiRA: target must be (N,) or (N, Q) and shadows (K, N) or (K, N, Q) on the same records and "
            f"queries, got {target.shape} and {shadows.shape}.")
    if not (np.isfinite(target).all() and np.isfinite(shadows).all()):
        raise MiaGenError("LiRA: the statistics contain NaN or infinite values; recompute them.")
    return target, shadows, _bool_matrix(membership, shadows.shape[:2], "membership")


def _bool_matrix(matrix, shape: tuple[int, int], name: str) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.dtype != bool or matrix.shape != tuple(shape):
        raise MiaGenError(f"{name} must be a bool matrix of shape (K, N) = {tuple(shape)} (the zoo's IN/OUT "
                          f"matrix, mia_gen.zoo), got {matrix.dtype} {matrix.shape}.")
    return matrix


def _float_array(values, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise MiaGenError(f"RMIA: {name} must have {ndim} dimension(s), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise MiaGenError(f"RMIA: {name} contains NaN or infinite values; recompute the statistic.")
    return array


def _finish(scores: np.ndarray, reasons: np.ndarray, attack: str) -> ShadowScores:
    """NaN for the unscored records; warn with the counts, or refuse when none can be scored."""
    reasons = np.asarray(reasons).astype(str)
    scores = np.where(reasons == "", scores, np.nan).astype(np.float64)
    counts = Counter(reasons[reasons != ""].tolist())
    if counts:
        summary = "; ".join(f"{n} with {reason}" for reason, n in sorted(counts.items()))
        if sum(counts.values()) == reasons.size:
            raise MiaGenError(f"{attack} can score none of the {reasons.size} records ({summary}); the zoo "
                              "must hold every record IN some shadows and OUT of others (mia_gen.zoo.draw_zoo).")
        warnings.warn(f"{attack}: {sum(counts.values())} of {reasons.size} records not scored (NaN): {summary}.",
                      UnscoredRecordsWarning, stacklevel=3)
    return ShadowScores(scores=scores, reasons=reasons)
