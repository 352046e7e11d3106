"""The release gate: run the attacks an access level allows and fail when leakage passes a threshold.

`mia-gen-audit` (experiments/audit.py) runs the pipeline on a trained model (`model.checkpoint`), a
sample store (`sampling.store`) or a synthetic dataset (`synthetic.path`). A target this run did not
train needs its true training membership (`split.path` or `split.members_file`), or the gate stops:
a random split would test random records. `verdict()` (experiments/verdict.py) then decides PASS, FAIL or
INCONCLUSIVE over every (attack, metric) check with simultaneous confidence (`audit.rule=simultaneous`, the
default; `point` and `lower_bound` are the earlier rules). The AUC is the signed AUC of the evaluated scores
(scores.csv), never max(AUC, 1 - AUC): with `audit.sign=labelled_subset` (the default) each attack's
sign is learnt on the labelled calibration subset, which is then left out, so leakage with the
wrong sign is caught without fitting the sign on the evaluated records. When the blind baseline
tells members from non-members without the model, the verdict says the split is shifted.

`audit.md` / `audit.json` in the run directory (written before any W&B call) say which attack
failed and which records were most exposed (highest scores, with their nearest generated samples
in nearest_neighbours.png). Exit codes (experiments/audit.py): 0 PASS, 1 FAIL, 2 no verdict (usage or config
error, crash), 3 INCONCLUSIVE.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mia_gen.errors import MiaGenError
from mia_gen.experiments.report import dcr_share_lines
from mia_gen.experiments.verdict import at_fpr_key, check_settings, verdict
from mia_gen.splits import membership_source

log = logging.getLogger(__name__)

# What each access level allows, by model family (synthetic data: samples only).
ATTACKS_BY_ACCESS = {
    "samples": ["sample_distance", "monte_carlo", "domias"],
    "query": {"gan": ["latent_inversion_pbb"]},
    "white_box": {"gan": ["latent_inversion", "logan"],
                  "memorizer": ["latent_inversion"],  # a generator G(z) without a discriminator
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


SIGNS = ("labelled_subset", "declared")


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


def evaluated_scores(scores_csv: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per attack, `(record_ids, is_member, signed score)` of the records it was evaluated on (the run's
    scores.csv, which holds the evaluated records with their signed scores)."""
    rows: dict[str, list[tuple[int, int, float]]] = {}
    with open(scores_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["attack"], []).append((int(row["record_id"]), int(row["is_member"]),
                                                       float(row["score"])))
    return {name: (np.asarray([r[0] for r in values]), np.asarray([r[1] for r in values]),
                   np.asarray([r[2] for r in values], dtype=np.float64)) for name, values in rows.items()}


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


def with_closest_rows(exposed: list[dict], scored: Mapping[str, Mapping], real, synthetic) -> list[dict]:
    """For a table: each exposed record's row (`real`, the real table as conformed) beside the closest synthetic
    row an attack found for it (`synthetic`, row i = sample i: a synthetic file or a tabular model's samples),
    both as the user holds them. Attacks
    that find no neighbours (e.g. DOMIAS) list the record's row alone."""
    for item in exposed:
        entry = scored[item["attack"]]
        position = {int(i): k for k, i in enumerate(entry["record_ids"])}
        neighbours = entry.get("neighbour_indices")
        for record in item["records"]:
            record["row"] = _plain_row(real.iloc[record["record_id"]])
            if neighbours:
                nearest = int(neighbours[position[record["record_id"]]][0])
                record["closest_synthetic_row"] = {"index": nearest, **_plain_row(synthetic.iloc[nearest])}
    return exposed


def _plain_row(row) -> dict:
    return {str(k): (None if v is None or (isinstance(v, float) and np.isnan(v)) else
                     float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}


def _row_lines(item: dict) -> list[str]:
    """A markdown table of an attack's exposed table rows, each beside its closest synthetic row."""
    records = [r for r in item["records"] if "row" in r]
    if not records:
        return []
    columns = list(records[0]["row"])
    lines = ["", f"{item['attack']}:", "", "| record | score | row | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for record in records:
        lines.append(f"| {record['record_id']} | {record['score'] + 0.0:.3g} | real | "  # + 0.0: no "-0"
                     + " | ".join(_cell(record["row"][c]) for c in columns) + " |")
        closest = record.get("closest_synthetic_row")
        if closest:
            lines.append(f"| | | closest synthetic (row {closest['index']}) | "
                         + " | ".join(_cell(closest[c]) for c in columns) + " |")
    return lines


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _interval(values) -> str:
    return "" if values is None else f" [{values[0]:.3f}, {values[1]:.3f}]"


MEANING = {
    "PASS": "every check's whole interval lies inside its allowed region: with the stated simultaneous confidence, "
            "no attack here leaks more than its threshold on these records. It is evidence about these attacks, "
            "this access level and these records, not a proof that the release is safe.",
    "FAIL": "some check's whole interval lies beyond its threshold: leakage above the threshold is shown with the "
            "stated simultaneous confidence.",
    "INCONCLUSIVE": "no check shows leakage beyond its threshold, but not every check shows leakage below it: "
                    "'not shown to leak' is not 'safe'. The table says how many records would decide.",
}
TITLE = {"PASS": "PASSED", "FAIL": "FAILED", "INCONCLUSIVE": "INCONCLUSIVE"}


def _rule_text(decision: dict) -> str:
    if decision["rule"] == "simultaneous":
        return (f"simultaneous: {decision['n_checks']} checks (attack x metric), each interval at "
                f"{100 * decision['check_level']:.3g}% (Bonferroni), so that all hold together with "
                f"{100 * decision['confidence']:g}% confidence; AUC intervals by DeLong, TPR intervals by a stratified "
                "bootstrap; leakage counts on both sides of AUC 0.5")
    if decision["rule"] == "point":
        return "point (earlier rule): an attack fails when its estimate exceeds a threshold; no uncertainty"
    return ("lower_bound (earlier rule): an attack fails only when the lower end of its 95% interval exceeds a "
            "threshold; no correction for several attacks")


def _verdict_cell(row: dict) -> str:
    if row["decision"] == "pass":
        return "pass"
    if row["decision"] == "fail":
        return "FAIL: " + "; ".join(row["reasons"])
    needs = [f"{c['metric'].upper()}: ~{c['records_to_decide']['members']} members / "
             f"{c['records_to_decide']['non_members']} non-members" for c in row.get("checks", [])
             if c["decision"] == "inconclusive" and c.get("records_to_decide")]
    return "inconclusive" + (f" (to decide: {'; '.join(needs)})" if needs else "")


def write_audit(run_dir: Path, decision: dict, exposed: list[dict], dcr_share: Mapping | None = None) -> None:
    """`audit.json` (the decision and the most exposed members) and `audit.md` (the same, readable)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "audit.json").write_text(json.dumps({**decision, "most_exposed": exposed}, indent=2))
    outcome = decision["outcome"]
    thresholds = ", ".join(f"{k} = {decision[k]}" for k in ("max_auc", "max_tpr") if decision[k] is not None)
    simultaneous = decision["rule"] == "simultaneous"
    lines = [f"# Release audit: {TITLE[outcome]}", ""]
    lines += [f"> **WARNING: {warning}**\n" for warning in decision["warnings"]]
    lines += [f"{TITLE[outcome]}: {MEANING[outcome]}" if simultaneous else "", "",
              f"Audited: {decision['audited']}", f"Membership: {decision['membership']}",
              f"Thresholds: {thresholds} (TPR at FPR {decision['at_fpr']:g}).", f"Rule: {_rule_text(decision)}.",
              f"Sign: evaluation.sign={decision['sign']} ("
              + ("each attack's sign learnt on the labelled calibration subset, which is then not evaluated; "
                 if decision["sign"] == "labelled_subset" else "each attack's own direction; ")
              + "the AUC is read as written, never as max(AUC, 1 - AUC)).", ""]
    interval = "simultaneous CI" if simultaneous else "95% CI"
    lines += [f"| attack | access | sign | members / non-members | AUC [{interval}] | "
              f"TPR@{decision['at_fpr']:g}FPR [{interval}] | verdict |", "|---|---|---|---|---|---|---|"]
    for row in decision["attacks"]:
        sizes = f"{row['n_members']} / {row['n_non_members']}" if "n_members" in row else ""
        auc = "" if row.get("auc") is None else f"{row['auc']:.3f}{_interval(row.get('auc_interval', row.get('ci95')))}"
        tpr = "" if row.get("tpr") is None else f"{row['tpr']:.3f}{_interval(row.get('tpr_interval', row.get('tpr_ci95')))}"
        lines.append(f"| {row['attack']} | {row['access']} | {row['sign']:+d} ({row['sign_source']}) | {sizes} | "
                     f"{auc} | {tpr} | {_verdict_cell(row)} |")
    notes = [f"- {row['attack']}: {note}" for row in decision["attacks"] for note in row["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    if dcr_share is not None:
        lines += ["", *dcr_share_lines(dcr_share)]
    lines += ["", "## Most exposed members (highest scores)", ""]
    for item in exposed:
        ids = ", ".join(f"{r['record_id']} ({r['score']:.3g})" for r in item["records"])
        lines.append(f"- {item['attack']}: {ids}")
    tables = [line for item in exposed for line in _row_lines(item)]
    if tables:
        lines += ["", "Their rows beside the closest synthetic rows:", *tables]
    else:
        lines += ["", "Their nearest generated samples: `nearest_neighbours.png`."]
    lines += ["", "Every number: `results.json`.", ""]
    (run_dir / "audit.md").write_text("\n".join(lines))


def run_audit(cfg: DictConfig, run_dir: Path, config_dir: str) -> dict:
    """Run the pipeline for the audit's attacks and write the verdict before any W&B call; returns it.

    The decision (audit.json) gains `audited`, `membership`, `sign`, `blind_baseline`, `split_shifted`
    and `warnings`; the returned one also `tracking_error` when W&B failed after the verdict was
    written (the verdict stands).
    """
    from mia_gen.experiments.pipeline import Pipeline

    audit: Any = cfg.audit
    rule = audit.rule
    check_settings(audit.get("max_auc"), audit.get("max_tpr"), rule, audit.get("at_fpr"), audit.get("confidence"))
    at_fpr_key({str(alpha): None for alpha in cfg.evaluation.alphas}, float(audit.at_fpr))
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
        evaluated = evaluated_scores(run_dir / "scores.csv")
        decision = verdict(payload["attacks"], audit.get("max_auc"), audit.get("max_tpr"), float(audit.at_fpr),
                           rule, scores={name: (labels, scores) for name, (_, labels, scores) in evaluated.items()},
                           confidence=float(audit.confidence), n_bootstrap=int(cfg.evaluation.n_bootstrap),
                           seed=int(cfg.seed))
        blind = payload.get("blind_baseline")
        warning = shift_warning(blind)
        decision.update(audited=pipeline.external_target or f"the model {cfg.model.name} trained by this run",
                        membership=where, sign=str(audit.sign), blind_baseline=blind,
                        split_shifted=warning is not None, warnings=[warning] if warning else [])
        signs = {row["attack"]: row["sign"] for row in decision["attacks"]}
        scored = pipeline.attack(require_cached=True)
        exposed = most_exposed(scored, {name: ids for name, (ids, _, _) in evaluated.items()}, signs,
                               pipeline.split.members, int(audit.top_records))
        synthetic = pipeline.synthetic_table()
        if synthetic is not None:
            exposed = with_closest_rows(exposed, scored, pipeline.records.table, synthetic)
        write_audit(run_dir, decision, exposed, payload.get("dcr_overfitting_protection"))
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
