"""Summarise a sweep: every job's results.json into one benchmark table and plots.

A Hydra multirun writes one job directory per setting (`<sweep>/<n>/results.json` and
`<sweep>/<n>/.hydra/overrides.yaml`). `summarize(sweep_dir)` writes, in the sweep directory:

- `summary.csv`: one row per (job, attack): the job's swept overrides, model, defense, its strength,
  the epsilon a DP-trained model spent, the utility (FID, and which feature space), training steps,
  then the attack's AUC with its 95% CI, TPR at each FPR and, for co-membership, AUC per group size;
- `summary.md`: the benchmark table (one row per job: defense, strength, ε, utility, and every
  attack's AUC / TPR@1% / TPR@0.1%), then, when one override varies (or `x` is given), AUC per
  attack against it;
- `auc_vs_<x>.png`: AUC against the swept value, one line per attack, the CI as a band;
- `privacy_utility.png`: the best attack's AUC against utility, one point per job (when the runs
  measured utility).

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

import yaml
from matplotlib.figure import Figure

from mia_gen.errors import MiaGenError

log = logging.getLogger(__name__)

DEFENSE_ORDER = ("none", "augmentation", "weight_decay", "early_stopping", "dp_sgd", "federated")


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
                "n_members": entry.get("n_members"), "n_non_members": entry.get("n_non_members"),
            })
    if not rows:
        raise MiaGenError(f"no results.json under {sweep_dir}; run the sweep (`mia-gen -m ...`) first.")
    return rows


def varying_keys(rows: list[dict]) -> list[str]:
    """The overrides whose value differs between jobs, in the order they first appear."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in row["overrides"].items():
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1]


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


def _jobs(rows: list[dict]) -> list[dict]:
    """One entry per job, with its attacks' rows, in benchmark order (model, defense, steps, job)."""
    jobs: dict[str, dict] = {}
    for row in rows:
        job = jobs.setdefault(row["job"], {**{k: row[k] for k in ("job", "overrides", "model", "defense", "strength",
                                                                    "epsilon", "utility", "utility_metric",
                                                                    "training_steps")}, "attacks": {}})
        job["attacks"][row["attack"]] = row
    order = {name: i for i, name in enumerate(DEFENSE_ORDER)}

    def key(job):
        number = job["job"].split("/")[-1]
        return (job["model"], order.get(job["defense"], len(order)), job["training_steps"] or 0,
                int(number) if number.isdigit() else 0, job["job"])

    return sorted(jobs.values(), key=key)


def benchmark_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The benchmark table as columns and rows of plain values (also logged to W&B)."""
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    varying = varying_keys(rows)
    columns = ["job", *varying, "model", "defense", "strength", "epsilon", "utility_metric", "utility",
               "training_steps", "max_auc"]
    for attack in attacks:
        columns += [f"{attack}/auc", f"{attack}/tpr@1%", f"{attack}/tpr@0.1%"]
    table = []
    for job in _jobs(rows):
        measured = job["attacks"]
        line = [job["job"], *(job["overrides"].get(k, "") for k in varying), job["model"], job["defense"],
                job["strength"], job["epsilon"], job["utility_metric"], job["utility"], job["training_steps"],
                max(r["auc"] for r in measured.values())]
        for attack in attacks:
            row = measured.get(attack)
            line += [None, None, None] if row is None else [
                row["auc"], row["tpr_at_fpr"].get("0.01"), row["tpr_at_fpr"].get("0.001")]
        table.append(line)
    return columns, table


def _benchmark_markdown(rows: list[dict]) -> list[str]:
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    varying = [k for k in varying_keys(rows) if k not in ("model", "defense")]
    with_utility = any(row["utility"] is not None for row in rows)
    metrics = sorted({row["utility_metric"] for row in rows if row["utility_metric"]})
    head = ["model", "defense", "strength", *varying, "ε", *(["utility ↓"] if with_utility else []), "max AUC",
            *attacks]
    lines = ["# Benchmark: every attack's AUC / TPR@1% / TPR@0.1% per job", ""]
    if with_utility:
        lines += [f"Utility: {', '.join(metrics)} of the samples against the dataset (lower is better; "
                  "fid_classifier is the offline fallback in a digit classifier's feature space, comparable "
                  "only within this table).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in _jobs(rows):
        measured = job["attacks"]
        cells = [job["model"], job["defense"] or "–", job["strength"] or "–",
                 *(job["overrides"].get(k, "") for k in varying), _number(job["epsilon"], 2)]
        if with_utility:
            cells.append(_number(job["utility"], 2))
        cells.append(f"{max(r['auc'] for r in measured.values()):.3f}")
        for attack in attacks:
            row = measured.get(attack)
            cells.append("–" if row is None else f"{row['auc']:.3f} / {_number(row['tpr_at_fpr'].get('0.01'), 2)}"
                         f" / {_number(row['tpr_at_fpr'].get('0.001'), 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _by_swept_value(rows: list[dict], x: str) -> tuple[list[str], dict[str, dict[str, dict]], list[str]]:
    """The attacks, the rows keyed by the value of `x` then by attack, and the values in order."""
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        table.setdefault(row["overrides"].get(x, "?"), {})[row["attack"]] = row
    return attacks, table, sorted(table, key=_sort_key)


def _swept_markdown(rows: list[dict], x: str, plot_name: str) -> list[str]:
    attacks, table, xs = _by_swept_value(rows, x)

    def cell(row):
        if row is None:
            return "–"
        ci = row["ci95"]
        return f"{row['auc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    def epsilon(value):  # the privacy a DP-trained model spent (same for every attack of a job)
        spent = [row["epsilon"] for row in table[value].values() if row["epsilon"] is not None]
        return f"{spent[0]:.2f}" if spent else "–"

    with_epsilon = any(row["epsilon"] is not None for row in rows)
    head = [x, *(["ε"] if with_epsilon else []), *attacks]
    lines = [f"# AUC against {x}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {value} | " + (f"{epsilon(value)} | " if with_epsilon else "")
              + " | ".join(cell(table[value].get(a)) for a in attacks) + " |" for value in xs]
    grouped = [(value, a, table[value][a]["group_auc"]) for value in xs for a in attacks
               if a in table[value] and table[value][a]["group_auc"]]
    if grouped:
        sizes = sorted({int(n) for _, _, g in grouped for n in g})
        lines += ["", "## AUC of deciding n records jointly (co-membership)", "",
                  f"| {x} | attack | " + " | ".join(f"n={n}" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 2)]
        lines += [f"| {value} | {a} | " + " | ".join(f"{g[str(n)]:.3f}" if str(n) in g else "–" for n in sizes) + " |"
                  for value, a, g in grouped]
    return lines + ["", f"![AUC against {x}]({plot_name})", ""]


def _plot_swept(rows: list[dict], x: str, path: Path) -> None:
    attacks, table, xs = _by_swept_value(rows, x)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    numeric = all(isinstance(_as_number(v), float) for v in xs)
    positions = [_as_number(v) if numeric else i for i, v in enumerate(xs)]
    for attack in attacks:
        points = [(p, table[v][attack]) for p, v in zip(positions, xs) if attack in table[v]]
        ax.plot([p for p, _ in points], [r["auc"] for _, r in points], marker="o", label=attack)
        with_ci = [(p, r["ci95"]) for p, r in points if r["ci95"]]
        if with_ci:
            ax.fill_between([p for p, _ in with_ci], [c[0] for _, c in with_ci], [c[1] for _, c in with_ci], alpha=0.15)
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 8:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(positions, xs)
    ax.axhline(0.5, color="gray", linestyle="--", label="chance")
    ax.set_xlabel(x)
    ax.set_ylabel("AUC")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _plot_privacy_utility(rows: list[dict], path: Path) -> None:
    """Best attack's AUC against utility (FID, lower is better), one point per job, one colour per model."""
    jobs = [job for job in _jobs(rows) if job["utility"] is not None]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    for model in dict.fromkeys(job["model"] for job in jobs):
        mine = [job for job in jobs if job["model"] == model]
        best = [max(r["auc"] for r in job["attacks"].values()) for job in mine]
        ax.scatter([job["utility"] for job in mine], best, label=model, zorder=3)
        for job, auc in zip(mine, best):  # the defense's name; its strength is in the table
            ax.annotate(job["defense"] or job["job"], (job["utility"], auc), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.5, color="gray", linestyle="--", label="chance")
    metrics = sorted({job["utility_metric"] for job in jobs})
    ax.set_xlabel(f"utility: {', '.join(metrics)} (lower is better)")
    ax.set_ylabel("best attack's AUC (lower is more private)")
    if jobs and min(job["utility"] for job in jobs) > 0:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def summarize(sweep_dir: str | Path, x: str | None = None, logger_cfg: Any = "auto") -> dict[str, Path]:
    """Write summary.csv, summary.md and the plots into `sweep_dir`; returns their paths.

    logger_cfg: a `logger` config to log the table and plots with, None for none, or "auto": the
    logger the sweep's first job ran with (its `.hydra/config.yaml`)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    varying = varying_keys(rows)
    if x is None and len(varying) == 1:
        x = varying[0]
    if x is None and not varying:
        raise MiaGenError("no override varies across the jobs of this sweep; pass the swept key with --x.")
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    if x is not None:
        paths["plot"] = sweep_dir / f"auc_vs_{x.replace('/', '_')}.png"
    if any(row["utility"] is not None for row in rows):
        paths["privacy_utility"] = sweep_dir / "privacy_utility.png"

    keys = list(dict.fromkeys([*([x] if x else []), *varying]))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "model", "defense", "strength", "epsilon", "utility_metric", "utility",
                         "training_steps", "attack", "auc", "ci95_low", "ci95_high", "tpr_at_fpr", "group_auc", "job"])
        for job in _jobs(rows):
            for attack, row in job["attacks"].items():
                ci = row["ci95"] or [math.nan, math.nan]
                writer.writerow([*(row["overrides"].get(k, "") for k in keys), row["model"], row["defense"],
                                 row["strength"], "" if row["epsilon"] is None else row["epsilon"],
                                 row["utility_metric"], "" if row["utility"] is None else row["utility"],
                                 "" if row["training_steps"] is None else row["training_steps"],
                                 attack, row["auc"], ci[0], ci[1], json.dumps(row["tpr_at_fpr"]),
                                 json.dumps(row["group_auc"]) if row["group_auc"] else "", row["job"]])

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
    from mia_gen.tracking import make_tracker

    if logger_cfg == "auto":
        logger_cfg = _sweep_logger(sweep_dir)
    if not logger_cfg or logger_cfg.get("name", "none") == "none":
        return
    columns, table = benchmark_table(rows)
    tracker = make_tracker(logger_cfg, sweep_dir, {"sweep_dir": str(sweep_dir)}, job_name=f"summary-{sweep_dir.name}")
    try:
        tracker.log_table("benchmark", columns, table)
        for name in ("plot", "privacy_utility"):
            if name in paths:
                tracker.log_image(paths[name].stem, paths[name])
        tracker.log_artifact("sweep-summary", [paths["csv"], paths["md"]], "summary")
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
    import sys

    parser = argparse.ArgumentParser(prog="mia-gen-summarize",
                                     description="Summarise a mia-gen sweep: the benchmark table (defense, strength, "
                                                 "epsilon, utility, every attack's AUC / TPR@1% / TPR@0.1%) and plots.")
    parser.add_argument("sweep_dir", help="the multirun directory (e.g. multirun/2026-11-22/17-00-00)")
    parser.add_argument("--x", default=None, help="the swept override key (default: the one that varies)")
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
