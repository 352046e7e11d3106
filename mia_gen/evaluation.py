"""The evaluate stage: labels meet scores here and nowhere else.

Writes the run's outputs (DESIGN.md "Outputs of a run"): results.json, scores.csv, roc.png,
score_histograms.png, nearest_neighbours.png, report.md, and the W&B run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mia_gen.metrics import auc, evaluate_scores, group_auc, roc_points
from mia_gen.report import (
    format_results_table,
    plot_group_auc,
    plot_nearest_neighbours,
    plot_roc,
    plot_score_histograms,
    plot_timestep_sweep,
    write_report,
)
from mia_gen.tracking import make_tracker

log = logging.getLogger(__name__)

# Per-record detail an attack keeps in its cached scores, not copied into results.json.
_BULKY_INFO = ("sweep", "trained_on", "target_scores", "reference_scores")


def labels_for(record_ids: np.ndarray, members: np.ndarray) -> np.ndarray:
    """1 for members, 0 for non-members."""
    return np.isin(record_ids, members).astype(int)


def write_scores_csv(path: Path, scored: dict[str, dict], members: np.ndarray) -> None:
    """One row per (attack, record): `attack,record_id,is_member,score` (scores written exactly)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["attack", "record_id", "is_member", "score"])
        for name, entry in scored.items():
            ids = np.asarray(entry["record_ids"])
            for record_id, is_member, score in zip(ids, labels_for(ids, members), entry["scores"]):
                writer.writerow([name, int(record_id), int(is_member), repr(float(score))])


def evaluated_part(entry: dict) -> dict:
    """The entry without the records an attack learnt from (`info["trained_on"]` positions):
    those are never scored as if unseen. `kept` holds the remaining positions."""
    n = len(entry["record_ids"])
    kept = np.setdiff1d(np.arange(n), np.asarray(entry["info"].get("trained_on") or [], dtype=int))
    part = {**entry, "kept": kept,
            "record_ids": np.asarray(entry["record_ids"])[kept].tolist(),
            "scores": np.asarray(entry["scores"])[kept].tolist()}
    if entry.get("neighbour_indices"):
        part["neighbour_indices"] = np.asarray(entry["neighbour_indices"])[kept].tolist()
    return part


def _most_exposed(labels: np.ndarray, scores: np.ndarray, n_rows: int) -> np.ndarray:
    """Positions of the highest-scoring members and non-members, half of the rows each."""
    rows = []
    for label in (1, 0):
        positions = np.flatnonzero(labels == label)
        rows.extend(positions[np.argsort(-scores[positions], kind="stable")][: max(n_rows // 2, 1)])
    return np.asarray(rows)


def write_outputs(pipeline, scored: dict[str, dict]) -> list[dict]:
    cfg, run_dir = pipeline.cfg, pipeline.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    members = pipeline.split.members
    evaluation = cfg.evaluation
    results, curves = [], {}
    scored = {name: evaluated_part(entry) for name, entry in scored.items()}
    sweeps, groups = {}, {}
    for name, entry in scored.items():
        labels = labels_for(np.asarray(entry["record_ids"]), members)
        scores = np.asarray(entry["scores"], dtype=np.float64)
        metrics = evaluate_scores(labels, scores, alphas=tuple(evaluation.alphas),
                                  n_bootstrap=int(evaluation.n_bootstrap), seed=int(cfg.seed))
        info = {k: v for k, v in entry["info"].items() if k not in _BULKY_INFO}
        result = {"attack": name, "access": entry["access"], **metrics, "seconds": entry["seconds"],
                  "config": entry["config"], "info": info}
        if entry["info"].get("sweep"):
            sweeps[name] = result["auc_by_timestep"] = {
                str(t): auc(labels, np.asarray(values, dtype=np.float64)[entry["kept"]])
                for t, values in entry["info"]["sweep"].items()
            }
        if entry["info"].get("group_sizes"):
            groups[name] = result["group_auc"] = {
                str(n): group_auc(labels, scores, int(n), int(entry["info"]["n_groups"]), seed=int(cfg.seed))
                for n in entry["info"]["group_sizes"]
            }
        results.append(result)
        curves[name] = (labels, scores)

    metadata = pipeline.metadata()
    payload = {"config_hash": pipeline.config_hash, "metadata": metadata, "attacks": results}
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run_dir / "results.json")
    write_scores_csv(run_dir / "scores.csv", scored, members)

    images = {"ROC (log-log)": "roc.png", "Score histograms": "score_histograms.png"}
    plot_roc(curves, run_dir / "roc.png")
    plot_score_histograms(curves, run_dir / "score_histograms.png")
    if sweeps:
        plot_timestep_sweep(sweeps, run_dir / "timestep_sweep.png")
        images["AUC against the diffusion timestep"] = "timestep_sweep.png"
    if groups:
        plot_group_auc(groups, run_dir / "group_auc.png")
        images["AUC of deciding n records jointly (co-membership)"] = "group_auc.png"
    with_neighbours = [name for name, entry in scored.items() if entry.get("neighbour_indices")]
    if with_neighbours and pipeline.records.kind == "image":
        name = with_neighbours[0]
        entry, (labels, scores) = scored[name], curves[name]
        rows = _most_exposed(labels, scores, int(evaluation.n_neighbour_rows))
        ids = np.asarray(entry["record_ids"])[rows]
        neighbour_ids = np.asarray(entry["neighbour_indices"])[rows]
        neighbours = pipeline.samples.get(neighbour_ids.reshape(-1))
        neighbours = neighbours.reshape(*neighbour_ids.shape, *neighbours.shape[1:])
        queries = pipeline.records.get(ids)
        l2 = (neighbours - queries[:, None]).flatten(2).norm(dim=2)  # (Q, k), shown under each sample
        plot_nearest_neighbours(queries, neighbours, run_dir / "nearest_neighbours.png",
                                query_labels=labels[rows], distances=l2.numpy())
        images[f"Most exposed records and their nearest samples ({name})"] = "nearest_neighbours.png"
    write_report(run_dir, results, metadata, images)

    _track(pipeline, results, curves, images, metadata)
    print(format_results_table(results))
    log.info("outputs in %s", run_dir)
    return results


def _track(pipeline, results: list[dict], curves: dict, images: dict[str, str], metadata: dict) -> None:
    cfg, run_dir = pipeline.cfg, pipeline.run_dir
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = make_tracker(cfg.logger, run_dir, config, job_name=run_dir.name)
    try:
        summary = {"config_hash": pipeline.config_hash}
        privacy = metadata.get("privacy")
        if privacy:  # the epsilon a DP-trained model spent
            summary["privacy"] = privacy
        for result in results:
            name = result["attack"]
            summary[name] = {"auc": result["auc"], "asr": result["asr"],
                             "tpr_at_fpr": result["tpr_at_fpr"], "ci95": result["ci95"],
                             "seconds": result["seconds"]}
            fpr, tpr, _ = roc_points(*curves[name])
            tracker.log_roc(name, fpr, tpr)
        tracker.log_summary(summary)
        rows = [[name, int(label), float(score)] for name, (labels, scores) in curves.items()
                for label, score in zip(labels, scores)]
        tracker.log_table("scores", ["attack", "is_member", "score"], rows)
        for title, file in images.items():
            tracker.log_image(title, run_dir / file)
        tracker.log_artifact("run-outputs", [run_dir / "results.json", run_dir / "scores.csv",
                                             run_dir / "report.md"], "results")
    finally:
        tracker.finish()


