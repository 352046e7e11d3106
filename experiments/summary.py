"""Summarise a sweep: every job's results.json into one benchmark table and plots.

A Hydra multirun writes one job directory per setting (`<sweep>/<n>/results.json` and
`<sweep>/<n>/.hydra/overrides.yaml`). `summarize(sweep_dir)` writes, in the sweep directory:

- `summary.csv`: one row per (job, attack): the job's swept overrides, model, defense, its strength,
  the epsilon a DP-trained model spent, the utility (FID, and which feature space), training steps,
  then the attack's AUC with its 95% CI, TPR at each FPR and, for co-membership, AUC per group size,
  its sign and where the sign came from, the job's seed and its blind-baseline AUC;
- `benchmark.csv`: the benchmark table (also logged to W&B): one row per setting, i.e. the jobs that
  differ only by `seed` (the target models trained on the seeds), with the mean and sample sd (ddof 1)
  over those seeds of every metric shown, and the number of seeds;
- `summary.md`: the benchmark table (one row per setting: defense, strength, seeds, ε, utility, the
  largest signed AUC, the blind baseline's AUC, and every attack's AUC / TPR@1% / TPR@0.1%, as mean ±
  sd where there are several seeds), then, when one override other than `seed` varies (or `x` is
  given), AUC per attack against it;
- `auc_vs_<x>.png`: AUC against the swept value, one line per attack, the sd over seeds (or, for one
  seed, the CI) as a band;
- `privacy_utility.png`: the best attack's AUC against utility, one point per setting (when the runs
  measured utility).

AUCs are read as each run wrote them: signed (declared by the attack, or learnt on the labelled
calibration subset, `sign_source`), as the release gate reads them; never max(AUC, 1 - AUC).

Used by `mia-gen-summarize <sweep_dir>` and, inside a sweep, by the Hydra callback `SweepSummary`;
both also log the table and plots to W&B when the sweep's jobs did (`logger`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from mia_gen.errors import MiaGenError

log = logging.getLogger(__name__)

DEFENSE_ORDER = ("none", "augmentation", "weight_decay", "early_stopping", "dp_sgd", "federated")
# The override whose jobs are replicates (other target models) of one setting, averaged over.
REPLICATE_KEY = "seed"
# The per-attack metrics of the tables: (name, how it is read from a summary row, digits shown).
ATTACK_METRICS = (("auc", lambda row: row["auc"], 3), ("tpr@1%", lambda row: row["tpr_at_fpr"].get("0.01"), 2),
                  ("tpr@0.1%", lambda row: row["tpr_at_fpr"].get("0.001"), 2))


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        pairs[key.lstrip("+~")] = value
    return pairs


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per (job, attack) found under `sweep_dir` (any depth)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MiaGenError(f"{sweep_dir} is not a directory; give the sweep directory (e.g. multirun/<date>/<time>).")
    rows = []
    for results_path in sorted(sweep_dir.rglob("results.json")):
        job_dir = results_path.parent
        payload = json.loads(results_path.read_text())
        meta = payload.get("metadata", {})
        defense = meta.get("defense") or {}
        utility = meta.get("utility") or {}
        blind = payload.get("blind_baseline") or {}
        for entry in payload.get("attacks", []):
            rows.append({
                "job": str(job_dir.relative_to(sweep_dir)), "overrides": _overrides(job_dir),
                "model": (meta.get("model") or {}).get("name", "synthetic"),
                "defense": defense.get("name", ""), "strength": defense.get("strength", ""),
                "epsilon": (meta.get("privacy") or {}).get("epsilon"),
                "utility": utility.get("value"), "utility_metric": utility.get("metric", ""),
                "training_steps": meta.get("training_steps"),
                "attack": entry["attack"], "auc": entry["auc"], "ci95": entry.get("ci95", {}).get("auc"),
                "tpr_at_fpr": entry.get("tpr_at_fpr", {}), "group_auc": entry.get("group_auc"),
                "group_auc_per_record_average": entry.get("group_auc_per_record_average"),
                "n_members": entry.get("n_members"), "n_non_members": entry.get("n_non_members"),
                "sign": entry.get("sign"), "sign_source": entry.get("sign_source", ""), "seed": meta.get("seed"),
                "blind_auc": blind.get("auc"), "blind_shifted": bool(blind.get("shifted")),
                "dcr_share": (payload.get("dcr_overfitting_protection") or {}).get("closer_to_training"),
            })
    if not rows:
        raise MiaGenError(f"no results.json under {sweep_dir}; run the sweep (`mia-gen -m ...`) first.")
    return rows


def varying_keys(rows: list[dict], replicates: bool = True) -> list[str]:
    """The overrides whose value differs between jobs, in the order they first appear (without
    `seed`, the replicate key, when `replicates` is False)."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in row["overrides"].items():
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1 and (replicates or key != REPLICATE_KEY)]


def _as_number(value: str) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _sort_key(value: str):
    number = _as_number(value)
    return (0, number, "") if isinstance(number, float) else (1, 0.0, str(number))


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_sd(values) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof 1) of the values that are not None; sd None for fewer than two."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _stat(mean_sd: tuple[float | None, float | None], digits: int = 3) -> str:
    """`mean ± sd` (or the lone value of a single seed)."""
    mean, sd = mean_sd
    return _number(mean, digits) + ("" if sd is None else f" ± {sd:.{digits}f}")


def _jobs(rows: list[dict]) -> list[dict]:
    """One entry per job, with its attacks' rows, in benchmark order (model, defense, steps, job)."""
    jobs: dict[str, dict] = {}
    for row in rows:
        job = jobs.setdefault(row["job"], {**{k: row[k] for k in ("job", "overrides", "model", "defense", "strength",
                                                                    "epsilon", "utility", "utility_metric",
                                                                    "training_steps", "seed", "blind_auc",
                                                                    "blind_shifted", "dcr_share")}, "attacks": {}})
        job["attacks"][row["attack"]] = row
    order = {name: i for i, name in enumerate(DEFENSE_ORDER)}

    def key(job):
        number = job["job"].split("/")[-1]
        return (job["model"], order.get(job["defense"], len(order)), job["training_steps"] or 0,
                int(number) if number.isdigit() else 0, job["job"])

    return sorted(jobs.values(), key=key)


def _settings(rows: list[dict]) -> list[dict]:
    """One entry per setting, in benchmark order: the jobs whose overrides differ only by `seed` (a job
    that does not override `seed` is a setting of its own), with the mean and sd over those jobs.

    Each entry: `jobs`, `overrides` (without `seed`), `seeds`, `n_seeds`, `model`, `defense`, `strength`,
    `training_steps`, `utility_metric`, `(mean, sd)` pairs for `utility`, `epsilon`, `blind_auc` and `dcr_share`,
    `blind_shifted` (True if any job's split is shifted), `attacks` = `{attack: {metric: (mean, sd),
    "ci95": the single seed's AUC interval or None, "group_auc" / "group_auc_per_record_average":
    {n: mean}}}` for the metrics of ATTACK_METRICS, and `max_auc`: the largest of the attacks' mean
    (signed) AUCs.
    """
    grouped: dict[str, list[dict]] = {}
    for job in _jobs(rows):
        overrides = {k: v for k, v in job["overrides"].items() if k != REPLICATE_KEY}
        key = json.dumps(overrides, sort_keys=True) if REPLICATE_KEY in job["overrides"] else job["job"]
        grouped.setdefault(key, []).append(job)
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    settings = []
    for jobs in grouped.values():
        first = jobs[0]
        setting = {**{k: first[k] for k in ("model", "defense", "strength", "training_steps", "utility_metric")},
                   "jobs": [job["job"] for job in jobs], "seeds": [job["seed"] for job in jobs], "n_seeds": len(jobs),
                   "overrides": {k: v for k, v in first["overrides"].items() if k != REPLICATE_KEY},
                   **{k: _mean_sd(job[k] for job in jobs) for k in ("utility", "epsilon", "blind_auc", "dcr_share")},
                   "blind_shifted": any(job["blind_shifted"] for job in jobs), "attacks": {}}
        for attack in attacks:
            measured = [job["attacks"][attack] for job in jobs if attack in job["attacks"]]
            if not measured:
                continue
            stats = {name: _mean_sd(read(row) for row in measured) for name, read, _ in ATTACK_METRICS}
            stats["ci95"] = measured[0]["ci95"] if len(measured) == 1 else None
            for curve in ("group_auc", "group_auc_per_record_average"):  # joint, and its baseline on the same groups
                sizes = dict.fromkeys(n for row in measured for n in (row.get(curve) or {}))
                stats[curve] = {n: _mean_sd(row[curve].get(n) for row in measured if row.get(curve))[0]
                                for n in sizes}
            setting["attacks"][attack] = stats
        setting["max_auc"] = max(stats["auc"][0] for stats in setting["attacks"].values())
        settings.append(setting)
    return settings


def benchmark_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The benchmark table as columns and rows of plain values (written to benchmark.csv, logged to W&B):
    one row per setting; a metric's column holds its mean over the seeds, `<metric>_sd` its sample sd
    (None for a single seed). `max_auc` is the largest of the attacks' mean signed AUCs."""
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    varying = varying_keys(rows, replicates=False)
    columns = ["job", *varying, "model", "defense", "strength", "n_seeds", "seeds", "epsilon", "epsilon_sd",
               "utility_metric", "utility", "utility_sd", "training_steps", "blind_auc", "blind_auc_sd",
               "blind_shifted", "dcr_share", "dcr_share_sd", "max_auc"]
    for attack in attacks:
        columns += [f"{attack}/{name}{suffix}" for name, _, _ in ATTACK_METRICS for suffix in ("", "_sd")]
    table = []
    for setting in _settings(rows):
        line = [",".join(setting["jobs"]), *(setting["overrides"].get(k, "") for k in varying), setting["model"],
                setting["defense"], setting["strength"], setting["n_seeds"],
                ",".join(str(seed) for seed in setting["seeds"]), *setting["epsilon"], setting["utility_metric"],
                *setting["utility"], setting["training_steps"], *setting["blind_auc"], setting["blind_shifted"],
                *setting["dcr_share"], setting["max_auc"]]
        for attack in attacks:
            stats = setting["attacks"].get(attack)
            line += [None] * 2 * len(ATTACK_METRICS) if stats is None else [
                value for name, _, _ in ATTACK_METRICS for value in stats[name]]
        table.append(line)
    return columns, table


def _seeds_cell(setting: dict) -> str:
    return "1 (single seed)" if setting["n_seeds"] == 1 else str(setting["n_seeds"])


def _benchmark_markdown(rows: list[dict]) -> list[str]:
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    varying = [k for k in varying_keys(rows, replicates=False) if k not in ("model", "defense")]
    with_utility = any(row["utility"] is not None for row in rows)
    metrics = sorted({row["utility_metric"] for row in rows if row["utility_metric"]})
    settings = _settings(rows)
    with_blind = any(row["blind_auc"] is not None for row in rows)
    with_share = any(row["dcr_share"] is not None for row in rows)
    head = ["model", "defense", "strength", *varying, "seeds", "ε", *(["utility ↓"] if with_utility else []),
            "max AUC (signed)", *(["blind AUC"] if with_blind else []), *(["DCR share"] if with_share else []),
            *attacks]
    lines = ["# Benchmark: every attack's AUC / TPR@1% / TPR@0.1% per setting", "",
             "AUCs as each run wrote them: signed (the sign declared by the attack or learnt on the labelled "
             "calibration subset), never max(AUC, 1 − AUC); `max AUC (signed)` is the largest of them. "
             "`a ± b`: mean ± sample sd over the seeds (target models) of the `seeds` column; a single seed is "
             "one target model and carries no spread. `blind AUC`: members told from non-members without the "
             "model (0.5 = same distribution)."
             + (" `DCR share`: the share of synthetic rows closer to the members than to as many non-members "
                "(SDMetrics' DCROverfittingProtection, mia_gen/dcr.py; 0.5 = no sign of overfitting)." if with_share
                else ""), ""]
    shifted = [",".join(setting["jobs"]) for setting in settings if setting["blind_shifted"]]
    if shifted:
        lines += [f"**WARNING: distribution-shifted split in job(s) {'; '.join(shifted)}: the blind baseline tells "
                  "members from non-members without the model, so their attack AUCs overstate leakage.**", ""]
    if with_utility:
        lines += [f"Utility: {', '.join(metrics)} of the samples against the dataset (lower is better; "
                  "fid_classifier is the offline fallback in a digit classifier's feature space, comparable "
                  "only within this table).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in settings:
        cells = [setting["model"], setting["defense"] or "–", setting["strength"] or "–",
                 *(setting["overrides"].get(k, "") for k in varying), _seeds_cell(setting),
                 _stat(setting["epsilon"], 2)]
        if with_utility:
            cells.append(_stat(setting["utility"], 2))
        cells.append(f"{setting['max_auc']:.3f}")
        if with_blind:
            cells.append(_stat(setting["blind_auc"]) + (" (shifted)" if setting["blind_shifted"] else ""))
        if with_share:
            cells.append(_stat(setting["dcr_share"]))
        for attack in attacks:
            stats = setting["attacks"].get(attack)
            cells.append("–" if stats is None else " / ".join(_stat(stats[name], digits)
                                                              for name, _, digits in ATTACK_METRICS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _by_swept_value(rows: list[dict], x: str) -> tuple[list[str], dict[str, dict], list[str]]:
    """The attacks, the settings keyed by the value of `x`, and the values in order."""
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    table = {setting["overrides"].get(x, "?"): setting for setting in _settings(rows)}
    return attacks, table, sorted(table, key=_sort_key)


def _swept_markdown(rows: list[dict], x: str, plot_name: str) -> list[str]:
    attacks, table, xs = _by_swept_value(rows, x)

    def cell(stats):
        if stats is None:
            return "–"
        ci = stats["ci95"]
        return _stat(stats["auc"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    with_epsilon = any(row["epsilon"] is not None for row in rows)
    head = [x, "seeds", *(["ε"] if with_epsilon else []), *attacks]
    lines = [f"# AUC against {x}", "",
             "Single seed: AUC [95% CI]; several seeds: mean ± sd over them.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {value} | {_seeds_cell(table[value])} | "
              + (f"{_stat(table[value]['epsilon'], 2)} | " if with_epsilon else "")
              + " | ".join(cell(table[value]["attacks"].get(a)) for a in attacks) + " |" for value in xs]
    grouped = [(value, f"{a}{label}", table[value]["attacks"][a][curve]) for value in xs for a in attacks
               for curve, label in (("group_auc", ""), ("group_auc_per_record_average", " (per-record average)"))
               if a in table[value]["attacks"] and table[value]["attacks"][a].get(curve)]
    if grouped:
        sizes = sorted({int(n) for _, _, g in grouped for n in g})
        lines += ["", "## AUC of deciding n records jointly (co-membership; mean over seeds)", "",
                  f"| {x} | attack | " + " | ".join(f"n={n}" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 2)]
        lines += [f"| {value} | {a} | " + " | ".join(_number(g.get(str(n))) for n in sizes) + " |"
                  for value, a, g in grouped]
    return lines + ["", f"![AUC against {x}]({plot_name})", ""]


def _plot_swept(rows: list[dict], x: str, path: Path) -> None:
    attacks, table, xs = _by_swept_value(rows, x)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    numeric = all(isinstance(_as_number(v), float) for v in xs)
    positions = [_as_number(v) if numeric else i for i, v in enumerate(xs)]
    for attack in attacks:
        points = [(p, table[v]["attacks"][attack]) for p, v in zip(positions, xs) if attack in table[v]["attacks"]]
        ax.plot([p for p, _ in points], [stats["auc"][0] for _, stats in points], marker="o", label=attack)
        band = [(p, _band(stats)) for p, stats in points if _band(stats)]
        if band:
            ax.fill_between([p for p, _ in band], [b[0] for _, b in band], [b[1] for _, b in band], alpha=0.15)
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 8:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(positions, xs)
    ax.axhline(0.5, color="gray", linestyle="--", label="chance")
    ax.set_xlabel(x)
    ax.set_ylabel("AUC (band: ± sd over seeds, or the 95% CI of one seed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _band(stats: dict) -> list[float] | None:
    """mean ± sd over seeds, or the single seed's 95% CI."""
    mean, sd = stats["auc"]
    return [mean - sd, mean + sd] if sd is not None else stats["ci95"]


def _plot_privacy_utility(rows: list[dict], path: Path) -> None:
    """Best attack's (mean signed) AUC against (mean) utility (FID, lower is better), one point per setting,
    one colour per model."""
    settings = [setting for setting in _settings(rows) if setting["utility"][0] is not None]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    for model in dict.fromkeys(setting["model"] for setting in settings):
        mine = [setting for setting in settings if setting["model"] == model]
        ax.scatter([setting["utility"][0] for setting in mine], [setting["max_auc"] for setting in mine],
                   label=model, zorder=3)
        for setting in mine:  # the defense's name; its strength is in the table
            ax.annotate(setting["defense"] or setting["jobs"][0], (setting["utility"][0], setting["max_auc"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.5, color="gray", linestyle="--", label="chance")
    metrics = sorted({setting["utility_metric"] for setting in settings})
    ax.set_xlabel(f"utility: {', '.join(metrics)} (lower is better)")
    ax.set_ylabel("best attack's signed AUC (lower is more private)")
    if settings and min(setting["utility"][0] for setting in settings) > 0:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def summarize(sweep_dir: str | Path, x: str | None = None, logger_cfg: Any = "auto") -> dict[str, Path]:
    """Write summary.csv, benchmark.csv, summary.md and the plots into `sweep_dir`; returns their paths.

    x: the swept override key of the AUC-against-x table and plot (default: the one override other
    than `seed` that varies). logger_cfg: a `logger` config to log the table and plots with, None for
    none, or "auto": the logger the sweep's first job ran with (its `.hydra/config.yaml`)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if x == REPLICATE_KEY:
        raise MiaGenError(f"`{REPLICATE_KEY}` is the replicate key: jobs that differ only by it are averaged "
                          "(mean ± sd), not plotted against it; pass another swept key with --x, or none.")
    varying = varying_keys(rows, replicates=False)
    if x is None and len(varying) == 1:
        x = varying[0]
    if x is None and not varying_keys(rows):
        raise MiaGenError("no override varies across the jobs of this sweep; pass the swept key with --x.")
    paths = {"csv": sweep_dir / "summary.csv", "benchmark": sweep_dir / "benchmark.csv",
             "md": sweep_dir / "summary.md"}
    if x is not None:
        paths["plot"] = sweep_dir / f"auc_vs_{x.replace('/', '_')}.png"
    if any(row["utility"] is not None for row in rows):
        paths["privacy_utility"] = sweep_dir / "privacy_utility.png"

    keys = list(dict.fromkeys([*([x] if x else []), *varying_keys(rows)]))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "model", "defense", "strength", "epsilon", "utility_metric", "utility",
                         "training_steps", "attack", "auc", "ci95_low", "ci95_high", "tpr_at_fpr", "group_auc",
                         "group_auc_per_record_average",
                         "sign", "sign_source", "seed", "blind_auc", "dcr_share", "job"])
        for job in _jobs(rows):
            for attack, row in job["attacks"].items():
                ci = row["ci95"] or [math.nan, math.nan]
                writer.writerow([*(row["overrides"].get(k, "") for k in keys), row["model"], row["defense"],
                                 row["strength"], "" if row["epsilon"] is None else row["epsilon"],
                                 row["utility_metric"], "" if row["utility"] is None else row["utility"],
                                 "" if row["training_steps"] is None else row["training_steps"],
                                 attack, row["auc"], ci[0], ci[1], json.dumps(row["tpr_at_fpr"]),
                                 json.dumps(row["group_auc"]) if row["group_auc"] else "",
                                 json.dumps(row["group_auc_per_record_average"])
                                 if row.get("group_auc_per_record_average") else "",
                                 *("" if row[k] is None else row[k] for k in ("sign", "sign_source", "seed",
                                                                              "blind_auc", "dcr_share")), row["job"]])
    columns, table = benchmark_table(rows)
    with open(paths["benchmark"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in line] for line in table])

    lines = _benchmark_markdown(rows)
    if x is not None:
        lines += _swept_markdown(rows, x, paths["plot"].name)
        _plot_swept(rows, x, paths["plot"])
    if "privacy_utility" in paths:
        _plot_privacy_utility(rows, paths["privacy_utility"])
        lines += ["![Best attack's AUC against utility](privacy_utility.png)", ""]
    paths["md"].write_text("\n".join(lines))
    _log_to_wandb(sweep_dir, rows, paths, logger_cfg)
    log.info("sweep summary: %s", paths["md"])
    return paths


def _sweep_logger(sweep_dir: Path) -> Any:
    """The `logger` config the sweep's jobs ran with (None when they logged nothing)."""
    for config in sorted(sweep_dir.rglob(".hydra/config.yaml")):
        return (yaml.safe_load(config.read_text()) or {}).get("logger")
    return None


def _log_to_wandb(sweep_dir: Path, rows: list[dict], paths: dict[str, Path], logger_cfg: Any) -> None:
    from mia_gen.experiments.tracking import make_tracker

    if logger_cfg == "auto":
        logger_cfg = _sweep_logger(sweep_dir)
    if not logger_cfg or logger_cfg.get("name", "none") == "none":
        return
    columns, table = benchmark_table(rows)  # the same table as benchmark.csv
    tracker = make_tracker(logger_cfg, sweep_dir, {"sweep_dir": str(sweep_dir)}, job_name=f"summary-{sweep_dir.name}")
    try:
        tracker.log_table("benchmark", columns, table)
        for name in ("plot", "privacy_utility"):
            if name in paths:
                tracker.log_image(paths[name].stem, paths[name])
        tracker.log_artifact("sweep-summary", [paths["csv"], paths["benchmark"], paths["md"]], "summary")
    finally:
        tracker.finish()


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise it (`hydra.callbacks.summary`)."""

    def __init__(self, x: str | None = None) -> None:
        self.x = x

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            paths = summarize(sweep_dir, self.x)
            print(paths["md"].read_text())
        except MiaGenError as error:  # e.g. every job failed: the jobs' own errors say why
            log.error("sweep summary not written: %s", error)


def main(argv: list[str] | None = None) -> int:
    """`mia-gen-summarize <sweep_dir> [--x <override key>]`."""
    import argparse

    import mia_gen
    import sys

    parser = argparse.ArgumentParser(prog="mia-gen-summarize",
                                     description="Summarise a mia-gen sweep: the benchmark table (defense, strength, "
                                                 "epsilon, utility, every attack's AUC / TPR@1% / TPR@0.1%, as mean ± "
                                                 "sd over jobs that differ only by seed) and plots.")
    parser.add_argument("--version", action="version", version=f"mia-gen {mia_gen.__version__}")
    parser.add_argument("sweep_dir", help="the multirun directory (e.g. multirun/2026-11-22/17-00-00)")
    parser.add_argument("--x", default=None,
                        help="the swept override key (default: the one other than seed that varies)")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the table to W&B (default: log it when the sweep's jobs did)")
    args = parser.parse_args(argv)
    try:
        paths = summarize(args.sweep_dir, args.x, logger_cfg=None if args.no_wandb else "auto")
    except MiaGenError as error:
        print(f"mia-gen-summarize: error: {error}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    return 0
