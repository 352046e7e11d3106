"""The release gate: run the attacks an access level allows and fail when leakage passes a threshold.

`mia-gen-audit` (experiments/audit.py) runs the pipeline on a trained model (`model.checkpoint`), a
sample store (`sampling.store`) or a synthetic dataset (`synthetic.path`). A target this run did not
train needs its true training membership (`split.path` or `split.members_file`), or the gate stops:
a random split would test random records. `verdict()` then compares every attack with
`audit.max_auc` and `audit.max_tpr` (at `audit.at_fpr`), by the point estimate or, with
`audit.rule=lower_bound`, by the lower end of its 95% interval. The AUC is the signed `auc` of
results.json, never max(AUC, 1 - AUC): with `audit.sign=labelled_subset` (the default) each attack's
sign is learnt on the labelled calibration subset, which is then left out, so leakage with the
wrong sign is caught without fitting the sign on the evaluated records. When the blind baseline
tells members from non-members without the model, the verdict says the split is shifted.

`audit.md` / `audit.json` in the run directory (written before any W&B call) say which attack
failed and which records were most exposed (highest scores, with their nearest generated samples
in nearest_neighbours.png). Exit codes (experiments/audit.py): 0 passed, 1 failed, 2 no verdict
(usage or config error, crash).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mia_gen.errors import MiaGenError
from mia_gen.metrics import fpr_is_resolvable
from mia_gen.splits import membership_source

log = logging.getLogger(__name__)

# What each access level allows, by model family (synthetic data: samples only).
ATTACKS_BY_ACCESS = {
    "samples": ["sample_distance", "monte_carlo", "domias"],
    "query": {"gan": ["latent_inversion_pbb"]},
    "white_box": {"gan": ["latent_inversion", "logan"],
                  "diffusion": ["diffusion_loss", "secmi_stat", "pia"]},
}
ACCESS_LEVELS = ("samples", "query", "white_box")


def attacks_for_access(access: str, family: str | None) -> list[str]:
    """Attack names an adversary with `access` can run against a model of `family` (None: synthetic data)."""
    if access not in ACCESS_LEVELS:
        raise MiaGenError(f"audit.access must be one of {ACCESS_LEVELS} (or null to use `attack=`), got {access!r}.")
    names = list(ATTACKS_BY_ACCESS["samples"])
    if family is None:
        if access != "samples":
            raise MiaGenError(f"a synthetic dataset gives samples only; audit.access={access} needs a model "
                              "(model.checkpoint=<dir>).")
        return names
    for level in ACCESS_LEVELS[1 : ACCESS_LEVELS.index(access) + 1]:
        names += ATTACKS_BY_ACCESS[level].get(family, [])
    return names


def select_attacks(cfg: DictConfig, config_dir: str) -> DictConfig:
    """`cfg` with `attack` replaced by the attacks `audit.access` allows (each from configs/attack/)."""
    access = cfg.audit.get("access")
    if access is None:
        return cfg
    family = None if (cfg.get("synthetic") or {}).get("path") else cfg.model.family
    attacks = {}
    for name in attacks_for_access(access, family):
        attacks.update(OmegaConf.load(Path(config_dir) / "attack" / f"{name}.yaml"))
    if cfg.split.n_reference == 0:
        attacks.pop("domias", None)  # needs reference records
    overrides = cfg.audit.get("attack_overrides") or {}
    with open_dict(cfg):
        cfg.attack = OmegaConf.merge(OmegaConf.create(attacks), overrides)
    return cfg


RULES = ("point", "lower_bound")
SIGNS = ("labelled_subset", "declared")


def _at_fpr_key(values: Mapping, fpr: float) -> str:
    key = next((k for k in values if float(k) == float(fpr)), None)
    if key is None:
        raise MiaGenError(f"audit.at_fpr={fpr} is not among evaluation.alphas ({sorted(values)}); add it there.")
    return key


def check_settings(max_auc: float | None, max_tpr: float | None, rule: str) -> None:
    """Refuse a gate without a threshold or with an unknown rule (before anything is computed)."""
    if max_auc is None and max_tpr is None:
        raise MiaGenError("the audit needs a threshold: set audit.max_auc (e.g. 0.6) and/or audit.max_tpr.")
    if rule not in RULES:
        raise MiaGenError(f"audit.rule must be one of {RULES} (point: the estimate; lower_bound: the lower end "
                          f"of its 95% interval), got {rule!r}.")


def verdict(results: Sequence[Mapping], max_auc: float | None, max_tpr: float | None, at_fpr: float,
            rule: str = "point") -> dict:
    """Per attack: its leakage and whether it passes; `passed` is True only if every attack does.

    Each result is an attack entry of results.json: `auc` (of the signed scores, in [0, 1]),
    `ci95["auc"]` and `ci95["tpr_at_fpr"][alpha]` (`[lo, hi]`, or None without a bootstrap),
    `tpr_at_fpr[alpha]`. Each row carries the AUC, its interval and the TPR at `at_fpr` (with its
    interval). `rule="point"` compares the estimates with the thresholds (the conservative default
    of a release gate); `rule="lower_bound"` compares the lower ends of the 95% intervals, so an
    attack fails only on leakage significantly above the threshold. AUC is read as written, never as
    max(AUC, 1 - AUC): the sign was fixed before the evaluated records were seen.
    """
    check_settings(max_auc, max_tpr, rule)
    rows = []
    for result in results:
        key = _at_fpr_key(result["tpr_at_fpr"], at_fpr)
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
        rows.append(row)
    return {"passed": all(r["passed"] for r in rows), "max_auc": max_auc, "max_tpr": max_tpr,
            "at_fpr": at_fpr, "rule": rule, "attacks": rows}


def shift_warning(blind_baseline: Mapping | None) -> str | None:
    """The gate's warning when the blind baseline (results.json) tells members from non-members
    without the model: the split is distribution-shifted and every attack AUC overstates leakage."""
    if not blind_baseline or not blind_baseline.get("shifted"):
        return None
    lo, hi = blind_baseline["ci95"]
    return (f"THE SPLIT IS DISTRIBUTION-SHIFTED: {blind_baseline['method']} tells members from non-members "
            f"WITHOUT the model (AUC {blind_baseline['auc']:.3f} [{lo:.3f}, {hi:.3f}]), so every attack AUC here "
            "overstates leakage: a pass stands, a failure may be the shift rather than the model. Draw members "
            "and non-members from the same distribution.")


def membership(pipeline) -> str:
    """Where the audited target's training membership comes from, in words.

    Raises:
        MiaGenError: the target (a checkpoint, sample store or synthetic dataset) was not trained
            by this run and neither `split.path` nor `split.members_file` (nor `split.secmi_npz`)
            is given: a random split would test random records and pass a leaky release.
    """
    split = pipeline.cfg.split
    source = membership_source(split)
    if source is None:
        target = pipeline.external_target
        if target is not None:
            raise MiaGenError(
                f"mia-gen-audit needs the true training membership of {target}, which this run did not train: "
                "with a random split its 'members' would be random records and a leaky release would pass. "
                "Give split.path=<split.json> (members, non-members, reference; Split.save writes one) or "
                "split.members_file=<file> (the training record ids, one per line, a JSON list or a .npy array; "
                "non-members and reference records are then drawn from the other records)."
            )
        return f"the split this run trained the model on (drawn with seed {split.seed})"
    return {"path": f"split file {split.path}", "secmi_npz": f"SecMI / PIA split file {split.secmi_npz}",
            "members_file": f"members file {split.members_file} (non-members and reference records drawn "
                            f"with seed {split.seed} from the other records)"}[source]


def evaluated_ids(scores_csv: Path) -> dict[str, np.ndarray]:
    """Per attack, the record ids it was evaluated on (the rows of the run's scores.csv)."""
    ids: dict[str, list[int]] = {}
    with open(scores_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            ids.setdefault(row["attack"], []).append(int(row["record_id"]))
    return {name: np.asarray(values) for name, values in ids.items()}


def most_exposed(scored: Mapping[str, Mapping], evaluated: Mapping[str, np.ndarray], signs: Mapping[str, int],
                 members: np.ndarray, top: int) -> list[dict]:
    """The evaluated members with the highest signed score under each attack (what a release would give
    away first). `scored`: cached attack entries (`record_ids`, `scores`); `evaluated`: the ids each
    attack was evaluated on; `signs`: each attack's sign (+1 / -1, results.json)."""
    exposed = []
    for name, entry in scored.items():
        ids = np.asarray(entry["record_ids"])
        scores = int(signs.get(name, 1)) * np.asarray(entry["scores"], dtype=float)
        keep = np.isin(ids, members) & np.isin(ids, evaluated.get(name, ids))
        order = np.argsort(-scores[keep], kind="stable")[:top]
        exposed.append({"attack": name, "records": [
            {"record_id": int(i), "score": float(v)} for i, v in zip(ids[keep][order], scores[keep][order])]})
    return exposed


def _interval(values) -> str:
    return "" if values is None else f" [{values[0]:.3f}, {values[1]:.3f}]"


def write_audit(run_dir: Path, decision: dict, exposed: list[dict]) -> None:
    """`audit.json` (the decision and the most exposed members) and `audit.md` (the same, readable)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "audit.json").write_text(json.dumps({**decision, "most_exposed": exposed}, indent=2))
    thresholds = ", ".join(f"{k} = {decision[k]}" for k in ("max_auc", "max_tpr") if decision[k] is not None)
    rule = ("point (the default): an attack fails when its estimate exceeds a threshold"
            if decision["rule"] == "point" else
            "lower_bound: an attack fails only when the lower end of its 95% interval exceeds a threshold "
            "(significant leakage; the default is point)")
    lines = [f"# Release audit: {'PASSED' if decision['passed'] else 'FAILED'}", ""]
    lines += [f"> **WARNING: {warning}**\n" for warning in decision["warnings"]]
    lines += [f"Audited: {decision['audited']}", f"Membership: {decision['membership']}",
              f"Thresholds: {thresholds} (TPR at FPR {decision['at_fpr']:g}).", f"Rule: {rule}.",
              f"Sign: evaluation.sign={decision['sign']} ("
              + ("each attack's sign learnt on the labelled calibration subset, which is then not evaluated; "
                 if decision["sign"] == "labelled_subset" else "each attack's own direction; ")
              + "the AUC is read as written, never as max(AUC, 1 - AUC)).", "",
              f"| attack | access | sign | AUC [95% CI] | TPR@{decision['at_fpr']:g}FPR [95% CI] | verdict |",
              "|---|---|---|---|---|---|"]
    for row in decision["attacks"]:
        lines.append(f"| {row['attack']} | {row['access']} | {row['sign']:+d} ({row['sign_source']}) | "
                     f"{row['auc']:.3f}{_interval(row['ci95'])} | {row['tpr']:.3f}{_interval(row['tpr_ci95'])} | "
                     f"{'pass' if row['passed'] else 'FAIL: ' + '; '.join(row['reasons'])} |")
    notes = [f"- {row['attack']}: {note}" for row in decision["attacks"] for note in row["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "## Most exposed members (highest scores)", ""]
    for item in exposed:
        ids = ", ".join(f"{r['record_id']} ({r['score']:.3g})" for r in item["records"])
        lines.append(f"- {item['attack']}: {ids}")
    lines += ["", "Their nearest generated samples: `nearest_neighbours.png`; every number: `results.json`.", ""]
    (run_dir / "audit.md").write_text("\n".join(lines))


def run_audit(cfg: DictConfig, run_dir: Path, config_dir: str) -> dict:
    """Run the pipeline for the audit's attacks and write the verdict before any W&B call; returns it.

    The decision (audit.json) gains `audited`, `membership`, `sign`, `blind_baseline`, `split_shifted`
    and `warnings`; the returned one also `tracking_error` when W&B failed after the verdict was
    written (the verdict stands).
    """
    from mia_gen.experiments.pipeline import Pipeline

    audit: Any = cfg.audit
    rule = str(audit.rule)
    check_settings(audit.get("max_auc"), audit.get("max_tpr"), rule)
    _at_fpr_key({str(alpha): None for alpha in cfg.evaluation.alphas}, float(audit.at_fpr))
    if audit.sign not in SIGNS:
        raise MiaGenError(f"audit.sign must be one of {SIGNS}, got {audit.sign!r}.")
    cfg = select_attacks(cfg, config_dir)
    with open_dict(cfg):
        cfg.evaluation.sign = audit.sign
    pipeline = Pipeline(cfg, run_dir)
    where = membership(pipeline)
    decided: dict = {}

    def decide(_results) -> None:
        payload = json.loads((run_dir / "results.json").read_text())
        decision = verdict(payload["attacks"], audit.get("max_auc"), audit.get("max_tpr"), float(audit.at_fpr),
                           rule)
        blind = payload.get("blind_baseline")
        warning = shift_warning(blind)
        decision.update(audited=pipeline.external_target or f"the model {cfg.model.name} trained by this run",
                        membership=where, sign=str(audit.sign), blind_baseline=blind,
                        split_shifted=warning is not None, warnings=[warning] if warning else [])
        signs = {row["attack"]: row["sign"] for row in decision["attacks"]}
        exposed = most_exposed(pipeline.attack(require_cached=True), evaluated_ids(run_dir / "scores.csv"), signs,
                               pipeline.split.members, int(audit.top_records))
        write_audit(run_dir, decision, exposed)
        decided.update(decision)

    try:
        pipeline.evaluate(on_written=decide)
    except Exception as error:
        if not decided:
            raise
        decided["tracking_error"] = f"{type(error).__name__}: {error}"
        log.error("after the verdict was written: %s", decided["tracking_error"])
    print((run_dir / "audit.md").read_text())
    return decided
