"""Summarise a sweep: every job's results.json into one table and a plot of AUC against the swept value.

A Hydra multirun writes one job directory per setting (`<sweep>/<n>/results.json` and
`<sweep>/<n>/.hydra/overrides.yaml`). `summarize(sweep_dir)` finds the override that varies across
jobs (or takes `x`), and writes, in the sweep directory:

- `summary.csv`: one row per (job, attack): the job's overrides, attack, AUC, its 95% CI, TPR at
  each FPR and, for co-membership, AUC per group size;
- `summary.md`: AUC per attack (columns) against the swept value (rows), with the CI;
- `auc_vs_<x>.png`: AUC against the swept value, one line per attack, with the CI as a band.

Used by `mia-gen-summarize <sweep_dir>` and, inside a sweep, by the Hydra callback `SweepSummary`.
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
        for entry in payload.get("attacks", []):
            rows.append({
                "job": str(job_dir.relative_to(sweep_dir)), "overrides": _overrides(job_dir),
                "attack": entry["attack"], "auc": entry["auc"], "ci95": entry.get("ci95", {}).get("auc"),
                "tpr_at_fpr": entry.get("tpr_at_fpr", {}), "group_auc": entry.get("group_auc"),
                "n_members": entry.get("n_members"), "n_non_members": entry.get("n_non_members"),
                "epsilon": (payload.get("metadata", {}).get("privacy") or {}).get("epsilon"),
            })
    if not rows:
        raise MiaGenError(f"no results.json under {sweep_dir}; run the sweep (`mia-gen -m ...`) first.")
    return rows


def swept_key(rows: list[dict]) -> str:
    """The override whose value differs between jobs (the first such key)."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in row["overrides"].items():
            values.setdefault(key, set()).add(value)
    varying = [key for key, seen in values.items() if len(seen) > 1]
    if not varying:
        raise MiaGenError("no override varies across the jobs of this sweep; pass the swept key with --x.")
    return varying[0]


def _as_number(value: str) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _sort_key(value: str):
    number = _as_number(value)
    return (0, number, "") if isinstance(number, float) else (1, 0.0, str(number))


def summarize(sweep_dir: str | Path, x: str | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md and auc_vs_<x>.png into `sweep_dir`; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    x = x or swept_key(rows)
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        table.setdefault(row["overrides"].get(x, "?"), {})[row["attack"]] = row
    xs = sorted(table, key=_sort_key)

    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md",
             "plot": sweep_dir / f"auc_vs_{x.replace('/', '_')}.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([x, "attack", "auc", "ci95_low", "ci95_high", "tpr_at_fpr", "group_auc", "epsilon", "job"])
        for value in xs:
            for attack, row in table[value].items():
                ci = row["ci95"] or [math.nan, math.nan]
                writer.writerow([value, attack, row["auc"], ci[0], ci[1], json.dumps(row["tpr_at_fpr"]),
                                 json.dumps(row["group_auc"]) if row["group_auc"] else "",
                                 "" if row["epsilon"] is None else row["epsilon"], row["job"]])

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
    lines += ["", f"![AUC against {x}]({paths['plot'].name})", ""]
    paths["md"].write_text("\n".join(lines))

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
    figure.savefig(paths["plot"], dpi=120)
    log.info("sweep summary: %s", paths["md"])
    return paths


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
                                     description="Summarise a mia-gen sweep: AUC table and plot against the swept value.")
    parser.add_argument("sweep_dir", help="the multirun directory (e.g. multirun/2026-11-22/17-00-00)")
    parser.add_argument("--x", default=None, help="the swept override key (default: the one that varies)")
    args = parser.parse_args(argv)
    try:
        paths = summarize(args.sweep_dir, args.x)
    except MiaGenError as error:
        print(f"mia-gen-summarize: error: {error}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    return 0
