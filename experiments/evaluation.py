"""The evaluate stage: labels meet scores here and nowhere else.

Writes the run's outputs (DESIGN.md "Outputs of a run"): results.json, scores.csv, roc.png,
score_histograms.png, nearest_neighbours.png, report.md, and the W&B run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mia_gen.auc_inference import delong_auc_variance, normal_interval
from mia_gen.blind_baseline import blind_baseline
from mia_gen.dcr import dcr_share
from mia_gen.errors import MiaGenError
from mia_gen.groups import group_labels, per_record_average
from mia_gen.metrics import auc, calibrated_sign, evaluate_scores, group_auc, roc_points
from mia_gen.experiments.report import (
    ShadowROC,
    format_results_table,
    plot_group_auc,
    plot_nearest_neighbours,
    plot_roc,
    plot_roc_shadows,
    plot_score_histograms,
    plot_timestep_sweep,
    shadows_text,
    unscored_lines,
    write_report,
)
from mia_gen.experiments.tracking import make_tracker

log = logging.getLogger(__name__)

# Per-record detail an attack keeps in its cached scores, not copied into results.json.
_BULKY_INFO = ("sweep", "trained_on", "target_scores", "reference_scores", "groups", "group_scores", "unscored",
               "base")
# Where an attack's score direction comes from (`evaluation.sign`; DESIGN.md "Sign is fixed before evaluation").
SIGN_SOURCES = ("declared", "labelled_subset")


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


def sign_mode(evaluation) -> str:
    """`evaluation.sign`: `declared` (each attack's own direction) or `labelled_subset` (learnt there)."""
    mode = evaluation.get("sign", "declared")
    if mode not in SIGN_SOURCES:
        raise MiaGenError(f"evaluation.sign={mode!r} is not one of {SIGN_SOURCES}: use `declared` (the score as the "
                          "attack defines it) or `labelled_subset` (learnt on the labelled calibration subset, "
                          "which is then left out of the evaluation).")
    return mode


def _unscored(entry: dict) -> tuple[np.ndarray, list[str]]:
    """The positions an attack declares unscored (`info["unscored"]`) and one reason each."""
    unscored = entry["info"].get("unscored") or {}
    positions = np.asarray(unscored.get("positions", []), dtype=np.int64)
    reasons = [str(reason) for reason in unscored.get("reasons", [])]
    n = len(entry["record_ids"])
    if len(reasons) != len(positions) or ((positions < 0) | (positions >= n)).any():
        raise MiaGenError(
            f"attack '{entry.get('attack')}': info['unscored'] must give one reason per position, each position "
            f"in [0, {n}); got {len(positions)} position(s) and {len(reasons)} reason(s). The score file is "
            "malformed: delete it so that the attack scores again."
        )
    return positions, reasons


def evaluated_part(entry: dict, labelled: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The entry as it is evaluated: signed, and without the records its sign or scores were learnt on
    or that it could not score.

    An attack that trained on a labelled subset (`info["trained_on"]` positions, e.g. SecMI-NNs)
    keeps its declared sign +1 and drops those records. Otherwise, given `labelled` = `(positions,
    labels)` (`Pipeline.labelled_subset()`: positions into the entry's records, `(K,)` each), the
    sign is learnt there (`metrics.calibrated_sign`, on the labelled records that have a score) and
    those records are dropped; without it the declared sign +1 is kept. The sign is fixed before any
    evaluated record is seen (reading max(AUC, 1 - AUC) on them would be fitting on the test set).
    The records the attack declares unscored (`info["unscored"]`: NaN scores, e.g. LiRA online for
    a record never OUT of a shadow) are dropped too and counted; any other NaN is left for the
    metrics to refuse.

    Returns:
        The entry with `record_ids`, `scores` (times the sign) and `neighbour_indices` cut to the
        evaluated records, plus `kept` (their positions), `sign` (+1 / -1), `sign_source`,
        `n_unscored` (records left out of the evaluation because they have no score; unscored records
        of the labelled subset are not counted, it is not evaluated anyway), `unscored_reasons`
        (`{reason: count}` of those), `unscored_record_ids`, and for a wrapper attack `base_scores`
        (`info["base"]["scores"]` of the evaluated records, unsigned: higher = member).
    """
    n = len(entry["record_ids"])
    scores = np.asarray(entry["scores"], dtype=np.float64)
    unscored, reasons = _unscored(entry)
    trained_on = entry["info"].get("trained_on")
    if trained_on or labelled is None:
        excluded, sign, source = np.asarray(trained_on or [], dtype=int), 1, "declared"
    else:
        positions, labels = labelled
        excluded, source = np.asarray(positions, dtype=int), "labelled_subset"
        has_score = ~np.isin(excluded, unscored)
        sign = calibrated_sign(np.asarray(labels)[has_score], scores[excluded][has_score])
    dropped = ~np.isin(unscored, excluded)
    kept = np.setdiff1d(np.arange(n), np.union1d(excluded, unscored))
    ids = np.asarray(entry["record_ids"])
    part = {**entry, "kept": kept, "sign": sign, "sign_source": source,
            "record_ids": ids[kept].tolist(), "scores": (sign * scores[kept]).tolist(),
            "n_unscored": int(dropped.sum()),
            "unscored_reasons": dict(Counter(reason for reason, drop in zip(reasons, dropped) if drop)),
            "unscored_record_ids": ids[np.sort(unscored[dropped])].tolist()}
    if entry.get("neighbour_indices"):
        part["neighbour_indices"] = np.asarray(entry["neighbour_indices"])[kept].tolist()
    base = entry["info"].get("base")
    if base:
        base_scores = np.asarray(base["scores"], dtype=np.float64)
        if base_scores.shape != (n,):
            raise MiaGenError(
                f"attack '{entry.get('attack')}': its base statistic '{base.get('attack')}' has "
                f"{base_scores.size} scores for {n} records; the score file is malformed: delete it so that "
                "the attack scores again."
            )
        part["base_scores"] = base_scores[kept]
    return part


def base_statistic(entry: dict, labels: np.ndarray, alphas: tuple[float, ...], n_bootstrap: int,
                   seed: int) -> dict | None:
    """A wrapper attack's base statistic (`info["base"]`, e.g. LiRA's diffusion loss on the target
    model) evaluated on the same records as the attack, with the same metrics; None without one.

    The base statistic is an attack of its own: its scores are read with its declared sign +1 (they
    are higher = member already), whatever sign the wrapper's scores got. `entry` is an
    `evaluated_part`, `labels` `(K,)` those of its evaluated records.
    """
    if entry.get("base_scores") is None:
        return None
    metrics = evaluate_scores(labels, entry["base_scores"], alphas=alphas, n_bootstrap=n_bootstrap, seed=seed)
    return {"attack": entry["info"]["base"]["attack"], **metrics, "sign": 1, "sign_source": "declared"}


def _most_exposed(labels: np.ndarray, scores: np.ndarray, n_rows: int) -> np.ndarray:
    """Positions of the highest-scoring members and non-members, half of the rows each."""
    rows = []
    for label in (1, 0):
        positions = np.flatnonzero(labels == label)
        rows.extend(positions[np.argsort(-scores[positions], kind="stable")][: max(n_rows // 2, 1)])
    return np.asarray(rows)


def _group_aucs(entry: dict, labels: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """Co-membership, per group size n: the AUC of the attack's joint group scores (`group_auc`) with its 95%
    DeLong interval (`group_auc_ci`, None with fewer than 2 groups of a class or at AUC 0 or 1, where DeLong's
    variance vanishes), the AUC of the mean of each
    group's per-record scores on the same groups (`group_auc_per_record_average`, with
    `group_auc_per_record_average_ci`), and the groups behind them (`n_groups`: [member groups, non-member
    groups]). The groups of one size are disjoint (`mia_gen.groups.draw_groups`), so the interval may treat
    them as independent. Read with the entry's sign. `labels`, `scores` `(K,)` are the evaluated records';
    the groups index all of the entry's records."""
    kept = np.asarray(entry["kept"])  # sorted
    out = {key: {} for key in ("group_auc", "group_auc_ci", "group_auc_per_record_average",
                               "group_auc_per_record_average_ci", "n_groups")}
    for n, group_scores in sorted(entry["info"]["group_scores"].items(), key=lambda item: int(item[0])):
        positions = np.asarray(entry["info"]["groups"][n], dtype=np.int64)
        rows = np.searchsorted(kept, positions)
        if not np.array_equal(kept[np.minimum(rows, len(kept) - 1)], positions):
            raise MiaGenError(f"attack '{entry['attack']}': its groups hold records that are left out of the "
                              "evaluation; groups must be drawn from the evaluated records (Pipeline.groups).")
        member = group_labels(rows, labels)
        out["n_groups"][n] = [int(member.sum()), int(len(member) - member.sum())]
        for key, values in (("group_auc", entry["sign"] * np.asarray(group_scores, dtype=np.float64)),
                            ("group_auc_per_record_average", per_record_average(scores, rows))):
            out[key][n] = group_auc(labels, rows, values)
            out[f"{key}_ci"][n] = None
            if min(out["n_groups"][n]) >= 2:
                estimate, variance = delong_auc_variance(member, values)
                if variance > 0:  # at AUC 0 or 1 DeLong's variance is 0: no interval rather than a point "interval"
                    out[f"{key}_ci"][n] = normal_interval(estimate, variance, 0.95)
    return out


def write_outputs(pipeline, scored: dict[str, dict], on_written=None) -> list[dict]:
    """Write the run's files, then call `on_written(results)` (e.g. the release gate writes its verdict),
    then log to W&B: a tracking failure never loses what was written before it."""
    cfg, run_dir = pipeline.cfg, pipeline.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    members = pipeline.split.members
    evaluation = cfg.evaluation
    results, curves = [], {}
    labelled = pipeline.labelled_subset() if sign_mode(evaluation) == "labelled_subset" else None
    scored = {name: evaluated_part(entry, labelled) for name, entry in scored.items()}
    sweeps, groups, shadow_curves = {}, {}, {}
    settings = {"alphas": tuple(evaluation.alphas), "n_bootstrap": int(evaluation.n_bootstrap), "seed": int(cfg.seed)}
    for name, entry in scored.items():
        labels = labels_for(np.asarray(entry["record_ids"]), members)
        scores = np.asarray(entry["scores"], dtype=np.float64)
        metrics = evaluate_scores(labels, scores, **settings)
        info = {k: v for k, v in entry["info"].items() if k not in _BULKY_INFO}
        result = {"attack": name, "access": entry["access"], **metrics, "sign": entry["sign"],
                  "sign_source": entry["sign_source"], "seconds": entry["seconds"],
                  "n_unscored": entry["n_unscored"], "unscored_reasons": entry["unscored_reasons"],
                  "unscored_record_ids": entry["unscored_record_ids"],
                  **{key: info[key] for key in ("n_shadows", "n_shadows_requested") if key in info},
                  "config": entry["config"], "info": info}
        base = base_statistic(entry, labels, **settings)
        if base is not None:
            result["base_statistic"] = base
            shadow_curves[name] = ShadowROC(labels, scores, base["attack"], entry["base_scores"],
                                            shadows_text(result))
        if entry["info"].get("sweep"):
            sweeps[name] = result["auc_by_timestep"] = {
                str(t): auc(labels, entry["sign"] * np.asarray(values, dtype=np.float64)[entry["kept"]])
                for t, values in entry["info"]["sweep"].items()
            }
        if entry["info"].get("group_scores"):
            result.update(_group_aucs(entry, labels, scores))
            groups[name] = result["group_auc"]
            groups[f"{name} (per-record average)"] = result["group_auc_per_record_average"]
        results.append(result)
        curves[name] = (labels, scores)

    metadata = pipeline.metadata(scored)
    blind = _blind_baseline(pipeline)
    payload = {"config_hash": pipeline.config_hash, "metadata": metadata, "attacks": results,
               "blind_baseline": blind}
    share = _dcr_share(pipeline)
    if share is not None:
        payload["dcr_overfitting_protection"] = share
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run_dir / "results.json")
    write_scores_csv(run_dir / "scores.csv", scored, members)

    images = {"ROC (log-log)": "roc.png", "Score histograms": "score_histograms.png"}
    plot_roc(curves, run_dir / "roc.png")
    plot_score_histograms(curves, run_dir / "score_histograms.png")
    if shadow_curves:
        plot_roc_shadows(shadow_curves, run_dir / "roc_shadows.png")
        images["ROC of each shadow-model attack beside its base statistic (log-log)"] = "roc_shadows.png"
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
    write_report(run_dir, results, metadata, images, blind_baseline=blind, dcr_share=share)
    if on_written is not None:
        on_written(results)

    _track(pipeline, results, curves, images, metadata, blind)
    print(format_results_table(results))
    for line in unscored_lines(results):
        print(line)
    if blind is not None:
        print(("\n!!! " if blind["shifted"] else "\n") + blind["message"])
    log.info("outputs in %s", run_dir)
    return results


def _blind_baseline(pipeline) -> dict | None:
    """`blind_baseline.blind_baseline` on every member and non-member (None when
    `evaluation.blind_baseline` is false); a shifted split is also logged as a warning. Its interval
    always has its own 1000 resamples: it decides the warning, so a shrunk `evaluation.n_bootstrap`
    must not make it noisy."""
    if not pipeline.cfg.evaluation.get("blind_baseline", True):
        return None
    ids = pipeline.query_ids
    blind = blind_baseline(pipeline.records.get(ids), labels_for(ids, pipeline.split.members),
                           seed=int(pipeline.cfg.seed))
    if blind["shifted"]:
        log.warning(blind["message"])
    return blind


def _dcr_share(pipeline) -> dict | None:
    """For rows of a table (or numeric rows) whose synthetic rows this run read: SDMetrics' DCR share
    (`mia_gen.dcr`) of the synthetic rows against the split's members and non-members; None otherwise."""
    if pipeline.records.kind != "tabular":
        return None
    if pipeline.synthetic_path is None and not pipeline.given_store and not pipeline.sample_dir.is_dir():
        return None  # no synthetic rows were drawn (e.g. white-box attacks only)
    store = pipeline.sample()
    split = pipeline.split
    return dcr_share(store.get(np.arange(len(store))), pipeline.records.get(split.members),
                     pipeline.records.get(split.non_members), seed=int(pipeline.cfg.seed))


def _track(pipeline, results: list[dict], curves: dict, images: dict[str, str], metadata: dict,
           blind: dict | None) -> None:
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
                             "sign": result["sign"], "sign_source": result["sign_source"],
                             "seconds": result["seconds"], "n_unscored": result["n_unscored"]}
            summary[name].update({key: result[key] for key in ("n_shadows", "n_shadows_requested") if key in result})
            if "base_statistic" in result:  # the statistic a shadow-model attack wraps, on the same records
                summary[name]["base_statistic"] = {key: result["base_statistic"][key]
                                                   for key in ("attack", "auc", "tpr_at_fpr")}
            fpr, tpr, _ = roc_points(*curves[name])
            tracker.log_roc(name, fpr, tpr)
        if blind is not None:
            summary["blind_baseline"] = {key: blind[key] for key in ("auc", "ci95", "shifted")}
            if blind["shifted"]:  # shown beside the metrics it qualifies
                summary["warning"] = blind["message"]
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


