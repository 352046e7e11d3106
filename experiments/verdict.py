"""The release gate's decision: PASS, FAIL or INCONCLUSIVE over a family of (attack, metric) checks.

`rule=simultaneous` (the default) is a statistical decision with simultaneous confidence (95% by
default) over the whole family: every attack x every metric with a threshold (`audit.max_auc`, `audit.max_tpr`
at `audit.at_fpr`), m checks, each interval at the Bonferroni level 1 - (1 - confidence) / m, so that all m
intervals hold together with the stated confidence.

- AUC: DeLong's interval around the empirical AUC of the evaluated (signed) scores (`mia_gen.auc_inference`).
  Leakage counts on both sides of 0.5: an AUC significantly below 1 - max_auc is as much leakage as one
  above max_auc (the sign fixed before evaluation can be wrong, the order is still there).
- TPR at FPR <= at_fpr: a stratified percentile bootstrap at the same level (`mia_gen.metrics.bootstrap_ci`).

A check FAILs when its whole interval lies beyond its threshold (significant leakage), PASSes when its
whole interval lies inside the allowed region, and is undecided otherwise. The verdict is FAIL when some
check fails, PASS only when every check passes, else INCONCLUSIVE, with the members / non-members that
would decide each undecided AUC check (Hanley & McNeil's variance at the observed AUC). A check cannot PASS
when records went unscored (they may be the leaking ones), when the non-members cannot resolve the FPR
(a TPR at FPR <= 1% needs >= 100 non-members), or with fewer than `MIN_RECORDS` members or non-members
(normal intervals do not hold there); each of these can still FAIL.

`rule=point` and `rule=lower_bound` are mia-gen's earlier rules, kept by name for comparison: the point
estimate, or the lower end of the per-attack 95% bootstrap interval, against the thresholds, with no
correction for testing several attacks and no INCONCLUSIVE.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import norm

from mia_gen.auc_inference import (bonferroni_level, delong_auc_variance, hanley_mcneil_variance, normal_interval,
                                   records_to_decide)
from mia_gen.errors import MiaGenError
from mia_gen.metrics import bootstrap_ci, fpr_is_resolvable, tpr_at_fpr

RULES = ("simultaneous", "point", "lower_bound")
MIN_RECORDS = 10  # members and non-members below which a check decides nothing (normal intervals)
MIN_BOOTSTRAP = 2000  # resamples of a TPR interval at a Bonferroni level (its tails hold a few resamples each)


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise MiaGenError(f"{name} must be a finite number or null, got {value!r}: a NaN or text threshold would "
                          f"turn the gate off (every comparison with NaN is false).")
    return float(value)


def check_settings(max_auc: Any, max_tpr: Any, rule: Any, at_fpr: Any = 0.01, confidence: Any = 0.95) -> None:
    """Refuse, before anything is computed, a gate that could not judge: no threshold, a threshold that is
    not a finite number in its range (NaN turns every comparison off), an unknown rule, a confidence
    outside (0.5, 1)."""
    if rule not in RULES:
        raise MiaGenError(f"audit.rule must be one of {RULES} (simultaneous: a statistical decision over every "
                          f"(attack, metric) check; point / lower_bound: the earlier rules), got {rule!r}.")
    max_auc, max_tpr = _number(max_auc, "audit.max_auc"), _number(max_tpr, "audit.max_tpr")
    at_fpr, confidence = _number(at_fpr, "audit.at_fpr"), _number(confidence, "audit.confidence")
    if max_auc is None and max_tpr is None:
        raise MiaGenError("the audit needs a threshold: set audit.max_auc (e.g. 0.6) and/or audit.max_tpr.")
    if max_auc is not None and not 0.5 < max_auc < 1.0:
        raise MiaGenError(f"audit.max_auc must lie in (0.5, 1): the AUC allowed on either side of chance (0.6 allows "
                          f"[0.4, 0.6]); got {max_auc}.")
    if at_fpr is None or not 0.0 < at_fpr < 1.0:
        raise MiaGenError(f"audit.at_fpr must lie in (0, 1), e.g. 0.01, got {at_fpr}.")
    if max_tpr is not None and not at_fpr < max_tpr < 1.0:
        raise MiaGenError(f"audit.max_tpr must lie in (audit.at_fpr, 1) = ({at_fpr:g}, 1): a model that leaks nothing "
                          f"has TPR = FPR = {at_fpr:g}, so a lower threshold could never pass; got {max_tpr}.")
    if confidence is None or not 0.5 < confidence < 1.0:
        raise MiaGenError(f"audit.confidence must lie in (0.5, 1), e.g. 0.95, got {confidence}.")


def at_fpr_key(values: Mapping, fpr: float) -> str:
    key = next((k for k in values if float(k) == float(fpr)), None)
    if key is None:
        raise MiaGenError(f"audit.at_fpr={fpr} is not among evaluation.alphas ({sorted(values)}); add it there.")
    return key


def verdict(results: Sequence[Mapping], max_auc: float | None, max_tpr: float | None, at_fpr: float,
            rule: str = "simultaneous", *, scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
            confidence: float = 0.95, n_bootstrap: int = MIN_BOOTSTRAP, seed: int = 0) -> dict:
    """The gate's decision over the attacks' `results` (attack entries of results.json).

    Args:
        results: each with `attack`, `access`, `auc`, `tpr_at_fpr`, `ci95`, `sign`, `sign_source`,
            `n_members`, `n_non_members`, `n_unscored` (results.json).
        scores: `{attack: (labels, scores)}`, the evaluated records' member labels and signed scores
            (scores.csv); required by `rule=simultaneous`.
        confidence: the simultaneous confidence of the family's intervals.
        n_bootstrap, seed: the TPR intervals' resamples (at least `MIN_BOOTSTRAP`).

    Returns:
        `{"outcome": PASS | FAIL | INCONCLUSIVE, "passed": outcome == PASS, "rule", "max_auc", "max_tpr",
        "at_fpr", "confidence", "n_checks", "check_level", "attacks": [row per attack]}`; each row holds
        the estimates, `checks` (metric, threshold, estimate, interval, decision, records to decide), `reasons`
        (why it fails), `notes` and `decision` (fail | pass | inconclusive).
    """
    check_settings(max_auc, max_tpr, rule, at_fpr, confidence)
    if rule != "simultaneous":
        return _legacy(results, max_auc, max_tpr, at_fpr, rule)
    if scores is None:
        raise MiaGenError("rule=simultaneous needs each attack's evaluated scores (scores.csv).")
    thresholds = [(metric, limit) for metric, limit in (("auc", max_auc), ("tpr", max_tpr)) if limit is not None]
    n_checks = len(results) * len(thresholds)
    level = bonferroni_level(confidence, n_checks)
    nothing = (np.zeros(0, dtype=int), np.zeros(0))  # an attack that scored none of the evaluated records
    rows = [_simultaneous_row(result, scores.get(result["attack"], nothing), thresholds, at_fpr, level,
                              max(int(n_bootstrap), MIN_BOOTSTRAP), seed) for result in results]
    outcome = combined(row["decision"] for row in rows).upper()  # FAIL | PASS | INCONCLUSIVE
    return {"outcome": outcome, "passed": outcome == "PASS", "rule": rule, "max_auc": max_auc, "max_tpr": max_tpr,
            "at_fpr": at_fpr, "confidence": confidence, "n_checks": n_checks, "check_level": level,
            "attacks": rows}


def combined(decisions) -> str:
    """One decision of several: "fail" when any fails, "pass" only when all pass, else "inconclusive"."""
    decisions = set(decisions)
    return "fail" if "fail" in decisions else ("pass" if decisions == {"pass"} else "inconclusive")


def _simultaneous_row(result: Mapping, evaluated: tuple[np.ndarray, np.ndarray], thresholds, at_fpr: float,
                      level: float, n_bootstrap: int, seed: int) -> dict:
    labels, signed = np.asarray(evaluated[0]), np.asarray(evaluated[1], dtype=np.float64)
    n_members, n_non_members = int((labels == 1).sum()), int((labels == 0).sum())
    n_unscored = int(result.get("n_unscored") or 0)
    row = {"attack": result["attack"], "access": result["access"], "sign": result.get("sign", 1),
           "sign_source": result.get("sign_source", "declared"), "n_members": n_members,
           "n_non_members": n_non_members, "n_unscored": n_unscored, "checks": [], "reasons": [], "notes": []}
    too_few = min(n_members, n_non_members) < MIN_RECORDS
    if too_few:
        row["notes"].append(f"{n_members} members and {n_non_members} non-members: below {MIN_RECORDS} of either, "
                            "intervals are unreliable and no check decides; evaluate on more records.")
    if n_unscored:
        row["notes"].append(f"{n_unscored} record(s) have no score ({'; '.join(result.get('unscored_reasons') or [])})"
                            ": they may be the leaking ones, so this attack cannot pass until they are scored.")
    for metric, limit in thresholds:
        if too_few:
            check = {"metric": metric, "threshold": limit, "estimate": None, "interval": None,
                     "decision": "inconclusive", "records_to_decide": {"members": max(MIN_RECORDS, n_members),
                                                                       "non_members": max(MIN_RECORDS, n_non_members)}}
        else:
            check = (_auc_check if metric == "auc" else _tpr_check)(labels, signed, limit, at_fpr, level,
                                                                    n_bootstrap, seed)
        if n_unscored and check["decision"] == "pass":
            check["decision"] = "inconclusive"
        if check["decision"] == "fail":
            row["reasons"].append(check["why"])
        row["checks"].append(check)
        row.update({metric: check["estimate"], f"{metric}_interval": check["interval"]})
    if "tpr" not in row and "tpr_at_fpr" in result:  # shown, not tested: no TPR threshold
        row.update(tpr=float(result["tpr_at_fpr"][at_fpr_key(result["tpr_at_fpr"], at_fpr)]), tpr_interval=None)
    row["decision"] = combined(check["decision"] for check in row["checks"])
    row["passed"] = row["decision"] == "pass"
    return row


def _auc_check(labels, scores, max_auc: float, at_fpr: float, level: float, n_bootstrap: int, seed: int) -> dict:
    auc, variance = delong_auc_variance(labels, scores)
    n_members, n_non_members = int((labels == 1).sum()), int((labels == 0).sum())
    variance = max(variance, hanley_mcneil_variance(auc, n_members, n_non_members))  # DeLong's is 0 at ties
    lo, hi = normal_interval(auc, variance, level)
    check = {"metric": "auc", "threshold": max_auc, "allowed": [1.0 - max_auc, max_auc], "estimate": auc,
             "interval": [lo, hi], "se": math.sqrt(variance), "records_to_decide": None}
    if lo > max_auc:
        check.update(decision="fail", why=f"AUC {auc:.3f}, interval [{lo:.3f}, {hi:.3f}] above max_auc {max_auc}")
    elif hi < 1.0 - max_auc:
        check.update(decision="fail", why=f"AUC {auc:.3f}, interval [{lo:.3f}, {hi:.3f}] below 1 - max_auc = "
                                          f"{1.0 - max_auc:.3f}: members are told apart with the order inverted")
    elif lo > 1.0 - max_auc and hi < max_auc:
        check["decision"] = "pass"
    else:
        check["decision"] = "inconclusive"
        inside = 1.0 - max_auc < auc < max_auc
        gap = min(max_auc - auc, auc - (1.0 - max_auc)) if inside else max(auc - max_auc, 1.0 - max_auc - auc)
        needed = records_to_decide(auc, gap, n_members, n_non_members, level)
        check["records_to_decide"] = None if needed is None else {"members": needed[0], "non_members": needed[1]}
    return check


def _tpr_check(labels, scores, max_tpr: float, at_fpr: float, level: float, n_bootstrap: int, seed: int) -> dict:
    tpr = float(tpr_at_fpr(labels, scores, at_fpr))
    lo, hi = bootstrap_ci(labels, scores, f"tpr_at_fpr@{at_fpr}", n_bootstrap, level, seed)
    n_members, n_non_members = int((labels == 1).sum()), int((labels == 0).sum())
    resolvable = fpr_is_resolvable(at_fpr, n_non_members)
    check = {"metric": "tpr", "threshold": max_tpr, "at_fpr": at_fpr, "estimate": tpr, "interval": [lo, hi],
             "resolvable": resolvable, "records_to_decide": None}
    if lo > max_tpr:  # unresolvable too: the TPR at zero false positives bounds the one at FPR <= at_fpr below
        check.update(decision="fail", why=f"TPR@{at_fpr:g}FPR {tpr:.3f}, interval [{lo:.3f}, {hi:.3f}] above "
                                          f"max_tpr {max_tpr}")
    elif hi < max_tpr and resolvable:
        check["decision"] = "pass"
    else:
        check["decision"] = "inconclusive"
        # binomial width of the TPR among members, with enough non-members to resolve the FPR
        gap = abs(max_tpr - tpr)
        z = float(norm.ppf((1.0 + level) / 2.0))
        members = math.ceil(z * z * max(tpr * (1.0 - tpr), 1.0 / n_members) / gap ** 2) if gap > 0 else None
        non_members = max(n_non_members, math.ceil(1.0 / at_fpr - 1e-9))
        check["records_to_decide"] = None if members is None else {"members": max(members, n_members),
                                                                   "non_members": non_members}
    return check


def _legacy(results: Sequence[Mapping], max_auc, max_tpr, at_fpr: float, rule: str) -> dict:
    """`rule=point` / `rule=lower_bound`: mia-gen's earlier gate (no multiplicity, no INCONCLUSIVE)."""
    rows = []
    for result in results:
        key = at_fpr_key(result["tpr_at_fpr"], at_fpr)
        ci95 = result.get("ci95") or {}
        row = {"attack": result["attack"], "access": result["access"],
               "sign": result.get("sign", 1), "sign_source": result.get("sign_source", "declared"),
               "auc": float(result["auc"]), "ci95": ci95.get("auc"),
               "tpr": float(result["tpr_at_fpr"][key]), "tpr_ci95": (ci95.get("tpr_at_fpr") or {}).get(key),
               "reasons": [], "notes": []}
        n_non_members = result.get("n_non_members")
        if n_non_members is not None and not fpr_is_resolvable(at_fpr, int(n_non_members)):
            row["notes"].append(f"only {n_non_members} non-members: the TPR at FPR {at_fpr:g} is the TPR at zero "
                                f"false positives (evaluate on at least {math.ceil(1 / at_fpr - 1e-9)} non-members).")
        for metric, limit, name in (("auc", max_auc, "AUC"), ("tpr", max_tpr, f"TPR@{at_fpr:g}FPR")):
            if limit is None:
                continue
            interval = row["ci95" if metric == "auc" else "tpr_ci95"]
            if rule == "lower_bound" and interval is None:
                raise MiaGenError("audit.rule=lower_bound needs the 95% intervals; set evaluation.n_bootstrap "
                                  "> 0 (e.g. 1000) or use audit.rule=point.")
            read = row[metric] if rule == "point" else float(interval[0])
            if read > limit:
                what = f"{name} {row[metric]:.3f}" if rule == "point" else \
                    f"{name} {row[metric]:.3f}, 95% CI lower bound {read:.3f},"
                row["reasons"].append(f"{what} > max_{metric} {limit}")
        if row["ci95"] is not None and row["ci95"][1] < 0.5:
            row["notes"].append(
                f"AUC significantly below 0.5: the scores separate members in the direction opposite to "
                f"the {row['sign_source']} sign, so this row may understate leakage"
                + (" (use audit.sign=labelled_subset)." if row["sign_source"] == "declared" else
                   " (the labelled subset is too small to fix the sign: raise evaluation.labelled_fraction)."))
        row["passed"] = not row["reasons"]
        row["decision"] = "pass" if row["passed"] else "fail"
        rows.append(row)
    passed = all(r["passed"] for r in rows)
    return {"outcome": "PASS" if passed else "FAIL", "passed": passed, "max_auc": max_auc, "max_tpr": max_tpr,
            "at_fpr": at_fpr, "rule": rule, "attacks": rows}
