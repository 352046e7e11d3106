"""LiRA and RMIA scoring cores (attacks/shadow_stats.py) against plain per-record loops."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mia_gen.attacks.shadow_stats import (
    NO_IN, NO_OUT, ONE_IN, ONE_OUT, MIN_VARIANCE, UnscoredRecordsWarning, lira_offline, lira_online, rmia,
)
from mia_gen.errors import MiaGenError


def balanced_membership(k: int, n: int, seed: int) -> np.ndarray:
    """Each record IN for k/2 random shadows (drawn here, independently of mia_gen.zoo)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(k) < k // 2 for _ in range(n)], axis=1)


def unbiased_loop(target, shadows, membership, online, global_variance=False, members_lower=True):
    """estimator="unbiased": a plain loop over records and queries with scipy.stats.norm (mean, ddof=1
    variance, one-sided offline); None for a record that is not scored."""
    target = np.asarray(target).reshape(len(target), -1)
    shadows = np.asarray(shadows).reshape(*shadows.shape[:2], -1)
    k, n, q = shadows.shape

    def values(r, j, side):
        return [float(shadows[s, r, j]) for s in range(k) if bool(membership[s, r]) == side]

    pooled = {}
    if global_variance:
        for side in (True, False):
            for j in range(q):
                squares, dof = 0.0, 0
                for r in range(n):
                    v = values(r, j, side)
                    if v:
                        mean = statistics.fmean(v)
                        squares += sum((x - mean) ** 2 for x in v)
                        dof += len(v) - 1
                pooled[side, j] = squares / dof

    def fit(r, j, side):
        v = values(r, j, side)
        if len(v) < (1 if global_variance else 2):
            return None
        variance = pooled[side, j] if global_variance else statistics.variance(v)
        return statistics.fmean(v), math.sqrt(max(variance, MIN_VARIANCE))

    scores = []
    for r in range(n):
        per_query = []
        for j in range(q):
            out, inside = fit(r, j, False), fit(r, j, True)
            o = float(target[r, j])
            if out is None or (online and inside is None):
                per_query = None
                break
            if online:
                per_query.append(norm.logpdf(o, *inside) - norm.logpdf(o, *out))
            else:  # -log Pr[Z <= o] for a loss (members lower), -log Pr[Z >= o] otherwise
                per_query.append(-math.log(norm.cdf(o, *out) if members_lower else norm.sf(o, *out)))
        scores.append(None if per_query is None else statistics.fmean(per_query))
    return scores


def assert_matches(result, reference):
    expected = np.array([np.nan if s is None else s for s in reference])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-9, atol=1e-9)
    assert np.array_equal(result.scored, ~np.isnan(expected))


def random_statistics(k=8, n=12, q=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) if q is None else (n, q)
    difficulty = rng.gamma(2.0, 1.0, size=shape)
    shadows = difficulty + rng.normal(0, 0.3, size=(k, *shape))
    target = difficulty + rng.normal(0, 0.3, size=shape)
    return target, shadows, balanced_membership(k, n, seed)


@pytest.mark.parametrize("global_variance", [False, True])
@pytest.mark.parametrize("q", [None, 3])
def test_lira_online_unbiased_matches_a_per_record_loop(global_variance, q):
    target, shadows, membership = random_statistics(q=q, seed=1)
    result = lira_online(target, shadows, membership, estimator="unbiased", global_variance=global_variance)
    assert_matches(result, unbiased_loop(target, shadows, membership, True, global_variance))
    assert result.scored.all()


@pytest.mark.parametrize("global_variance", [False, True])
@pytest.mark.parametrize("q", [None, 4])
@pytest.mark.parametrize("members_lower", [True, False])
def test_lira_offline_unbiased_matches_a_per_record_loop(global_variance, q, members_lower):
    target, shadows, membership = random_statistics(q=q, seed=2)
    result = lira_offline(target, shadows, membership, estimator="unbiased", global_variance=global_variance,
                          members_lower=members_lower)
    assert_matches(result, unbiased_loop(target, shadows, membership, False, global_variance, members_lower))


def test_lira_offline_direction_for_a_loss():
    """Unbiased (one-sided): a loss far below the OUT shadows' scores higher than one far above (members
    have lower loss). Reference (two-sided): the same distance below or above scores the same."""
    shadows = np.array([[1.0, 1.0], [1.2, 1.2], [0.8, 0.8], [1.1, 1.1]])
    out = np.zeros((4, 2), dtype=bool)
    result = lira_offline(np.array([0.2, 1.8]), shadows, out, estimator="unbiased")
    assert result.scores[0] > result.scores[1] > 0
    median = 1.05  # of the OUT shadows 0.8, 1.0, 1.1, 1.2
    two_sided = lira_offline(np.array([median - 0.7, median + 0.7]), shadows, out).scores
    assert two_sided[0] == pytest.approx(two_sided[1], rel=1e-12)
    assert two_sided[0] > lira_offline(np.array([median, median]), shadows, out).scores[0]


def test_records_without_a_usable_fit_are_reported_not_scored():
    target, shadows, membership = random_statistics(k=6, n=10, seed=3)
    membership[:, 0] = True  # never OUT
    membership[:, 1] = False  # never IN
    membership[:, 2] = [True, False, False, False, False, False]  # one IN shadow
    reference = unbiased_loop(target, shadows, membership, True)
    with pytest.warns(UnscoredRecordsWarning, match="3 of 10 records not scored"):
        online = lira_online(target, shadows, membership, estimator="unbiased")
    assert_matches(online, reference)
    assert online.reasons[0] == NO_OUT and online.reasons[1] == NO_IN and online.reasons[2] == ONE_IN
    assert np.isnan(online.scores[:3]).all() and (online.reasons[3:] == "").all()

    with pytest.warns(UnscoredRecordsWarning, match="2 of 10"):  # one IN shadow is enough with a pooled variance
        pooled = lira_online(target, shadows, membership, estimator="unbiased", global_variance=True)
    assert_matches(pooled, unbiased_loop(target, shadows, membership, True, True))
    assert pooled.scored[2] and not pooled.scored[:2].any()

    with pytest.warns(UnscoredRecordsWarning, match=r"1 of 10 records not scored \(NaN\): 1 with no OUT shadow"):
        offline = lira_offline(target, shadows, membership, estimator="unbiased")  # never-IN records are fine
    assert_matches(offline, unbiased_loop(target, shadows, membership, False))
    assert offline.scored[1:].all()


def test_nothing_scorable_is_an_error():
    target, shadows, _ = random_statistics(k=4, n=5)
    with pytest.raises(MiaGenError, match="none of the 5 records"):
        lira_offline(target, shadows, np.ones((4, 5), dtype=bool))
    with pytest.raises(MiaGenError, match="at most one"):  # 1 IN + 1 OUT per record: no variance at all
        lira_online(target, shadows[:2], balanced_membership(2, 5, 0), estimator="unbiased", global_variance=True)


@pytest.mark.parametrize("estimator", ["reference", "unbiased"])
def test_identical_shadows_keep_a_finite_score(estimator):
    shadows = np.array([[1.0, 0.5], [1.0, 0.6], [1.0, 0.7], [1.0, 0.9]])
    membership = np.array([[True, True], [True, False], [False, True], [False, False]])
    result = lira_online(np.array([1.0, 0.5]), shadows, membership, estimator=estimator)
    assert np.isfinite(result.scores).all()


def test_bad_inputs_are_refused():
    target, shadows, membership = random_statistics(k=4, n=5)
    with pytest.raises(MiaGenError, match="same records"):
        lira_online(target[:4], shadows, membership)
    with pytest.raises(MiaGenError, match="bool matrix"):
        lira_online(target, shadows, membership.astype(int))
    with pytest.raises(MiaGenError, match="NaN"):
        lira_online(np.full(5, np.nan), shadows, membership)
    with pytest.raises(MiaGenError, match="min_variance must be a positive number"):
        lira_offline(target, shadows, membership, estimator="unbiased", min_variance=0.0)
    with pytest.raises(MiaGenError, match="one of 'reference', 'unbiased', got 'median'"):
        lira_online(target, shadows, membership, estimator="median")
    with pytest.raises(MiaGenError, match="min_variance applies to estimator='unbiased' only"):
        lira_online(target, shadows, membership, min_variance=1e-6)  # the reference adds 1e-30 to the std
    with pytest.raises(MiaGenError, match="members_lower applies to estimator='unbiased' only"):
        lira_offline(target, shadows, membership, members_lower=True)  # the reference test is two-sided


# ---- LiRA, estimator="reference": the paper's code (tensorflow/privacy research/mi_lira_2021/plot.py) ----
def reference_code_loop(target, shadows, membership, online, global_variance=False, truncate=True):
    """plot.py's generate_ours / generate_ours_offline as a plain per-record loop (statistics.median and
    statistics.pstdev, i.e. np.std with ddof=0), plus our rule: a record with no shadow on a side it uses, or
    one with per-record variances, is not scored (None) and does not count for the common length."""
    target = np.asarray(target).reshape(len(target), -1)
    shadows = np.asarray(shadows).reshape(*shadows.shape[:2], -1)
    k, n, q = shadows.shape
    need = 1 if global_variance else 2

    def models(r, inside):  # model order
        return [s for s in range(k) if bool(membership[s, r]) == inside]

    scorable = [r for r in range(n) if len(models(r, False)) >= need and (not online or len(models(r, True)) >= need)]
    size = {inside: min(len(models(r, inside)) for r in scorable) if truncate else k for inside in (True, False)}

    def kept(r, j, inside):  # the first `size` models of the side
        return [float(shadows[s, r, j]) for s in models(r, inside)[:size[inside]]]

    # fix_variance: one std of ALL kept values; online it is the IN values' for both sides (plot.py's quirk)
    pooled = statistics.pstdev([v for r in scorable for j in range(q) for v in kept(r, j, inside=online)])
    scores = []
    for r in range(n):
        if r not in scorable:
            scores.append(None)
            continue
        per_query = []
        for j in range(q):
            o = float(target[r, j])
            out = kept(r, j, False)
            std_out = pooled if global_variance else statistics.pstdev(out)
            log_out = norm.logpdf(o, statistics.median(out), std_out + 1e-30)
            if online:
                inside = kept(r, j, True)
                std_in = pooled if global_variance else statistics.pstdev(inside)
                per_query.append(norm.logpdf(o, statistics.median(inside), std_in + 1e-30) - log_out)
            else:
                per_query.append(-log_out)
        scores.append(statistics.fmean(per_query))
    return scores


def unequal_membership(k, n, seed):
    """Each shadow takes each record with probability 1/2, redrawn until 3..k-3 IN (>= 3 a side, so a median
    differs from a mean): unequal counts per record."""
    rng = np.random.default_rng(seed)
    membership = rng.random((k, n)) < 0.5
    for r in range(n):
        while not 3 <= membership[:, r].sum() <= k - 3:
            membership[:, r] = rng.random(k) < 0.5
    assert len(set(membership.sum(axis=0))) > 1
    return membership


def reference_statistics(k, n=12, q=None, seed=0):
    """A member gap and a narrower spread for OUT than IN shadows (so std_out = std(IN) matters)."""
    rng = np.random.default_rng(seed)
    shape = (n,) if q is None else (n, q)
    membership = unequal_membership(k, n, seed)
    inside = membership.reshape(k, n, *([1] * (len(shape) - 1)))
    difficulty = rng.gamma(2.0, 1.0, size=shape)
    shadows = difficulty - 0.5 * inside + rng.normal(0, 1, size=(k, *shape)) * np.where(inside, 0.6, 0.2)
    target = difficulty - 0.5 * (rng.random(n) < 0.5).reshape(-1, *([1] * (len(shape) - 1))) \
        + rng.normal(0, 0.3, size=shape)
    return target, shadows, membership


@pytest.mark.parametrize("k", [7, 8])
@pytest.mark.parametrize("q", [None, 3])
@pytest.mark.parametrize("global_variance", [False, True])
@pytest.mark.parametrize("online", [True, False])
def test_lira_reference_matches_the_papers_code_as_a_loop(online, global_variance, q, k):
    target, shadows, membership = reference_statistics(k, q=q, seed=10 + k)
    lira = lira_online if online else lira_offline
    result = lira(target, shadows, membership, global_variance=global_variance)  # estimator="reference" by default
    expected = reference_code_loop(target, shadows, membership, online, global_variance)
    assert result.scored.all()
    assert np.allclose(result.scores, np.array(expected, dtype=float), rtol=1e-9, atol=1e-9)
    # the data make the truncation to the smallest count matter (the test would notice its absence)
    untruncated = reference_code_loop(target, shadows, membership, online, global_variance, truncate=False)
    assert not np.allclose(result.scores, np.array(untruncated, dtype=float), rtol=1e-6)


@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_reference_fix_variance_uses_the_in_values_for_both_sides(global_variance):
    """Online with fix_variance, plot.py takes std_out = np.std(dat_in): scaling only the OUT shadows' spread
    around their medians leaves the score unchanged; without it the score changes. (Equal counts: no truncation.)"""
    target, shadows, _ = reference_statistics(8, q=3, seed=3)
    membership = balanced_membership(8, 12, 3)
    out = ~membership[:, :, None]
    median_out = np.array([[np.median(shadows[~membership[:, r], r, j]) for j in range(3)] for r in range(12)])
    widened = np.where(out, median_out + 3 * (shadows - median_out), shadows)
    before = lira_online(target, shadows, membership, global_variance=global_variance).scores
    after = lira_online(target, widened, membership, global_variance=global_variance).scores
    assert np.allclose(before, after, rtol=1e-9) == global_variance


@pytest.mark.parametrize("global_variance", [False, True])
@pytest.mark.parametrize("online", [True, False])
def test_lira_reference_reports_records_it_cannot_score_and_truncates_over_the_rest(online, global_variance):
    target, shadows, membership = reference_statistics(7, q=3, seed=4)
    membership[:, 0] = [True] * 6 + [False]  # one OUT shadow
    membership[:, 1] = False  # no IN shadow
    membership[:, 2] = [False, True] + [False] * 5  # one IN shadow
    membership[:, 3] = True  # no OUT shadow
    expected_reasons = {  # (online, global_variance): the reasons of records 0..3
        (True, False): [ONE_OUT, NO_IN, ONE_IN, NO_OUT], (True, True): ["", NO_IN, "", NO_OUT],
        (False, False): [ONE_OUT, "", "", NO_OUT], (False, True): ["", "", "", NO_OUT],
    }[online, global_variance]
    lira = lira_online if online else lira_offline
    unscored = sum(reason != "" for reason in expected_reasons)
    with pytest.warns(UnscoredRecordsWarning, match=f"{unscored} of 12 records not scored"):
        result = lira(target, shadows, membership, global_variance=global_variance)
    assert list(result.reasons[:4]) == expected_reasons and result.scored[4:].all()
    assert np.isnan(result.scores[~result.scored]).all()
    expected = np.array(reference_code_loop(target, shadows, membership, online, global_variance), dtype=float)
    assert np.allclose(result.scores, expected, rtol=1e-9, equal_nan=True)
    # the scored records get what the paper's code gives on them alone: the unscored ones shrink nothing
    scored = result.scored
    alone = reference_code_loop(target[scored], shadows[:, scored], membership[:, scored], online, global_variance)
    assert np.allclose(result.scores[scored], alone, rtol=1e-9)


@pytest.mark.parametrize("estimator", ["reference", "unbiased"])
@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_ranks_memorised_members_first(estimator, global_variance):
    """Shadows that trained on a record have a much lower loss on it; so does the target on its members.
    (With 2 OUT shadows a record, the reference's offline np.std is too noisy for a perfect ranking: 8 here.)"""
    rng = np.random.default_rng(5)
    k, n = 16, 40
    membership = balanced_membership(k, n, 5)
    difficulty = rng.uniform(1.0, 3.0, size=n)
    shadows = difficulty - 0.8 * membership + rng.normal(0, 0.05, size=(k, n))
    is_member = rng.permutation(n) < n // 2
    target = difficulty - 0.8 * is_member + rng.normal(0, 0.05, size=n)
    for lira in (lira_online, lira_offline):
        scores = lira(target, shadows, membership, estimator=estimator, global_variance=global_variance).scores
        assert scores[is_member].min() > scores[~is_member].max(), lira.__name__
    assert roc_auc_score(is_member, -target) < 0.9  # the raw loss alone does not separate them


# ---- RMIA ------------------------------------------------------------------------------------------
def rmia_reference(target, references, target_population, reference_population, membership=None,
                   population_membership=None, a=None, gamma=1.0, probability=lambda s: math.exp(-s)):
    """A plain double loop over (x, z) with Pr = exp(-statistic)."""
    k = len(references)

    def marginal(column, inside):
        if a is None:
            return statistics.fmean(probability(float(s)) for s in column)
        out = [probability(float(column[j])) for j in range(k) if not inside[j]]
        return 0.5 * ((1 + a) * statistics.fmean(out) + (1 - a))

    if population_membership is None:
        population_membership = np.zeros(reference_population.shape, dtype=bool)
    no_membership = np.zeros(references.shape, dtype=bool)
    scores = []
    for x in range(len(target)):
        inside = (membership if membership is not None else no_membership)[:, x]
        ratio_x = probability(float(target[x])) / marginal(references[:, x], inside)
        count = 0
        for z in range(len(target_population)):
            ratio_z = (probability(float(target_population[z]))
                       / marginal(reference_population[:, z], population_membership[:, z]))
            count += (ratio_x / ratio_z) >= gamma
        scores.append(count / len(target_population))
    return np.array(scores)


def rmia_problem(k=6, n=15, m=40, seed=0):
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(1.0, 3.0, size=n + m)
    references = difficulty + rng.normal(0, 0.2, size=(k, n + m))
    target = difficulty + rng.normal(0, 0.2, size=n + m)
    return target[:n], references[:, :n], target[n:], references[:, n:], balanced_membership(k, n, seed)


@pytest.mark.parametrize("gamma", [1.0, 1.3])
def test_rmia_online_matches_a_double_loop(gamma):
    target, references, target_pop, references_pop, _ = rmia_problem(seed=4)
    result = rmia(target, references, target_pop, references_pop, gamma=gamma)
    np.testing.assert_array_equal(result.scores, rmia_reference(target, references, target_pop, references_pop,
                                                                gamma=gamma))
    assert len(np.unique(result.scores)) > 5  # not a degenerate comparison


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_rmia_offline_matches_a_double_loop(a):
    target, references, target_pop, references_pop, membership = rmia_problem(seed=5)
    population_membership = balanced_membership(6, len(target_pop), 7)  # z from the zoo: their OUT models only
    result = rmia(target, references, target_pop, references_pop, membership=membership,
                  population_membership=population_membership, offline_a=a)
    expected = rmia_reference(target, references, target_pop, references_pop, membership,
                              population_membership, a=a)
    np.testing.assert_array_equal(result.scores, expected)
    outside = rmia(target, references, target_pop, references_pop, membership=membership, offline_a=a)
    np.testing.assert_array_equal(outside.scores, rmia_reference(target, references, target_pop, references_pop,
                                                                 membership, a=a))


def test_rmia_probability_map_is_a_parameter():
    target, references, target_pop, references_pop, membership = rmia_problem(seed=6)
    result = rmia(target, references, target_pop, references_pop, membership=membership, offline_a=0.5,
                  log_probability=lambda s: -s / 3)
    expected = rmia_reference(target, references, target_pop, references_pop, membership, a=0.5,
                              probability=lambda s: math.exp(-s / 3))
    np.testing.assert_array_equal(result.scores, expected)


def test_rmia_runs_in_log_space():
    """exp(-1000) underflows, but the online LR is invariant to adding a constant to every loss."""
    target, references, target_pop, references_pop, membership = rmia_problem(seed=8)
    base = rmia(target, references, target_pop, references_pop).scores
    shifted = rmia(target + 1000, references + 1000, target_pop + 1000, references_pop + 1000).scores
    np.testing.assert_array_equal(shifted, base)
    offline = rmia(target + 1000, references + 1000, target_pop + 1000, references_pop + 1000,
                   membership=membership, offline_a=1.0).scores
    np.testing.assert_array_equal(offline, rmia(target, references, target_pop, references_pop,
                                                membership=membership, offline_a=1.0).scores)


def test_rmia_reports_records_without_out_models_and_refuses_bad_settings():
    target, references, target_pop, references_pop, membership = rmia_problem(seed=9)
    membership[:, 3] = True
    with pytest.warns(UnscoredRecordsWarning, match="1 of 15"):
        result = rmia(target, references, target_pop, references_pop, membership=membership, offline_a=0.5)
    assert np.isnan(result.scores[3]) and result.reasons[3] == NO_OUT and result.scored.sum() == 14
    with pytest.raises(MiaGenError, match=r"in \[0, 1\]"):
        rmia(target, references, target_pop, references_pop, membership=membership, offline_a=1.5)
    with pytest.raises(MiaGenError, match="IN/OUT matrix"):
        rmia(target, references, target_pop, references_pop, offline_a=0.5)
    with pytest.raises(MiaGenError, match="Pr > 1"):
        rmia(target, references - 5, target_pop, references_pop - 5, membership=membership, offline_a=0.5)
    with pytest.raises(MiaGenError, match="gamma"):
        rmia(target, references, target_pop, references_pop, gamma=0)


# ---- signal: members have lower loss ---------------------------------------------------------------
def synthetic_zoo(seed=0, k=16, n=400, gap=1.0):
    """Per-record difficulty (spread 2) plus a member gap of `gap` in the loss, noise 0.5."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(5, 2, size=n)
    membership = balanced_membership(k, n, seed)
    shadows = difficulty - gap * membership + rng.normal(0, 0.5, size=(k, n))
    is_member = rng.permutation(n) < n // 2
    target = difficulty - gap * is_member + rng.normal(0, 0.5, size=n)
    return target, shadows, membership, is_member


def test_shadow_calibration_finds_members_that_the_raw_loss_hides():
    target, shadows, membership, is_member = synthetic_zoo()
    raw = roc_auc_score(is_member, -target)  # the difficulty spread hides the gap: about 0.64
    population = 200  # z: the target's statistic on fresh records, OUT of every reference model
    rng = np.random.default_rng(1)
    z_difficulty = rng.normal(5, 2, size=population)
    z_target = z_difficulty + rng.normal(0, 0.5, size=population)
    z_references = z_difficulty + rng.normal(0, 0.5, size=(16, population))
    attacks = {
        f"lira {kind} {estimator}": lira(target, shadows, membership, estimator=estimator, **settings).scores
        for estimator in ("reference", "unbiased")
        for kind, lira, settings in (("online", lira_online, {}), ("offline", lira_offline, {}),
                                     ("global", lira_online, {"global_variance": True}),
                                     ("offline global", lira_offline, {"global_variance": True}))
    }
    attacks |= {
        "rmia online": rmia(target, shadows, z_target, z_references).scores,
        "rmia offline": rmia(target, shadows, z_target, z_references, membership=membership, offline_a=1.0).scores,
    }
    shuffled = np.random.default_rng(2).permutation(is_member)
    for name, scores in attacks.items():
        auc = roc_auc_score(is_member, scores)
        # the reference's offline test is two-sided: it also flags losses far ABOVE the OUT fit (about 0.81 here)
        two_sided = name.startswith("lira offline") and name.endswith("reference")
        assert auc > (0.78 if two_sided else 0.85) and auc > raw + (0.1 if two_sided else 0.15), (name, auc, raw)
        assert abs(roc_auc_score(shuffled, scores) - 0.5) < 0.1, name
