"""The sign of every attack's scores is fixed before evaluation (DESIGN.md "Sign is fixed before evaluation")."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mia_gen.errors import MiaGenError
from mia_gen.experiments.evaluation import evaluated_part, sign_mode


def _entry(scores, info=None):
    return {"record_ids": list(range(100, 100 + len(scores))), "scores": list(scores), "info": info or {},
            "neighbour_indices": None}


def _labelled(labels, n_labelled, seed):
    positions = np.sort(np.random.default_rng(seed).choice(len(labels), n_labelled, replace=False))
    return positions, labels[positions]


def test_inverted_scores_are_read_the_same_way_on_the_evaluated_records():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.r_[np.ones(40, int), np.zeros(60, int)])
    scores = rng.normal(size=100) + 0.8 * labels
    labelled = _labelled(labels, 20, seed=1)
    plain, inverted = evaluated_part(_entry(scores), labelled), evaluated_part(_entry(-scores), labelled)
    assert (plain["sign"], inverted["sign"]) == (1, -1)
    assert plain["sign_source"] == inverted["sign_source"] == "labelled_subset"
    kept = np.setdiff1d(np.arange(100), labelled[0])  # the labelled records are not evaluated
    assert plain["record_ids"] == inverted["record_ids"] == (100 + kept).tolist()
    np.testing.assert_array_equal(plain["scores"], inverted["scores"])
    assert roc_auc_score(labels[kept], inverted["scores"]) == roc_auc_score(labels[kept], scores[kept])


def test_declared_sign_keeps_every_record_and_the_attacks_direction():
    scores = np.linspace(1.0, -1.0, 10)
    part = evaluated_part(_entry(scores))
    assert (part["sign"], part["sign_source"]) == (1, "declared")
    np.testing.assert_array_equal(part["scores"], scores)


def test_an_attack_trained_on_its_labelled_subset_keeps_its_own_exclusion_and_sign():
    scores = -np.arange(10.0)  # would be flipped if the sign were learnt
    labels = np.r_[np.zeros(5, int), np.ones(5, int)]
    part = evaluated_part(_entry(scores, {"trained_on": [0, 1]}), _labelled(labels, 4, seed=0))
    assert (part["sign"], part["sign_source"]) == (1, "declared")
    assert part["record_ids"] == list(range(102, 110)) and part["scores"] == scores[2:].tolist()


def test_an_attack_at_chance_is_not_biased_upward():
    """max(AUC, 1 - AUC) on the evaluated records is above 0.5 on average for random scores; the
    sign learnt on the labelled subset is not (mean over many seeds ~ 0.5)."""
    signed, best_of_both = [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.r_[np.ones(64, int), np.zeros(64, int)])
        scores = rng.normal(size=128)
        labelled = _labelled(labels, 26, seed + 10_000)
        part = evaluated_part(_entry(scores), labelled)
        kept = part["kept"]
        signed.append(roc_auc_score(labels[kept], part["scores"]))
        raw = roc_auc_score(labels[kept], scores[kept])
        best_of_both.append(max(raw, 1 - raw))
    standard_error = np.std(signed) / np.sqrt(len(signed))
    assert abs(np.mean(signed) - 0.5) < 3 * standard_error
    assert np.mean(best_of_both) > 0.5 + 10 * standard_error  # ~0.55: the bias of fitting the sign on the test set


def test_an_unknown_sign_setting_says_what_to_use():
    with pytest.raises(MiaGenError, match="declared.*labelled_subset"):
        sign_mode({"sign": "max"})
    assert sign_mode({}) == "declared"
