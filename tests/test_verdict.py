"""The gate's statistical decision (experiments/verdict.py, mia_gen/auc_inference.py): intervals against plain
references, error rates on simulated scores with known AUC, and each case's outcome and exit code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

import mia_gen.experiments.audit as gate
from mia_gen.auc_inference import (bonferroni_level, delong_auc_variance, hanley_mcneil_variance, normal_interval,
                                   records_to_decide)
from mia_gen.errors import MiaGenError
from mia_gen.experiments.verdict import MIN_RECORDS, check_settings, verdict
from test_audit import run_console


def binormal(auc: float, n_members: int, n_non_members: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores whose true AUC is `auc`: members N(d, 1), non-members N(0, 1), AUC = Phi(d / sqrt 2)."""
    d = math.sqrt(2.0) * norm.ppf(auc)
    scores = np.r_[rng.normal(d, 1.0, n_members), rng.normal(0.0, 1.0, n_non_members)]
    return np.r_[np.ones(n_members, dtype=int), np.zeros(n_non_members, dtype=int)], scores


def result(name: str, labels, scores, n_unscored: int = 0) -> dict:
    """A results.json attack entry (what the gate reads beside the scores)."""
    return {"attack": name, "access": "samples", "auc": float(roc_auc_score(labels, scores)), "sign": 1,
            "sign_source": "labelled_subset", "tpr_at_fpr": {"0.1": 0.0, "0.01": 0.0}, "ci95": {},
            "n_members": int(labels.sum()), "n_non_members": int((1 - labels).sum()), "n_unscored": n_unscored,
            "unscored_reasons": ["no IN shadow"] if n_unscored else []}


def decide(attacks: dict, max_auc=0.6, max_tpr=None, at_fpr=0.01, **kwargs) -> dict:
    """verdict() over `{name: (labels, scores)}`."""
    results = [result(name, *pair) for name, pair in attacks.items()]
    return verdict(results, max_auc, max_tpr, at_fpr, scores=attacks, **kwargs)


def plain_delong(labels, scores) -> tuple[float, float]:
    """DeLong et al. (1988) as written: psi over every (member, non-member) pair, then the two variances."""
    members, non_members = scores[labels == 1], scores[labels == 0]
    psi = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in non_members] for x in members])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(members) + v01.var(ddof=1) / len(non_members))


@pytest.mark.parametrize("seed", range(4))
def test_delong_equals_the_pairwise_definition_ties_included(seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.r_[np.ones(23, dtype=int), np.zeros(31, dtype=int)])
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties, within and across the classes
    auc, variance = delong_auc_variance(labels, scores)
    reference_auc, reference_variance = plain_delong(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12) == pytest.approx(reference_auc, abs=1e-12)
    assert variance == pytest.approx(reference_variance, rel=1e-10)


def test_hanley_mcneil_is_its_closed_form_and_matches_the_spread_of_simulated_aucs():
    a, m, n = 0.8, 40, 60
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    assert hanley_mcneil_variance(a, m, n) == pytest.approx((a * (1 - a) + (m - 1) * (q1 - a * a)
                                                             + (n - 1) * (q2 - a * a)) / (m * n))
    assert hanley_mcneil_variance(0.5, 100, 100) == pytest.approx(200 / (12 * 100 * 100), rel=0.02)
    rng = np.random.default_rng(0)
    simulated = [roc_auc_score(*binormal(a, m, n, rng)) for _ in range(2000)]
    assert math.sqrt(hanley_mcneil_variance(a, m, n)) == pytest.approx(np.std(simulated), rel=0.1)


def test_intervals_levels_and_the_records_that_would_decide():
    assert bonferroni_level(0.95, 1) == 0.95 and bonferroni_level(0.95, 4) == pytest.approx(0.9875)
    assert normal_interval(0.99, 0.01, 0.95)[1] == 1.0 and normal_interval(0.01, 0.01, 0.95)[0] == 0.0
    level = bonferroni_level(0.95, 3)
    members, non_members = records_to_decide(0.55, 0.05, 64, 256, level)
    assert non_members == pytest.approx(4 * members, abs=4)  # scaled together from the current sizes
    z = norm.ppf((1 + level) / 2)
    assert z * math.sqrt(hanley_mcneil_variance(0.55, members, non_members)) < 0.05
    assert z * math.sqrt(hanley_mcneil_variance(0.55, members - 2, non_members - 8)) >= 0.05
    assert records_to_decide(0.6, 0.0, 64, 64, level) is None  # on the threshold: no size decides
    for bad in (0.0, 1.0):
        with pytest.raises(MiaGenError, match="confidence"):
            bonferroni_level(bad, 2)


@pytest.mark.parametrize("n_attacks", [1, 3])
def test_an_auc_at_the_threshold_passes_in_at_most_5_percent_of_draws(n_attacks):
    """The gate's promise: a PASS is evidence. One attack's true AUC sits at max_auc (the others leak nothing);
    over 400 draws of 150 + 150 records, the gate passes at most 5% of them (and fails at most 5%)."""
    rng = np.random.default_rng(n_attacks)
    outcomes = []
    for _ in range(400):
        attacks = {"at_threshold": binormal(0.6, 150, 150, rng)}
        attacks.update({f"chance_{i}": binormal(0.5, 150, 150, rng) for i in range(n_attacks - 1)})
        outcomes.append(decide(attacks, max_auc=0.6)["outcome"])
    assert outcomes.count("PASS") / len(outcomes) <= 0.05
    assert outcomes.count("FAIL") / len(outcomes) <= 0.05


def test_the_gate_has_power_on_both_sides():
    rng = np.random.default_rng(7)
    clean = [decide({"a": binormal(0.5, 300, 300, rng), "b": binormal(0.5, 300, 300, rng)})["outcome"]
             for _ in range(50)]
    leaky = [decide({"a": binormal(0.75, 300, 300, rng), "b": binormal(0.5, 300, 300, rng)})["outcome"]
             for _ in range(50)]
    # two checks at 300 + 300: each interval is +-0.053, so a clean pair passes with probability ~0.9
    assert clean.count("PASS") >= 40 and leaky.count("FAIL") >= 49


def test_each_case_gets_its_outcome():
    rng = np.random.default_rng(1)
    labels, scores = binormal(0.58, 16, 16, rng)
    # the weak leak: 16 members at AUC ~0.58 [0.50, 0.69] passed the point rule; now it is undecided
    weak = decide({"a": (labels, scores)}, max_auc=0.65)
    assert weak["outcome"] == "INCONCLUSIVE" and weak["attacks"][0]["checks"][0]["records_to_decide"]["members"] > 16
    inverted = decide({"a": binormal(0.2, 100, 100, rng)})
    (row,) = inverted["attacks"]
    assert inverted["outcome"] == "FAIL" and "below 1 - max_auc" in row["reasons"][0]  # leakage below 0.5 counts
    clean_pair = binormal(0.5, 400, 400, rng)
    assert decide({"a": clean_pair})["outcome"] == "PASS"
    unscored = verdict([result("a", *clean_pair, n_unscored=3)], 0.6, None, 0.01, scores={"a": clean_pair})
    assert unscored["outcome"] == "INCONCLUSIVE" and "cannot pass" in unscored["attacks"][0]["notes"][0]
    leaky_unscored = binormal(0.9, 100, 100, rng)
    assert verdict([result("a", *leaky_unscored, n_unscored=3)], 0.6, None, 0.01,
                   scores={"a": leaky_unscored})["outcome"] == "FAIL"
    few = decide({"a": binormal(0.99, MIN_RECORDS - 1, 50, rng)})
    assert few["outcome"] == "INCONCLUSIVE" and f"below {MIN_RECORDS}" in few["attacks"][0]["notes"][0]
    missing = verdict([result("a", *clean_pair)], 0.6, None, 0.01, scores={})  # scored none of the records
    assert missing["outcome"] == "INCONCLUSIVE"


def test_a_tpr_that_the_non_members_cannot_resolve_never_passes():
    rng = np.random.default_rng(2)
    clean = binormal(0.5, 200, 50, rng)  # 50 non-members cannot show FPR 1%
    decision = decide({"a": clean}, max_auc=None, max_tpr=0.5, at_fpr=0.01, n_bootstrap=2000)
    (check,) = decision["attacks"][0]["checks"]
    assert check["resolvable"] is False and check["decision"] == "inconclusive"
    assert check["records_to_decide"]["non_members"] >= 100
    labels = np.r_[np.ones(200, dtype=int), np.zeros(50, dtype=int)]
    separated = (labels, labels + rng.normal(0, 0.01, 250))  # the TPR at zero false positives already exceeds it
    assert decide({"a": separated}, max_auc=None, max_tpr=0.5, at_fpr=0.01)["outcome"] == "FAIL"
    resolvable = binormal(0.5, 400, 400, rng)
    assert decide({"a": resolvable}, max_auc=None, max_tpr=0.1, at_fpr=0.01)["outcome"] == "PASS"


@pytest.mark.parametrize("max_auc, max_tpr, rule, at_fpr, confidence, message", [
    (float("nan"), None, "simultaneous", 0.01, 0.95, "finite number"),
    (None, float("nan"), "simultaneous", 0.01, 0.95, "finite number"),
    (1.5, None, "simultaneous", 0.01, 0.95, r"\(0.5, 1\)"),
    (0.4, None, "simultaneous", 0.01, 0.95, r"\(0.5, 1\)"),
    ("high", None, "simultaneous", 0.01, 0.95, "finite number"),
    (True, None, "simultaneous", 0.01, 0.95, "finite number"),
    (None, 0.01, "simultaneous", 0.01, 0.95, "could never pass"),
    (0.6, None, "simultaneous", 0.01, 1.0, "audit.confidence"),
    (0.6, None, "median", 0.01, 0.95, "audit.rule must be one of"),
    (None, None, "simultaneous", 0.01, 0.95, "needs a threshold"),
])
def test_every_threshold_is_checked_before_any_work(max_auc, max_tpr, rule, at_fpr, confidence, message):
    with pytest.raises(MiaGenError, match=message):
        check_settings(max_auc, max_tpr, rule, at_fpr, confidence)


def run_main(monkeypatch, capsys, argv, outcomes=(), hydra_exit=None):
    """gate.main() with a stand-in Hydra job that records `outcomes` (and exits as Hydra would)."""
    def job():
        gate._outcomes.extend(outcomes)
        if hydra_exit is not None:
            raise SystemExit(hydra_exit)

    monkeypatch.setattr(gate, "audit_job", job)
    return run_console(monkeypatch, capsys, argv)


def test_a_multirun_exits_with_its_most_serious_job_and_names_each(monkeypatch, capsys):
    fail, none, open_, ok = ((gate.FAILED, "FAILED (pia)", "job 0"), (gate.NO_VERDICT, "error: bad", "job 1"),
                             (gate.INCONCLUSIVE, "INCONCLUSIVE (pia undecided)", "job 2"), (gate.PASSED, "PASSED", "job 3"))
    code, err = run_main(monkeypatch, capsys, ["-m"], [none, fail, ok])
    assert code == 1 and "job 0: FAILED (pia)" in err and "job 1: error: bad" in err  # the FAIL is not lost
    assert err.strip().splitlines()[-1] == "mia-gen-audit: FAILED (pia) [job 0]"
    assert run_main(monkeypatch, capsys, ["-m"], [none, open_, ok])[0] == 2
    assert run_main(monkeypatch, capsys, ["-m"], [ok, open_])[0] == 3
    assert run_main(monkeypatch, capsys, ["-m"], [ok, ok])[0] == 0
    code, err = run_main(monkeypatch, capsys, ["-m"], [ok], hydra_exit=1)  # a later job failed inside Hydra
    assert code == 2 and "Hydra" in err
    code, err = run_main(monkeypatch, capsys, [], [ok])
    assert code == 0 and err.strip() == "mia-gen-audit: PASSED"  # one job: one line


def test_a_run_that_audits_nothing_is_no_verdict_except_help(monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, ["--cfg", "job"])
    assert code == 2 and "nothing was audited" in err
    assert run_main(monkeypatch, capsys, ["--help"])[0] == 0
