"""Metrics against sklearn, a hand-computed ROC, and plain loops over thresholds and pairs."""

import json
import math
import warnings
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from mia_gen.errors import MiaGenError
from mia_gen.metrics import (
    UnresolvableMetricWarning,
    asr,
    auc,
    bootstrap_ci,
    calibrated_sign,
    evaluate_scores,
    roc_points,
    tpr_at_fpr,
)

# Six records with ties inside the non-members and across classes (0.8):
# members 0.9, 0.8, 0.5; non-members 0.8, 0.3, 0.3.
TINY_LABELS = [1, 1, 0, 1, 0, 0]
TINY_SCORES = [0.9, 0.8, 0.8, 0.5, 0.3, 0.3]


def _gaussian_scores(n_members, n_non_members, shift=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_members, int), np.zeros(n_non_members, int)]
    return labels, rng.normal(size=labels.size) + shift * labels


def _loop_roc(labels, scores):
    """ROC points by brute force: for each threshold, call `score >= threshold` a member."""
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    points = [(0.0, 0.0)]
    for threshold in sorted(set(scores), reverse=True):
        tp = sum(1 for y, s in zip(labels, scores) if y == 1 and s >= threshold)
        fp = sum(1 for y, s in zip(labels, scores) if y == 0 and s >= threshold)
        points.append((fp / n_neg, tp / n_pos))
    return points


def _loop_auc(labels, scores):
    """P(member score > non-member score) + 1/2 P(tie), over all pairs."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_tiny_roc_by_hand():
    # Thresholds inf, 0.9, 0.8, 0.5, 0.3 give (fpr, tpr) = (0,0) (0,1/3) (1/3,2/3) (1/3,1) (1,1).
    fpr, tpr, thresholds = roc_points(TINY_LABELS, TINY_SCORES)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.8, 0.5, 0.3])
    # Balanced accuracies 1/2, 2/3, 2/3, 5/6, 1/2.
    assert asr(TINY_LABELS, TINY_SCORES) == pytest.approx(5 / 6)
    # Pairs: 0.9 beats all 3; 0.8 ties 0.8 and beats 2; 0.5 beats 2 -> 7.5 / 9.
    assert auc(TINY_LABELS, TINY_SCORES) == pytest.approx(7.5 / 9)
    assert tpr_at_fpr(TINY_LABELS, TINY_SCORES, 0.1) == pytest.approx(1 / 3)
    # FPR 1/3 is the point closest to 0.3 but exceeds it: the answer stays at FPR 0.
    assert tpr_at_fpr(TINY_LABELS, TINY_SCORES, 0.3) == pytest.approx(1 / 3)
    assert tpr_at_fpr(TINY_LABELS, TINY_SCORES, 0.34) == pytest.approx(1.0)


def test_auc_matches_sklearn():
    labels, scores = _gaussian_scores(300, 200, seed=3)
    scores = np.round(scores, 1)  # ties
    assert auc(labels, scores) == roc_auc_score(labels, scores)
    assert auc(labels.astype(bool), scores) == roc_auc_score(labels, scores)


records = st.lists(
    st.tuples(st.integers(0, 1), st.integers(-5, 5).map(lambda v: v / 4)), min_size=2, max_size=30
).filter(lambda rs: 0 < sum(y for y, _ in rs) < len(rs))


@pytest.mark.filterwarnings("ignore::mia_gen.metrics.UnresolvableMetricWarning")
@settings(max_examples=60, deadline=None)
@given(records, st.sampled_from([0.05, 0.1, 0.25, 0.5]))
def test_metrics_match_plain_loop_over_thresholds(rs, alpha):
    labels = [y for y, _ in rs]
    scores = [s for _, s in rs]
    points = _loop_roc(labels, scores)
    fpr, tpr, _ = roc_points(labels, scores)
    np.testing.assert_allclose(np.c_[fpr, tpr], points)
    assert asr(labels, scores) == pytest.approx(max((t + 1 - f) / 2 for f, t in points))
    assert tpr_at_fpr(labels, scores, alpha) == pytest.approx(max(t for f, t in points if f <= alpha))
    assert auc(labels, scores) == pytest.approx(_loop_auc(labels, scores))
    result = evaluate_scores(labels, scores, alphas=(alpha,), n_bootstrap=0)
    assert result["tpr_at_fpr"][str(alpha)] == pytest.approx(tpr_at_fpr(labels, scores, alpha))


@pytest.mark.parametrize(
    "name, reference",
    [("auc", auc), ("asr", asr), ("tpr_at_fpr@0.1", partial(tpr_at_fpr, alpha=0.1))],
)
def test_vectorised_bootstrap_matches_loop_over_resamples(name, reference):
    labels, scores = _gaussian_scores(40, 50, seed=1)
    scores = np.round(scores, 1)
    fast = bootstrap_ci(labels, scores, name, n_bootstrap=300, seed=7)
    slow = bootstrap_ci(labels, scores, reference, n_bootstrap=300, seed=7)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_width_matches_delong_standard_error():
    """An independent check of the resampling: the interval's width ~ 2 * 1.96 * DeLong SE."""
    labels, scores = _gaussian_scores(200, 200, seed=2)
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]).astype(float)  # no ties with continuous scores
    se = math.sqrt(psi.mean(axis=1).var(ddof=1) / pos.size + psi.mean(axis=0).var(ddof=1) / neg.size)
    lo, hi = bootstrap_ci(labels, scores, "auc", n_bootstrap=2000, seed=0)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < auc(labels, scores) < hi


def test_bootstrap_is_stratified_and_seeded():
    # One member: unstratified resampling would often draw no member and fail. Above every
    # non-member, it gives AUC 1 on every stratified resample.
    labels, scores = _gaussian_scores(1, 30, shift=10.0, seed=4)
    assert bootstrap_ci(labels, scores, "auc", n_bootstrap=200) == pytest.approx([1.0, 1.0])
    labels, scores = _gaussian_scores(30, 30, seed=4)
    assert bootstrap_ci(labels, scores, "asr", seed=1) == bootstrap_ci(labels, scores, "asr", seed=1)
    assert bootstrap_ci(labels, scores, "asr", seed=1) != bootstrap_ci(labels, scores, "asr", seed=2)


def test_evaluate_scores_structure_and_intervals():
    labels, scores = _gaussian_scores(500, 1000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1000 non-members resolve every default alpha
        result = evaluate_scores(labels, scores, n_bootstrap=500, seed=0)
    assert set(result) == {"auc", "asr", "tpr_at_fpr", "ci95", "n_members", "n_non_members", "warnings"}
    assert set(result["tpr_at_fpr"]) == set(result["ci95"]["tpr_at_fpr"]) == {"0.1", "0.01", "0.001"}
    assert (result["n_members"], result["n_non_members"], result["warnings"]) == (500, 1000, [])
    assert result["auc"] == roc_auc_score(labels, scores)
    for name in ("auc", "asr"):
        lo, hi = result["ci95"][name]
        assert lo <= result[name] <= hi
    for key, value in result["tpr_at_fpr"].items():
        lo, hi = result["ci95"]["tpr_at_fpr"][key]
        assert lo <= value <= hi
        assert value == tpr_at_fpr(labels, scores, float(key))
    # The same draws as bootstrap_ci with the same seed.
    assert result["ci95"]["auc"] == bootstrap_ci(labels, scores, "auc", n_bootstrap=500, seed=0)
    assert json.loads(json.dumps(result)) == result
    assert evaluate_scores(labels, scores, n_bootstrap=500, seed=0) == result


def test_warns_when_too_few_non_members_for_alpha():
    labels, scores = _gaussian_scores(50, 50)
    with pytest.warns(UnresolvableMetricWarning) as caught:
        result = evaluate_scores(labels, scores, n_bootstrap=10)
    assert len(caught) == 2
    assert len(result["warnings"]) == 2
    assert "0.01" in result["warnings"][0] and "100 non-members" in result["warnings"][0]
    assert "0.001" in result["warnings"][1] and "1000 non-members" in result["warnings"][1]


def test_non_finite_scores_are_an_error_not_dropped():
    labels, scores = _gaussian_scores(5, 5)
    scores[[2, 7]] = np.nan
    scores[4] = np.inf
    with pytest.raises(MiaGenError, match=r"3 of 10 scores are not finite \(2 NaN, 1 inf.*bug in the attack"):
        evaluate_scores(labels, scores)
    with pytest.raises(MiaGenError, match="first at index 2"):
        auc(labels, scores)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both classes.*0 non-member"),
        ([0, 0], [0.1, 0.2], "both classes.*0 member"),
        ([1, 0, 2], [0.1, 0.2, 0.3], "1 \\(member\\) or 0"),
        ([1, 0], [0.1, 0.2, 0.3], "same length"),
    ],
)
def test_bad_labels_are_errors_that_say_what_to_do(labels, scores, message):
    with pytest.raises(MiaGenError, match=message):
        evaluate_scores(labels, scores)


def test_bad_arguments_are_errors():
    with pytest.raises(MiaGenError, match="alpha"):
        tpr_at_fpr(TINY_LABELS, TINY_SCORES, 1.5)
    with pytest.raises(MiaGenError, match="Unknown metric 'ppv'.*tpr_at_fpr@"):
        bootstrap_ci(TINY_LABELS, TINY_SCORES, "ppv")
    with pytest.raises(MiaGenError, match="level"):
        bootstrap_ci(TINY_LABELS, TINY_SCORES, "auc", level=95)
    with pytest.raises(MiaGenError, match="n_bootstrap"):
        evaluate_scores(TINY_LABELS, TINY_SCORES, n_bootstrap=-1)


@pytest.mark.parametrize("seed", range(5))
def test_calibrated_sign_flips_exactly_when_the_calibration_auc_is_below_chance(seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.r_[np.ones(10, int), np.zeros(10, int)])
    scores = rng.normal(size=20) + (seed - 2) * 0.5 * labels
    assert calibrated_sign(labels, scores) == (-1 if _loop_auc(labels, scores) < 0.5 else 1)
    assert calibrated_sign(labels, np.zeros(20)) == 1  # a tie keeps the declared direction
