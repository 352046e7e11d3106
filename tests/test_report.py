"""Figures (inspected through their matplotlib objects) and the markdown report."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from sklearn.metrics import roc_auc_score

from mia_gen.errors import MiaGenError
from mia_gen.metrics import evaluate_scores
from mia_gen.experiments.report import (
    _histogram_figure,
    _neighbours_figure,
    _roc_figure,
    format_results_table,
    plot_nearest_neighbours,
    plot_roc,
    plot_score_histograms,
    write_report,
)


def _curves(n_members=40, n_non_members=60, names=("pia", "secmi")):
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(n_members, int), np.zeros(n_non_members, int)]
    return {name: (labels, rng.normal(size=labels.size) + shift * labels) for shift, name in enumerate(names, 1)}


def _loop_tpr_at_1pct(labels, scores):
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    best = 0.0
    for threshold in np.unique(scores):
        if ((scores >= threshold) & (labels == 0)).sum() / n_neg <= 0.01:
            best = max(best, ((scores >= threshold) & (labels == 1)).sum() / n_pos)
    return best


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).ndim == 3


def test_roc_is_log_log_with_chance_line_and_metrics_in_legend(tmp_path):
    curves = _curves(n_members=40, n_non_members=20_000)
    ax = _roc_figure(curves).axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert ax.get_xlim() == pytest.approx((1 / 20_000, 1.0))  # 1/n_non_members < 1e-4
    assert ax.get_ylim() == pytest.approx((1e-4, 1.0))
    assert any(line.get_label() == "chance" and line.get_xdata()[-1] == 1.0 for line in ax.get_lines())
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    for name, (labels, scores) in curves.items():
        auc, tpr = roc_auc_score(labels, scores), _loop_tpr_at_1pct(labels, scores)
        expected = f"{name} (AUC {auc:.3f}, TPR@1%FPR {tpr:.3f})"
        assert expected in legend
    path = plot_roc(curves, tmp_path / "sub" / "roc.png")
    assert path == tmp_path / "sub" / "roc.png" and _is_png(path)


def test_roc_axis_floor_is_1e_minus_4_for_small_evaluations():
    ax = _roc_figure(_curves(n_members=30, n_non_members=50)).axes[0]
    assert ax.get_xlim() == pytest.approx((1e-4, 1.0))
    assert "FPR < 1/n_non_members" in [text.get_text() for text in ax.get_legend().get_texts()]


def test_score_histograms_one_subplot_per_attack(tmp_path):
    curves = _curves(names=("a", "b", "c", "d"))
    figure = _histogram_figure(curves)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c", "d"]
    for ax in visible:
        members, non_members = ax.containers  # one bar container per class, densities
        for bars in (members, non_members):
            assert sum(p.get_height() * p.get_width() for p in bars.patches) == pytest.approx(1.0)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["members (n=40)", "non-members (n=60)"]
    assert _is_png(plot_score_histograms(curves, tmp_path / "hist.png"))


@pytest.mark.parametrize("channels", [1, 3])
def test_nearest_neighbours_grid(tmp_path, channels):
    rng = np.random.default_rng(channels)
    queries = rng.uniform(-1, 1, (2, channels, 8, 8)).astype(np.float32)
    neighbours = rng.uniform(-1, 1, (2, 3, channels, 8, 8)).astype(np.float32)
    distances = np.array([[0.5, 0.6, 0.7], [1.5, 1.6, 1.7]])
    figure = _neighbours_figure(torch.from_numpy(queries), neighbours, [1, 0], distances)
    axes = np.array(figure.axes).reshape(4, 2)  # one column per query: query, then neighbours
    assert axes[0, 0].get_title() == "member"
    assert axes[0, 1].get_title() == "non-member"
    assert axes[1, 0].get_title() == "#1 d=0.5"
    assert axes[3, 1].get_title() == "#3 d=1.7"
    shown = axes[2, 1].images[0].get_array()
    expected = (np.moveaxis(neighbours[1, 1], 0, -1) + 1) / 2
    np.testing.assert_allclose(shown, expected.squeeze(-1) if channels == 1 else expected, atol=1e-6)
    assert _is_png(plot_nearest_neighbours(queries, neighbours, tmp_path / "nn.png"))


@pytest.mark.parametrize(
    "queries, neighbours, message",
    [
        (np.zeros((2, 1, 8, 8)) + 200, np.zeros((2, 3, 1, 8, 8)), r"\[-1, 1\].*x / 127.5 - 1"),
        (np.zeros((2, 2, 8, 8)), np.zeros((2, 3, 2, 8, 8)), "1 or 3 channels"),
        (np.zeros((2, 1, 8, 8)), np.zeros((3, 3, 1, 8, 8)), "same Q"),
        (np.zeros((2, 1, 8, 8)), np.zeros((2, 3, 1, 4, 4)), "same resolution"),
    ],
)
def test_nearest_neighbours_bad_input(tmp_path, queries, neighbours, message):
    with pytest.raises(MiaGenError, match=message):
        plot_nearest_neighbours(queries, neighbours, tmp_path / "nn.png")


def _results():
    results = []
    for seconds, (name, (labels, scores)) in enumerate(_curves().items(), 1):
        with pytest.warns(UserWarning):  # 60 non-members: 1% and 0.1% are not resolvable
            result = evaluate_scores(labels, scores, n_bootstrap=50)
        result.update(attack=name, access="white_box", seconds=seconds * 1.25, sign=(-1) ** (seconds + 1),
                      sign_source=("declared", "labelled_subset")[seconds - 1])
        results.append(result)
    return results


def _cells(table_line):
    return [cell.strip() for cell in table_line.strip().strip("|").split("|")]


def test_results_table_values_and_marks():
    results = _results()
    lines = format_results_table(results).splitlines()
    assert _cells(lines[0]) == [
        "attack", "access", "sign", "AUC [95% CI]", "ASR", "TPR@10%FPR", "TPR@1%FPR", "TPR@0.1%FPR",
        "n_members", "n_non_members", "seconds",
    ]  # fmt: skip
    assert len({len(line) for line in lines[:4]}) == 1  # columns aligned
    for line, result, sign in zip(lines[2:4], results, ("+1 (declared)", "-1 (labelled_subset)")):
        lo, hi = result["ci95"]["auc"]
        assert _cells(line) == [
            result["attack"], "white_box", sign, f"{result['auc']:.3f} [{lo:.3f}, {hi:.3f}]", f"{result['asr']:.3f}",
            f"{result['tpr_at_fpr']['0.1']:.3f}", f"{result['tpr_at_fpr']['0.01']:.3f}*",
            f"{result['tpr_at_fpr']['0.001']:.3f}*", "40", "60", f"{result['seconds']:.1f}",
        ]  # fmt: skip
    assert "(*) fewer than 1/alpha non-members" in lines[-1]


def test_results_table_rejects_incomplete_entries():
    with pytest.raises(MiaGenError, match=r"results\[0\] lacks \['auc'.*evaluate_scores"):
        format_results_table([{"attack": "pia"}])


def test_write_report(tmp_path):
    results = _results()
    out_dir = tmp_path / "run"
    roc = plot_roc(_curves(), out_dir / "figures" / "roc.png")
    run_info = {"seed": 0, "config_hash": "0123abcd", "model": {"name": "ddpm-16px"}, "data": {"name": "digits"},
                "samples": {"n_samples": 20000}}
    hist = plot_score_histograms(_curves(), out_dir / "hist.png")
    images = {"ROC (log-log)": str(roc), "Histograms": hist.name}  # absolute, relative to out_dir
    path = write_report(out_dir, results, run_info, images)
    text = path.read_text()
    assert path == out_dir / "report.md"
    header = [line for line in text.splitlines() if line.startswith("- **")][:5]
    assert header == [
        "- **config hash**: 0123abcd", "- **model**: name=ddpm-16px", "- **dataset**: name=digits",
        "- **generated samples**: n_samples=20000", "- **seed**: 0",
    ]  # fmt: skip
    assert format_results_table(results) in text
    assert text.count("- **pia**: TPR@FPR<=") == 2 and text.count("- **secmi**: TPR@FPR<=") == 2
    assert "![ROC (log-log)](figures/roc.png)" in text and "![Histograms](hist.png)" in text
    with pytest.raises(MiaGenError, match="missing.*plot_roc"):
        write_report(out_dir, results, run_info, {"ROC": "nope.png"})


def test_report_says_loudly_when_the_blind_baseline_finds_a_shift(tmp_path):
    shifted = {"method": "m", "auc": 0.93, "ci95": [0.9, 0.96], "shifted": True, "message": "DISTRIBUTION SHIFT: x"}
    text = write_report(tmp_path / "a", _results(), {}, {}, blind_baseline=shifted).read_text()
    assert "## WARNING: distribution-shifted split" in text and "> **DISTRIBUTION SHIFT: x**" in text
    assert text.index("WARNING: distribution-shifted") < text.index("## Results")
    calm = {**shifted, "auc": 0.5, "ci95": [0.43, 0.57], "shifted": False, "message": "Blind baseline AUC 0.500"}
    text = write_report(tmp_path / "b", _results(), {}, {}, blind_baseline=calm).read_text()
    assert "WARNING" not in text and "## Blind baseline" in text and "Blind baseline AUC 0.500" in text
