"""Pictures and the markdown report of a run, readable without W&B.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg
when saved): no pyplot state, no display needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from mia_gen.errors import MiaGenError
from mia_gen.metrics import auc, fpr_is_resolvable, roc_points, tpr_at_fpr

__all__ = [
    "ShadowROC",
    "format_results_table",
    "plot_nearest_neighbours",
    "plot_roc",
    "plot_roc_shadows",
    "plot_score_histograms",
    "shadows_text",
    "unscored_lines",
    "write_report",
]

Curves = Mapping[str, tuple[Sequence, Sequence]]

# The FPR bound of the TPR quoted in the ROC legend.
_LEGEND_ALPHA = 0.01


def _as_numpy(array) -> np.ndarray:
    """numpy view of an array-like or a (CPU or GPU) torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_curves(curves: Curves) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not curves:
        raise MiaGenError("No attack scores to plot: pass {attack_name: (labels, scores)}, one attack at least.")
    return {name: (_as_numpy(labels), _as_numpy(scores)) for name, (labels, scores) in curves.items()}


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_roc(curves: Curves, path) -> Path:
    """Log-log ROC curves of several attacks on one plot, with the chance line.

    The FPR axis runs from `min(1e-4, 1 / n_non_members)` to 1 (the TPR axis likewise with
    members): the low-FPR regime is where membership leakage matters. Points at FPR or TPR 0
    are drawn at the axis floor, since a log axis cannot show 0; the FPR range below
    1 / n_non_members, which the evaluation cannot resolve, is shaded.

    Args:
        curves: `{attack_name: (labels, scores)}`, labels `(N,)` 1 = member / 0 = non-member,
            scores `(N,)` with higher = more likely a member.
        path: the image file to write (e.g. `roc.png`).

    Returns:
        The path written.
    """
    return _save(_roc_figure(_check_curves(curves)), path)


def _roc_legend(name: str, labels: np.ndarray, scores: np.ndarray, detail: str = "") -> str:
    return (f"{name} ({detail}AUC {auc(labels, scores):.3f}, "
            f"TPR@{_LEGEND_ALPHA:.0%}FPR {tpr_at_fpr(labels, scores, _LEGEND_ALPHA):.3f})")


def _roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    figure = Figure(figsize=(5.5, 5))
    ax = figure.subplots()
    floors = _roc_floors(list(curves.values()))
    for name, (labels, scores) in curves.items():
        _roc_line(ax, labels, scores, floors, label=_roc_legend(name, labels, scores))
    _finish_roc_axes(ax, list(curves.values()), floors, "ROC (log-log)")
    return figure


def _roc_floors(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The axes' lower ends: `min(1e-4, 1 / n)` with n the most non-members (FPR) / members (TPR)."""
    n_members = max(int((labels == 1).sum()) for labels, _ in curves)
    n_non_members = max(int((labels == 0).sum()) for labels, _ in curves)
    return min(1e-4, 1.0 / max(n_non_members, 1)), min(1e-4, 1.0 / max(n_members, 1))


def _roc_line(ax, labels: np.ndarray, scores: np.ndarray, floors: tuple[float, float], **style) -> None:
    fpr, tpr, _ = roc_points(labels, scores)
    # Straight segments between ROC points: a staircase, with diagonals only across ties.
    ax.plot(np.maximum(fpr, floors[0]), np.maximum(tpr, floors[1]), **style)


def _finish_roc_axes(ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], floors: tuple[float, float],
                     title: str) -> None:
    """Chance line, the unresolvable FPR range shaded, log-log axes from the floors to 1, legend."""
    fpr_floor, tpr_floor = floors
    chance = np.array([min(fpr_floor, tpr_floor), 1.0])
    ax.plot(chance, chance, linestyle="--", color="grey", linewidth=1, label="chance")
    fpr_resolution = 1.0 / max(min(int((labels == 0).sum()) for labels, _ in curves), 1)
    if fpr_resolution > fpr_floor:
        # Below 1/n_non_members the evaluation has no ROC point other than FPR = 0.
        ax.axvspan(fpr_floor, fpr_resolution, color="grey", alpha=0.12, label="FPR < 1/n_non_members")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(fpr_floor, 1.0)
    ax.set_ylim(tpr_floor, 1.0)
    ax.set_xlabel("false positive rate (non-members called members)")
    ax.set_ylabel("true positive rate (members found)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


class ShadowROC(NamedTuple):
    """One shadow-model attack and the statistic it wraps, on the same evaluated records.

    labels (`(N,)`, 1 = member): the records'; scores (`(N,)`): the attack's, higher = member;
    base_attack: the base statistic's attack name (e.g. `diffusion_loss`); base_scores (`(N,)`): its scores
    on the target model, higher = member; shadows: the shadows the scores used (`shadows_text`, "8" or "6 of 8").
    """

    labels: np.ndarray
    scores: np.ndarray
    base_attack: str
    base_scores: np.ndarray
    shadows: str


def plot_roc_shadows(attacks: Mapping[str, ShadowROC], path) -> Path:
    """Log-log ROC of each shadow-model attack (solid) beside its base statistic (dashed, same colour),
    axes and chance line as in `plot_roc`: what the shadow models add at low FPR.

    Args:
        attacks: `{attack_name: ShadowROC}`, one attack at least.
        path: the image file to write (e.g. `roc_shadows.png`).

    Returns:
        The path written.
    """
    if not attacks:
        raise MiaGenError("No shadow-model attack to plot: pass {attack_name: ShadowROC(...)}, one at least.")
    return _save(_roc_shadows_figure(attacks), path)


def _roc_shadows_figure(attacks: Mapping[str, ShadowROC]) -> Figure:
    figure = Figure(figsize=(5.5, 5))
    ax = figure.subplots()
    curves = [(_as_numpy(a.labels), _as_numpy(a.scores)) for a in attacks.values()]
    floors = _roc_floors(curves)
    for i, (name, attack) in enumerate(attacks.items()):
        labels, scores = curves[i]
        base_scores = _as_numpy(attack.base_scores)
        _roc_line(ax, labels, scores, floors, color=f"C{i}",
                  label=_roc_legend(name, labels, scores, detail=f"{attack.shadows} shadows; "))
        _roc_line(ax, labels, base_scores, floors, color=f"C{i}", linestyle="--",
                  label=_roc_legend(f"  base: {attack.base_attack}", labels, base_scores))
    _finish_roc_axes(ax, curves, floors, "Shadow-model attacks beside their base statistic (log-log)")
    return figure


def plot_score_histograms(curves: Curves, path) -> Path:
    """Member vs non-member score histograms, one subplot per attack.

    Args:
        curves: `{attack_name: (labels, scores)}` as for `plot_roc`.
        path: the image file to write.

    Returns:
        The path written.
    """
    return _save(_histogram_figure(_check_curves(curves)), path)


def _histogram_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    n_cols = min(3, len(curves))
    n_rows = math.ceil(len(curves) / n_cols)
    figure = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows))
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (name, (labels, scores)) in zip(axes, curves.items()):
        scores = scores.astype(np.float64)
        # Shared bins so the two classes are comparable; density since class sizes may differ.
        bins = np.histogram_bin_edges(scores, bins=min(50, max(10, scores.size // 10)))
        for value, group in ((1, "members"), (0, "non-members")):
            selected = scores[labels == value]
            ax.hist(selected, bins=bins, density=True, alpha=0.55, label=f"{group} (n={selected.size})")
        ax.set_title(name)
        ax.set_xlabel("score (higher = more likely member)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    for ax in axes[len(curves) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure


def _auc_lines(series: Mapping[str, Mapping[str, float]], path, xlabel: str, title: str, log2_x: bool = False) -> Path:
    """AUC against an integer setting, one line per attack (`{attack: {str(x): auc}}`), with chance."""
    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = figure.subplots()
    for name, by_x in series.items():
        points = sorted((int(x), float(value)) for x, value in by_x.items())
        ax.plot([x for x, _ in points], [v for _, v in points], marker="o", label=name)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.axhline(0.5, color="gray", linestyle="--", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def plot_timestep_sweep(sweeps: Mapping[str, Mapping[str, float]], path) -> Path:
    """AUC against the diffusion timestep t, one line per attack, with the chance level.

    Args:
        sweeps: `{attack_name: {str(t): auc}}`.
        path: the image file to write.
    """
    if not sweeps:
        raise MiaGenError("No timestep sweep to plot: pass {attack_name: {t: auc}}.")
    return _auc_lines(sweeps, path, "timestep t", "AUC against the diffusion timestep")


def plot_group_auc(groups: Mapping[str, Mapping[str, float]], path) -> Path:
    """AUC against the group size n (co-membership), one line per series, log2 x axis: the joint attack
    beside the per-record-average baseline on the same groups.

    Args:
        groups: `{series_name: {str(n): auc}}`, e.g. `{"co_membership": ..., "co_membership (per-record average)": ...}`.
        path: the image file to write.
    """
    if not groups:
        raise MiaGenError("No group AUCs to plot: pass {attack_name: {n: auc}}.")
    return _auc_lines(groups, path, "targets decided together (n)", "Co-membership: AUC against group size",
                      log2_x=True)


def _group_auc_cell(values: Mapping, intervals: Mapping | None, n: str) -> str:
    if n not in values:
        return "–"
    interval = (intervals or {}).get(n)
    return f"{values[n]:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _group_auc_lines(results: Sequence[Mapping]) -> list[str]:
    """report.md's co-membership table: per attack and group size n, the AUC of the joint decision
    (`group_auc`) beside the mean of per-record scores over the same groups (`group_auc_per_record_average`),
    each with its 95% interval, and how many groups of each class decided it."""
    lines = []
    for result in results:
        joint, average = result.get("group_auc"), result.get("group_auc_per_record_average")
        if not joint:
            continue
        sizes = sorted(joint, key=int)
        counts = result.get("n_groups") or {}
        lines += [f"## Groups of n records decided jointly ({result['attack']})", "",
                  "AUC [95% DeLong interval] over groups of n members against groups of n non-members (the same "
                  "disjoint groups in both rows).", "",
                  "| | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes),
                  "| joint (attack network refined on the group) | "
                  + " | ".join(_group_auc_cell(joint, result.get("group_auc_ci"), n) for n in sizes) + " |"]
        if average:
            lines.append("| mean of per-record scores | "
                         + " | ".join(_group_auc_cell(average, result.get("group_auc_per_record_average_ci"), n)
                                      for n in sizes) + " |")
        if counts:
            lines.append("| groups (members / non-members) | "
                         + " | ".join("/".join(map(str, counts[n])) if n in counts else "–" for n in sizes) + " |")
        lines.append("")
    return lines


def _to_display(images: np.ndarray, what: str) -> np.ndarray:
    """`(..., C, H, W)` in [-1, 1] with C in {1, 3} -> `(..., H, W, C)` in [0, 1]."""
    if images.shape[-3] not in (1, 3):
        raise MiaGenError(
            f"{what} must have 1 or 3 channels in NCHW layout; got shape {images.shape}. "
            "If your images are NHWC, permute them to NCHW first."
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise MiaGenError(
            f"{what} must be in [-1, 1] (the framework's image convention); got values in "
            f"[{lo:.3g}, {hi:.3g}]. Convert [0, 1] images with x * 2 - 1, uint8 with x / 127.5 - 1."
        )
    return np.clip((np.moveaxis(images.astype(np.float32), -3, -1) + 1.0) / 2.0, 0.0, 1.0)


def plot_nearest_neighbours(queries, neighbours, path, query_labels=None, distances=None) -> Path:
    """Query records beside their nearest generated samples.

    Args:
        queries: `(Q, C, H, W)` in [-1, 1], C in {1, 3}: the records under attack.
        neighbours: `(Q, k, C, H, W)` in [-1, 1]: each query's k nearest generated samples,
            nearest first.
        path: the image file to write.
        query_labels: optional `(Q,)`, 1 = member / 0 = non-member, shown in row titles.
        distances: optional `(Q, k)` distances to the neighbours, shown in titles.

    Returns:
        The path written.
    """
    return _save(_neighbours_figure(queries, neighbours, query_labels, distances), path)


def _neighbours_figure(queries, neighbours, query_labels, distances) -> Figure:
    queries, neighbours = _as_numpy(queries), _as_numpy(neighbours)
    if queries.ndim != 4 or neighbours.ndim != 5 or neighbours.shape[0] != queries.shape[0]:
        raise MiaGenError(
            f"queries must be (Q, C, H, W) and neighbours (Q, k, C, H, W) with the same Q; got "
            f"{queries.shape} and {neighbours.shape}. Stack each query's k nearest samples "
            "along axis 1."
        )
    if neighbours.shape[2:] != queries.shape[1:]:
        raise MiaGenError(
            f"neighbours' images {neighbours.shape[2:]} differ from the queries' {queries.shape[1:]}; "
            "compare records and samples at the same resolution and channel count."
        )
    n_queries, k = neighbours.shape[:2]
    expected_shapes = (("query_labels", query_labels, (n_queries,)), ("distances", distances, (n_queries, k)))
    for name, value, shape in expected_shapes:
        if value is not None and _as_numpy(value).shape != shape:
            got = _as_numpy(value).shape
            raise MiaGenError(f"{name} must have shape {shape} (one per query / neighbour); got {got}.")
    queries = _to_display(queries, "queries")
    neighbours = _to_display(neighbours, "neighbours")
    labels = None if query_labels is None else _as_numpy(query_labels)
    distances = None if distances is None else _as_numpy(distances).astype(np.float64)

    # One column per query: the query on top, its neighbours below, so the picture stays wide
    # and short whatever k is.
    figure = Figure(figsize=(1.25 * n_queries + 0.6, 1.35 * (k + 1) + 0.6), layout="constrained")
    axes = figure.subplots(k + 1, n_queries, squeeze=False)
    cmap = "gray" if queries.shape[-1] == 1 else None
    for q in range(n_queries):
        column = [queries[q]] + [neighbours[q, j] for j in range(k)]
        for j, (ax, image) in enumerate(zip(axes[:, q], column)):
            ax.imshow(image.squeeze(-1) if cmap else image, cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                title = "query" if labels is None else ("member" if int(labels[q]) == 1 else "non-member")
            else:
                title = f"#{j}" if distances is None else f"#{j} d={distances[q, j - 1]:.3g}"
            ax.set_title(title, fontsize=7)
    figure.suptitle("queries (top row) and their nearest generated samples (below)", fontsize=9)
    return figure


_REQUIRED_RESULT_KEYS = ("attack", "auc", "asr", "tpr_at_fpr", "n_members", "n_non_members")


def _alpha_label(alpha: float) -> str:
    return f"{alpha * 100:g}%"


def _sign_text(result: Mapping) -> str:
    """`+1 (declared)` / `-1 (labelled_subset)`: the direction the scores were read in, and its source."""
    if "sign" not in result:
        return "-"
    return f"{int(result['sign']):+d} ({result.get('sign_source', 'declared')})"


def shadows_text(result: Mapping) -> str:
    """The shadows an attack's scores used: `"8"`, `"6 of 8"` when fewer than requested (an incomplete
    zoo), `"-"` for an attack without shadow models."""
    n = result.get("n_shadows")
    if n is None:
        return "-"
    requested = result.get("n_shadows_requested")
    return f"{n} of {requested}" if requested is not None and int(requested) > int(n) else str(n)


def format_results_table(results: Sequence[Mapping]) -> str:
    """One row per attack as an aligned markdown table (plain text in a terminal too).

    Args:
        results: entries of `results.json`: `evaluate_scores` output plus `"attack"`, and
            optionally `"access"`, `"sign"` / `"sign_source"`, `"seconds"` and, for shadow-model
            attacks, `"n_shadows"` / `"n_shadows_requested"` (then a `shadows` column follows the
            TPR columns: `shadows_text`).

    Returns:
        The table; a TPR marked `*` has fewer than 1/alpha non-members behind it (not
        resolvable at that FPR), and a note below the table says so.
    """
    for i, result in enumerate(results):
        missing = [key for key in _REQUIRED_RESULT_KEYS if key not in result]
        if missing:
            raise MiaGenError(
                f"results[{i}] lacks {missing}; each entry must be evaluate_scores(...) output "
                "with 'attack' (and optionally 'access', 'seconds') added."
            )
    alphas = sorted({float(key) for r in results for key in r["tpr_at_fpr"]}, reverse=True)
    header = ["attack", "access", "sign", "AUC [95% CI]", "ASR"]
    header += [f"TPR@{_alpha_label(a)}FPR" for a in alphas]
    with_shadows = any(r.get("n_shadows") is not None for r in results)
    header += ["shadows"] * with_shadows + ["n_members", "n_non_members", "seconds"]
    rows = []
    unresolvable = False
    for r in results:
        ci = r.get("ci95", {}).get("auc")
        auc_text = f"{r['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        tprs = []
        for alpha in alphas:
            value = next((v for k, v in r["tpr_at_fpr"].items() if float(k) == alpha), None)
            if value is None:
                tprs.append("-")
                continue
            mark = "" if fpr_is_resolvable(alpha, r["n_non_members"]) else "*"
            unresolvable |= bool(mark)
            tprs.append(f"{value:.3f}{mark}")
        seconds = r.get("seconds")
        rows.append(
            [str(r["attack"]), str(r.get("access", "-")), _sign_text(r), auc_text, f"{r['asr']:.3f}", *tprs]
            + [shadows_text(r)] * with_shadows
            + [str(r["n_members"]), str(r["n_non_members"]), "-" if seconds is None else f"{seconds:.1f}"]
        )
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    numeric = [False, False, False] + [True] * (len(header) - 3)

    def line(cells):
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    # Markdown alignment row: numbers right-aligned ("---:").
    rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
    table = "\n".join([line(header), rule, *(line(row) for row in rows)])
    if unresolvable:
        table += "\n\n(*) fewer than 1/alpha non-members: the TPR is at FPR 0, not resolvable at that alpha."
    return table


# run_info keys shown first in the header, with their labels; any other keys follow. Flat
# keys ("dataset", "n_samples") and the pipeline's nested metadata ("data", "samples") both work.
_RUN_INFO_LABELS = {
    "config_hash": "config hash",
    "model": "model",
    "dataset": "dataset",
    "data": "dataset",
    "n_samples": "generated samples",
    "samples": "generated samples",
}


def unscored_lines(results: Sequence[Mapping]) -> list[str]:
    """One line per attack that left records unscored (`n_unscored` > 0), e.g. `lira: 3 of 320 records
    not scored: 3 with no OUT shadow`; the count is of the records the attack was evaluated on or
    would have been."""
    lines = []
    for r in results:
        n_unscored = int(r.get("n_unscored") or 0)
        if n_unscored:
            total = int(r["n_members"]) + int(r["n_non_members"]) + n_unscored
            reasons = ", ".join(f"{count} with {reason}" for reason, count in r.get("unscored_reasons", {}).items())
            lines.append(f"{r['attack']}: {n_unscored} of {total} records not scored: {reasons}")
    return lines


def _shadow_lines(results: Sequence[Mapping]) -> list[str]:
    """report.md's shadow-model section: each attack beside its base statistic (same records, same
    metrics), and a warning for each attack whose zoo had fewer shadows than requested."""
    shadowed = [r for r in results if r.get("n_shadows") is not None]
    if not shadowed:
        return []
    alphas = sorted({float(key) for r in shadowed for key in r["tpr_at_fpr"]}, reverse=True)

    def metrics(result: Mapping | None) -> list[str]:
        if result is None:
            return ["-"] * (1 + len(alphas))
        tprs = {float(key): value for key, value in result["tpr_at_fpr"].items()}
        marks = {a: "" if fpr_is_resolvable(a, result["n_non_members"]) else "*" for a in alphas}
        return [f"{result['auc']:.3f}"] + [f"{tprs[a]:.3f}{marks[a]}" if a in tprs else "-" for a in alphas]

    columns = ["AUC"] + [f"TPR@{_alpha_label(a)}FPR" for a in alphas]
    lines = ["## Shadow-model attacks", "",
             "Each attack beside the statistic it wraps (`base`, read with its own declared sign) on the same "
             "records; `shadows`: the shadow models the scores used; (*) as in the table above.", "",
             "| attack | shadows | " + " | ".join(columns) + " | base | " + " | ".join(f"base {c}" for c in columns)
             + " |", "|---|---:|" + "---:|" * len(columns) + "---|" + "---:|" * len(columns)]
    for r in shadowed:
        base = r.get("base_statistic")
        cells = [str(r["attack"]), shadows_text(r), *metrics(r), base["attack"] if base else "-", *metrics(base)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    incomplete = [r for r in shadowed if r.get("n_shadows_requested") is not None
                  and int(r["n_shadows_requested"]) > int(r["n_shadows"])]
    for r in incomplete:
        lines.append(f"- **{r['attack']}**: incomplete zoo, its scores used {r['n_shadows']} of the "
                     f"{r['n_shadows_requested']} shadow models requested; train the missing ones and score again.")
    return lines + [""] * bool(incomplete)


def _inline(value) -> str:
    """A run_info value on one line: mappings as `key=value, ...`."""
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={_inline(item)}" for key, item in value.items())
    return str(value)


def _blind_baseline_lines(blind: Mapping | None) -> list[str]:
    """The blind baseline's section: loud when the split is distribution-shifted."""
    if blind is None:
        return []
    if blind["shifted"]:
        return ["## WARNING: distribution-shifted split (blind baseline)", "", f"> **{blind['message']}**", "",
                f"Method: {blind['method']}.", ""]
    return ["## Blind baseline", "", f"{blind['message']} Method: {blind['method']}.", ""]


def dcr_share_lines(share: Mapping | None) -> list[str]:
    """The DCR share's section (`mia_gen.dcr`): SDMetrics' score beside the share it comes from."""
    if share is None:
        return []
    return ["## DCR share (SDMetrics' DCROverfittingProtection)", "",
            f"{share['closer_to_training']:.3f} of the {share['n_synthetic']} synthetic rows lie "
            f"closer to the {share['n_training']} training rows than to {share['n_holdout']} holdout rows (0.5 = no "
            f"sign of overfitting); score min(2 (1 - share), 1) = {share['score']:.3f}. Follows "
            f"{share['reference']}, except: {share['differences']}. It moves with which real rows are compared (no "
            "interval is given: compare it across seeds); a summary of the whole release, not part of any verdict.", ""]


def write_report(out_dir, results: Sequence[Mapping], run_info: Mapping, images: Mapping[str, str],
                 blind_baseline: Mapping | None = None, dcr_share: Mapping | None = None) -> Path:
    """Write `report.md`: run header, the blind baseline, results table, warnings and figures.

    Args:
        out_dir: the run's output directory; `report.md` is written there and images are
            linked relative to it.
        results: entries as for `format_results_table`; their `"warnings"` are listed, and so are
            records left unscored (`"n_unscored"`, `"unscored_reasons"`: `unscored_lines`) and shadow-model
            attacks beside their `"base_statistic"`.
        run_info: facts about the run: `config_hash`, `model`, `dataset` (or `data`),
            `n_samples` (or `samples`) are shown first, then any other keys; mapping values
            are written inline as `key=value, ...`.
        images: `{title: path}` of figures that already exist (drawn by `plot_roc` etc.);
            a relative path is taken relative to `out_dir` (e.g. `"roc.png"`).
        blind_baseline: results.json's `blind_baseline` (`blind_baseline.blind_baseline` output), shown
            above the results (as a warning when `shifted`), or None.
        dcr_share: results.json's `dcr_overfitting_protection` (`mia_gen.dcr.dcr_share`), shown below the
            results, or None.

    Returns:
        The path of `report.md`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# mia-gen membership inference report", ""]
    ordered = [k for k in _RUN_INFO_LABELS if k in run_info] + [k for k in run_info if k not in _RUN_INFO_LABELS]
    lines += [f"- **{_RUN_INFO_LABELS.get(key, key)}**: {_inline(run_info[key])}" for key in ordered]
    lines += [""] + _blind_baseline_lines(blind_baseline) + ["## Results", ""]
    lines += ["Higher score = more likely member; TPR@alpha FPR = the largest TPR with FPR <= alpha. "
              "`sign`: the direction each attack's scores are read in, fixed before evaluation: `declared` by "
              "the attack, or learnt on the labelled calibration subset (`labelled_subset`), whose records "
              "are then not evaluated. No AUC is read as max(AUC, 1 - AUC).", ""]
    lines += [format_results_table(results), ""]
    lines += dcr_share_lines(dcr_share)
    unscored = unscored_lines(results)
    if unscored:
        lines += ["## Records not scored", "",
                  "Left out of every metric above (the attack declares why it cannot score them):", "",
                  *(f"- {line}" for line in unscored), ""]
    lines += _shadow_lines(results) + _group_auc_lines(results)
    warnings = [f"- **{r['attack']}**: {w}" for r in results for w in r.get("warnings", [])]
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    if images:
        lines += ["## Figures", ""]
    for title, image in images.items():
        image = out_dir / image  # an absolute image path replaces out_dir
        if not image.is_file():
            raise MiaGenError(
                f"Figure '{title}' is missing at {image}; draw it first (plot_roc, "
                "plot_score_histograms, plot_nearest_neighbours) or leave it out of `images`."
            )
        link = Path(os.path.relpath(image.resolve(), out_dir.resolve())).as_posix()
        lines += [f"### {title}", "", f"![{title}]({link})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
