"""The blind baseline: members told from non-members without the model flag a distribution-shifted split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mia_gen.blind_baseline import blind_baseline, out_of_fold_scores
from mia_gen.datasets import load_dataset
from mia_gen.experiments import evaluation
from mia_gen.errors import MiaGenError
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.splits import Split
from mia_gen.experiments.tracking import Tracker
from test_pipeline import MEMORIZER, make_config


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


def _shifted_split(digits, n_members=64, n_non_members=256, n_reference=400, seed=0):
    """Members are digits 0-4, non-members (and reference records) digits 5-9."""
    classes = digits.labels.numpy()
    rng = np.random.default_rng(seed)
    low, high = rng.permutation(np.flatnonzero(classes < 5)), rng.permutation(np.flatnonzero(classes >= 5))
    return Split(dataset=digits.name, fingerprint=digits.fingerprint, seed=seed, members=low[:n_members],
                 non_members=high[:n_non_members], reference=high[n_non_members:n_non_members + n_reference],
                 n_records=len(digits))


def test_members_of_other_classes_are_told_apart_without_the_model(digits):
    split = _shifted_split(digits)
    ids = np.r_[split.members, split.non_members]
    labels = np.r_[np.ones(64, int), np.zeros(256, int)]
    result = blind_baseline(digits.get(ids), labels, seed=0, n_bootstrap=200)
    assert result["shifted"] and result["auc"] > 0.85 and result["ci95"][0] > 0.5
    assert "DISTRIBUTION SHIFT" in result["message"] and "overstates" in result["message"]


def test_random_splits_are_rarely_flagged(digits):
    labels = np.r_[np.ones(64, int), np.zeros(256, int)]
    results = [blind_baseline(digits.get(np.random.default_rng(seed).permutation(len(digits))[:320]), labels,
                              seed=seed, n_bootstrap=200) for seed in range(10)]
    assert abs(np.mean([r["auc"] for r in results]) - 0.5) < 0.05
    assert sum(r["shifted"] for r in results) <= 1  # a test at level 0.01: ~1 in 100 random splits by chance
    assert all(r["p_value"] >= 1 / 201 and r["null_auc_95"] > 0.5 for r in results)


def test_the_shift_test_is_calibrated_where_the_bootstrap_interval_was_not(digits):
    """The random 64 / 256 digit split of seed 2 reaches AUC 0.61, above its bootstrap interval's 0.5 (the
    former rule flagged it), but shuffled labels reach that often enough: the permutation test keeps it."""
    from mia_gen.splits import make_split

    split = make_split(digits, 64, 256, 0, 2)
    ids = np.sort(np.r_[split.members, split.non_members])
    result = blind_baseline(digits.get(ids), np.isin(ids, split.members).astype(int), seed=2, n_bootstrap=300)
    assert result["auc"] > 0.58 and result["ci95"][0] > 0.5  # the interval alone would call it shifted
    assert not result["shifted"] and result["p_value"] > 0.01 and result["null_auc_95"] > result["auc"] - 0.05


def test_out_of_fold_scores_never_see_their_own_record():
    """Each record is scored by a fold fitted without it, so noise features stay at chance; a shift in
    one column of a badly scaled tabular record is found (columns are standardised)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 5))
    labels = rng.permutation(np.r_[np.ones(100, int), np.zeros(100, int)])
    scores = out_of_fold_scores(features, labels, seed=0)
    assert scores.shape == (200,) and abs(roc_auc_score(labels, scores) - 0.5) < 0.12
    shifted = features + 1.0 * labels[:, None] * np.r_[1.0, np.zeros(4)] * 1000  # tabular: standardised
    assert roc_auc_score(labels, out_of_fold_scores(shifted, labels, seed=0)) > 0.99


def test_too_few_records_for_cross_validation_say_what_to_do():
    with pytest.raises(MiaGenError, match="blind_baseline=false"):
        blind_baseline(np.zeros((5, 3)), np.array([1, 0, 0, 0, 0]), seed=0)


class _Recorder(Tracker):
    """Keeps what the run would log to W&B."""

    def __init__(self):
        self.summary = {}

    def log_summary(self, summary):
        self.summary.update(summary)


def test_a_shifted_split_is_flagged_in_results_report_and_wandb_a_random_one_is_not(tmp_path, digits, monkeypatch):
    trackers = []
    monkeypatch.setattr(evaluation, "make_tracker",
                        lambda *args, **kwargs: trackers.append(_Recorder()) or trackers[-1])
    path = tmp_path / "shifted.json"
    _shifted_split(digits, n_members=100, n_non_members=100).save(path)
    runs = {"shifted": [f"split.path={path}"], "random": []}
    for name, overrides in runs.items():
        cfg = make_config(MEMORIZER + ["attack=[sample_distance,monte_carlo]", "sampling.n_samples=1000",
                                       "evaluation.sign=labelled_subset", *overrides], tmp_path / "cache")
        Pipeline(cfg, tmp_path / name).run()
        results = json.loads((tmp_path / name / "results.json").read_text())
        blind = results["blind_baseline"]
        report = (tmp_path / name / "report.md").read_text()
        assert blind["shifted"] is (name == "shifted"), blind
        assert ("WARNING: distribution-shifted split" in report) is (name == "shifted")
        assert f"{blind['auc']:.3f}" in report
        logged = trackers[-1].summary
        assert logged["blind_baseline"]["shifted"] is blind["shifted"]
        assert ("DISTRIBUTION SHIFT" in logged.get("warning", "")) is (name == "shifted")
        assert logged["sample_distance"]["sign_source"] == "labelled_subset"
        for entry in results["attacks"]:  # 20% of the 200 queries fix the sign and are not evaluated
            assert entry["sign_source"] == "labelled_subset" and entry["sign"] in (1, -1)
            assert entry["n_members"] + entry["n_non_members"] == 160
        with open(tmp_path / name / "scores.csv") as handle:
            rows = [row for row in csv.DictReader(handle) if row["attack"] == "sample_distance"]
        (entry,) = [e for e in results["attacks"] if e["attack"] == "sample_distance"]
        labels = [int(row["is_member"]) for row in rows]
        assert roc_auc_score(labels, [float(row["score"]) for row in rows]) == pytest.approx(entry["auc"])
