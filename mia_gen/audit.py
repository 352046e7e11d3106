"""The release gate: run the attacks an access level allows and fail when leakage passes a threshold.

`mia-gen-audit` (experiments/audit.py) runs the pipeline on a trained model (`model.checkpoint`) or a
synthetic dataset (`synthetic.path`) with the split's members as the candidate records, then
`verdict()` compares every attack with `audit.max_auc` and `audit.max_tpr` (at `audit.at_fpr`).
Leakage with the wrong sign is leakage too, so AUC is read as max(AUC, 1 - AUC). The exit code is
0 when every attack stays under the thresholds, 1 when one does not (2 for a usage error), and
`audit.md` / `audit.json` in the run directory say which attack failed and which records were
most exposed (highest scores, with their nearest generated samples in nearest_neighbours.png).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mia_gen.errors import MiaGenError

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


def _tpr_at(result: Mapping, fpr: float) -> float:
    values = result["tpr_at_fpr"]
    key = next((k for k in values if float(k) == float(fpr)), None)
    if key is None:
        raise MiaGenError(f"audit.at_fpr={fpr} is not among evaluation.alphas ({sorted(values)}); add it there.")
    return float(values[key])


def verdict(results: Sequence[Mapping], max_auc: float | None, max_tpr: float | None, at_fpr: float) -> dict:
    """Per attack: its leakage and whether it passes; `passed` is True only if every attack does."""
    if max_auc is None and max_tpr is None:
        raise MiaGenError("the audit needs a threshold: set audit.max_auc (e.g. 0.6) and/or audit.max_tpr.")
    rows = []
    for result in results:
        auc = float(result["auc"])
        row = {"attack": result["attack"], "access": result["access"], "auc": auc,
               "leakage_auc": max(auc, 1 - auc), "reasons": []}
        if max_auc is not None and row["leakage_auc"] > max_auc:
            row["reasons"].append(f"AUC {auc:.3f} (leakage {row['leakage_auc']:.3f}) > max_auc {max_auc}")
        if max_tpr is not None:
            row["tpr"] = _tpr_at(result, at_fpr)
            if row["tpr"] > max_tpr:
                row["reasons"].append(f"TPR@{at_fpr:g}FPR {row['tpr']:.3f} > max_tpr {max_tpr}")
        row["passed"] = not row["reasons"]
        rows.append(row)
    return {"passed": all(r["passed"] for r in rows), "max_auc": max_auc, "max_tpr": max_tpr,
            "at_fpr": at_fpr, "attacks": rows}


def most_exposed(scored: Mapping[str, Mapping], members: np.ndarray, top: int) -> list[dict]:
    """The members with the highest score under each attack (what a release would give away first)."""
    from mia_gen.evaluation import evaluated_part

    exposed = []
    for name, entry in scored.items():
        entry = evaluated_part(dict(entry))
        ids, scores = np.asarray(entry["record_ids"]), np.asarray(entry["scores"], dtype=float)
        is_member = np.isin(ids, members)
        order = np.argsort(-scores[is_member], kind="stable")[:top]
        exposed.append({"attack": name, "records": [
            {"record_id": int(i), "score": float(s)} for i, s in zip(ids[is_member][order], scores[is_member][order])]})
    return exposed


def write_audit(run_dir: Path, decision: dict, exposed: list[dict], what: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "audit.json").write_text(json.dumps({**decision, "audited": what, "most_exposed": exposed}, indent=2))
    thresholds = ", ".join(f"{k} = {decision[k]}" for k in ("max_auc", "max_tpr") if decision[k] is not None)
    lines = [f"# Release audit: {'PASSED' if decision['passed'] else 'FAILED'}", "", f"Audited: {what}",
             f"Thresholds: {thresholds} (TPR at FPR {decision['at_fpr']:g}); AUC read as max(AUC, 1 - AUC).", "",
             "| attack | access | AUC | verdict |", "|---|---|---|---|"]
    for row in decision["attacks"]:
        lines.append(f"| {row['attack']} | {row['access']} | {row['auc']:.3f} | "
                     f"{'pass' if row['passed'] else 'FAIL: ' + '; '.join(row['reasons'])} |")
    lines += ["", "## Most exposed members (highest scores)", ""]
    for item in exposed:
        ids = ", ".join(f"{r['record_id']} ({r['score']:.3g})" for r in item["records"])
        lines.append(f"- {item['attack']}: {ids}")
    lines += ["", "Their nearest generated samples: `nearest_neighbours.png`; every number: `results.json`.", ""]
    (run_dir / "audit.md").write_text("\n".join(lines))


def run_audit(cfg: DictConfig, run_dir: Path, config_dir: str) -> dict:
    """Run the pipeline for the audit's attacks and write the verdict; returns it."""
    from mia_gen.pipeline import Pipeline

    audit: Any = cfg.audit
    cfg = select_attacks(cfg, config_dir)
    pipeline = Pipeline(cfg, run_dir)
    results = pipeline.evaluate()
    decision = verdict(results, audit.get("max_auc"), audit.get("max_tpr"), float(audit.at_fpr))
    what = (f"synthetic dataset {pipeline.synthetic_path}" if pipeline.synthetic_path is not None
            else f"model {cfg.model.name} at {pipeline.model_dir}")
    exposed = most_exposed(pipeline.attack(require_cached=True), pipeline.split.members, int(audit.top_records))
    write_audit(run_dir, decision, exposed, what)
    print((run_dir / "audit.md").read_text())
    return decision
