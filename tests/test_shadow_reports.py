"""Shadow-model attacks in the run's outputs: unscored records, the base statistic, the shadows column
and the ROC beside the base (results.json, report.md, roc_shadows.png, W&B summary)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

import mia_gen.experiments.evaluation as evaluation_module
from mia_gen.errors import MiaGenError
from mia_gen.experiments.evaluation import evaluated_part, write_outputs
from mia_gen.experiments.report import ShadowROC, _roc_shadows_figure, format_results_table
from mia_gen.experiments.tracking import Tracker

N_RECORDS = 320
IDS = np.arange(1000, 1000 + N_RECORDS)
UNSCORED = [4, 17, 250]  # LiRA online: never OUT of a shadow


def _labels():
    return np.random.default_rng(0).permutation(np.r_[np.ones(N_RECORDS // 2, int), np.zeros(N_RECORDS // 2, int)])


def _entry(name, scores, info=None):
    return {"attack": name, "access": "white_box", "config": {"name": name}, "record_ids": IDS.tolist(),
            "scores": list(map(float, scores)), "neighbour_indices": None, "info": info or {}, "seconds": 1.5}


def _entries(labels):
    """lira (8 of 8 shadows, 3 unscored), rmia (6 of 8), gsa (no base), and a plain diffusion_loss."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=N_RECORDS) + 0.5 * labels  # the plain statistic: weaker
    lira = rng.normal(size=N_RECORDS) + 1.5 * labels
    lira[UNSCORED] = np.nan
    unscored = {"positions": UNSCORED, "reasons": ["no OUT shadow"] * len(UNSCORED)}
    return {
        "lira": _entry("lira", lira, {"unscored": unscored, "n_shadows": 8, "n_shadows_requested": 8,
                                      "base": {"attack": "diffusion_loss", "scores": base.tolist()}}),
        "rmia": _entry("rmia", rng.normal(size=N_RECORDS) + labels,
                       {"n_shadows": 6, "n_shadows_requested": 8,
                        "base": {"attack": "diffusion_loss", "scores": base.tolist()}}),
        "gsa": _entry("gsa", rng.normal(size=N_RECORDS) + 2 * labels, {"n_shadows": 8, "n_shadows_requested": 8}),
        "diffusion_loss": _entry("diffusion_loss", base),
    }


class _RecordingTracker(Tracker):
    def __init__(self):
        self.summary, self.images = None, []

    def log_summary(self, summary):
        self.summary = summary

    def log_image(self, name, path):
        self.images.append(path.name)


def _pipeline(tmp_path, labels, sign="declared", labelled=None):
    cfg = OmegaConf.create({"seed": 0, "logger": {"name": "none"}, "evaluation": {
        "alphas": [0.1, 0.01, 0.001], "n_bootstrap": 50, "n_neighbour_rows": 8, "sign": sign,
        "blind_baseline": False}})
    return SimpleNamespace(cfg=cfg, run_dir=tmp_path / "run", split=SimpleNamespace(members=IDS[labels == 1]),
                           records=SimpleNamespace(kind="image"),  # white-box records: no DCR share
                           config_hash="0123abcd", labelled_subset=lambda: labelled,
                           metadata=lambda scored: {"config_hash": "0123abcd"})


@pytest.fixture
def run(tmp_path, monkeypatch):
    """write_outputs on the hand-made entries; returns (results.json by attack, labels, entries, tracker)."""
    labels = _labels()
    entries = _entries(labels)
    tracker = _RecordingTracker()
    monkeypatch.setattr(evaluation_module, "make_tracker", lambda *args, **kwargs: tracker)
    with pytest.warns(UserWarning):  # 160 non-members: 0.1% FPR is not resolvable
        write_outputs(_pipeline(tmp_path, labels), entries)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    return {r["attack"]: r for r in results["attacks"]}, labels, entries, tracker


def _loop_tpr_at_fpr(labels, scores, alpha):
    best = 0.0
    for threshold in np.unique(scores):
        called = scores >= threshold
        if (called & (labels == 0)).sum() / (labels == 0).sum() <= alpha:
            best = max(best, (called & (labels == 1)).sum() / (labels == 1).sum())
    return best


def test_unscored_records_are_left_out_and_counted(run, tmp_path):
    results, labels, entries, _ = run
    scored = np.setdiff1d(np.arange(N_RECORDS), UNSCORED)
    lira = results["lira"]
    scores = np.asarray(entries["lira"]["scores"])
    assert lira["auc"] == pytest.approx(roc_auc_score(labels[scored], scores[scored]), abs=1e-12)
    assert lira["n_members"] + lira["n_non_members"] == N_RECORDS - 3
    assert lira["n_members"] == labels[scored].sum()
    assert (lira["n_unscored"], lira["unscored_reasons"]) == (3, {"no OUT shadow": 3})
    assert lira["unscored_record_ids"] == IDS[UNSCORED].tolist()
    assert "unscored" not in lira["info"] and "base" not in lira["info"]  # per-record detail stays in the score file
    for name in ("rmia", "gsa", "diffusion_loss"):
        assert (results[name]["n_unscored"], results[name]["unscored_reasons"]) == (0, {})
        assert results[name]["n_members"] + results[name]["n_non_members"] == N_RECORDS
    with open(tmp_path / "run" / "scores.csv") as handle:
        lira_rows = [row for row in csv.DictReader(handle) if row["attack"] == "lira"]
    assert sorted(int(row["record_id"]) for row in lira_rows) == IDS[scored].tolist()


def test_an_undeclared_nan_still_fails_in_the_metrics(tmp_path):
    labels = _labels()
    entries = _entries(labels)
    entries["lira"]["scores"][5] = float("nan")  # not in info["unscored"]
    with pytest.raises(MiaGenError, match="1 of 317 scores are not finite"):
        write_outputs(_pipeline(tmp_path, labels), {"lira": entries["lira"]})


def test_a_malformed_unscored_declaration_is_refused():
    entry = _entries(_labels())["lira"]
    entry["info"]["unscored"] = {"positions": UNSCORED, "reasons": ["no OUT shadow"]}
    with pytest.raises(MiaGenError, match="one reason per position.*delete it"):
        evaluated_part(entry)
    entry["info"]["unscored"] = {"positions": [N_RECORDS], "reasons": ["no OUT shadow"]}
    with pytest.raises(MiaGenError, match=r"in \[0, 320\)"):
        evaluated_part(entry)


def test_a_learnt_sign_ignores_unscored_records_and_the_base_keeps_its_declared_sign():
    labels = _labels()
    entry = _entries(labels)["lira"]
    entry["scores"] = (-np.asarray(entry["scores"])).tolist()  # runs the wrong way: the sign learnt is -1
    positions = np.r_[UNSCORED[:2], np.arange(20, 60)]  # two unscored records in the labelled subset
    part = evaluated_part(entry, (positions, labels[positions]))
    assert (part["sign"], part["sign_source"]) == (-1, "labelled_subset")
    kept = np.setdiff1d(np.arange(N_RECORDS), np.r_[positions, UNSCORED])
    np.testing.assert_array_equal(part["kept"], kept)
    np.testing.assert_array_equal(part["scores"], -np.asarray(entry["scores"])[kept])
    # only the unscored record that would have been evaluated counts
    assert (part["n_unscored"], part["unscored_record_ids"]) == (1, [IDS[250]])
    np.testing.assert_array_equal(part["base_scores"], np.asarray(entry["info"]["base"]["scores"])[kept])


def test_base_statistic_is_evaluated_on_the_same_records(run):
    results, labels, entries, _ = run
    base_scores = np.asarray(entries["lira"]["info"]["base"]["scores"])
    for name, kept in (("lira", np.setdiff1d(np.arange(N_RECORDS), UNSCORED)), ("rmia", np.arange(N_RECORDS))):
        base = results[name]["base_statistic"]
        assert (base["attack"], base["sign"], base["sign_source"]) == ("diffusion_loss", 1, "declared")
        assert base["auc"] == pytest.approx(roc_auc_score(labels[kept], base_scores[kept]), abs=1e-12)
        for alpha in ("0.1", "0.01"):
            assert base["tpr_at_fpr"][alpha] == _loop_tpr_at_fpr(labels[kept], base_scores[kept], float(alpha))
        assert [base[key] for key in ("n_members", "n_non_members")] == [results[name][key] for key in
                                                                          ("n_members", "n_non_members")]
        lo, hi = base["ci95"]["auc"]
        assert lo <= base["auc"] <= hi
    assert results["diffusion_loss"]["auc"] == results["rmia"]["base_statistic"]["auc"]  # all records: the same
    assert (results["lira"]["n_shadows"], results["lira"]["n_shadows_requested"]) == (8, 8)
    assert (results["rmia"]["n_shadows"], results["rmia"]["n_shadows_requested"]) == (6, 8)
    assert "base_statistic" not in results["gsa"] and "n_shadows" not in results["diffusion_loss"]


def test_report_lists_unscored_records_and_the_shadows_column(run, tmp_path):
    results, *_ = run
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Records not scored" in text and "- lira: 3 of 320 records not scored: 3 with no OUT shadow" in text
    assert "rmia:" not in text.split("## Records not scored")[1].split("##")[0]
    table = format_results_table(list(results.values()))
    assert table in text
    header, _, *rows = (line.strip().strip("|").split("|") for line in table.splitlines()[:6])
    header = [cell.strip() for cell in header]
    assert header[5:9] == ["TPR@10%FPR", "TPR@1%FPR", "TPR@0.1%FPR", "shadows"]
    shadows = {row[0].strip(): row[8].strip() for row in rows}
    assert shadows == {"lira": "8", "rmia": "6 of 8", "gsa": "8", "diffusion_loss": "-"}
    assert "- **rmia**: incomplete zoo, its scores used 6 of the 8 shadow models requested" in text
    base_auc = results["lira"]["base_statistic"]["auc"]
    assert f"| lira | 8 | {results['lira']['auc']:.3f} |" in text and f"| diffusion_loss | {base_auc:.3f} |" in text


def test_a_table_without_shadow_attacks_has_no_shadows_column():
    results = [{"attack": "pia", "auc": 0.9, "asr": 0.8, "tpr_at_fpr": {"0.01": 0.2}, "n_members": 200,
                "n_non_members": 200}]
    assert "shadows" not in format_results_table(results)


def test_roc_shadows_is_written_listed_and_logged(run, tmp_path):
    results, labels, entries, tracker = run
    text = (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "roc_shadows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](roc_shadows.png)" in text and "roc_shadows.png" in tracker.images
    assert tracker.summary["lira"]["n_shadows"] == 8 and tracker.summary["rmia"]["n_shadows_requested"] == 8
    assert tracker.summary["lira"]["base_statistic"]["auc"] == results["lira"]["base_statistic"]["auc"]
    assert tracker.summary["lira"]["n_unscored"] == 3 and "n_shadows" not in tracker.summary["diffusion_loss"]


def test_roc_shadows_draws_each_attack_solid_beside_its_base_dashed_in_the_same_colour():
    labels = _labels()
    rng = np.random.default_rng(2)
    scores, base = rng.normal(size=N_RECORDS) + labels, rng.normal(size=N_RECORDS)
    ax = _roc_shadows_figure({"lira": ShadowROC(labels, scores, "diffusion_loss", base, "8"),
                              "rmia": ShadowROC(labels, base + labels, "pia", scores, "6 of 8")}).axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_xlim() == pytest.approx((1e-4, 1.0))
    lines = {line.get_label(): line for line in ax.get_lines()}
    lira = next(line for label, line in lines.items() if label.startswith("lira (8 shadows; AUC "))
    lira_base = next(line for label, line in lines.items() if label.startswith("  base: diffusion_loss (AUC "))
    rmia = next(line for label, line in lines.items() if label.startswith("rmia (6 of 8 shadows; AUC "))
    assert lira.get_color() == lira_base.get_color() != rmia.get_color()
    assert (lira.get_linestyle(), lira_base.get_linestyle()) == ("-", "--")
    assert f"AUC {roc_auc_score(labels, base):.3f}" in lira_base.get_label() and "chance" in lines


def test_no_roc_shadows_without_a_base_statistic(tmp_path, monkeypatch):
    labels = _labels()
    entries = _entries(labels)
    monkeypatch.setattr(evaluation_module, "make_tracker", lambda *args, **kwargs: Tracker())
    with pytest.warns(UserWarning):
        write_outputs(_pipeline(tmp_path, labels), {name: entries[name] for name in ("gsa", "diffusion_loss")})
    assert not (tmp_path / "run" / "roc_shadows.png").exists()
    assert "roc_shadows" not in (tmp_path / "run" / "report.md").read_text()
