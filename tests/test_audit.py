"""The release gate: mia-gen-audit's membership check, verdict, exit codes and report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import mia_gen.experiments.audit as gate
import mia_gen.experiments.release_gate as audit_module
import mia_gen.experiments.evaluation as evaluation_module
from mia_gen.experiments.release_gate import attacks_for_access, shift_warning, verdict, write_audit
from mia_gen.errors import MiaGenError
from mia_gen.experiments.pipeline import Pipeline
from test_blind_baseline import _shifted_split
from test_pipeline import FAST, MEMORIZER, make_config, run_cli

GATE = [*FAST, "split.n_members=64", "split.n_non_members=256"]  # 64 digit members, as in the quick-start


def write_release(tmp_path, leaky: bool):
    """Noisy copies of the 64 members (leaky) or of reference records the model never saw, as a .npy
    release; beside it the true membership as a split file and as a members file."""
    pipe = Pipeline(make_config(GATE, tmp_path / "cache"), tmp_path / "probe")
    split = pipe.split
    split.save(tmp_path / "split.json")
    (tmp_path / "members.txt").write_text("\n".join(map(str, split.members.tolist())) + "\n")
    records = pipe.records.get(split.members if leaky else split.reference).numpy()
    rng = np.random.default_rng(0)
    copies = np.clip(records[rng.integers(0, len(records), 2000)] + rng.normal(0, 0.1, (2000, *records.shape[1:])),
                     -1, 1).astype(np.float32)
    path = tmp_path / ("leaky.npy" if leaky else "clean.npy")
    np.save(path, copies)
    return path, split


def run_console(monkeypatch, capsys, argv):
    """`mia-gen-audit <argv>` in this process (its `main()`): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mia-gen-audit", *argv])
    capsys.readouterr()
    try:
        gate.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def audit(args, tmp_path, monkeypatch, capsys, run="run"):
    """`mia-gen-audit` on `args` with the test's cache and run directory (Hydra CLI included)."""
    return run_console(monkeypatch, capsys, [*args, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / run}"])


def test_noisy_copies_of_the_members_fail_only_once_the_gate_knows_the_members(tmp_path, monkeypatch, capsys):
    synthetic, split = write_release(tmp_path, leaky=True)
    base = [*GATE, f"synthetic.path={synthetic}"]
    code, err = audit(base, tmp_path, monkeypatch, capsys, run="unknown")
    assert code == 2 and "split.path=" in err and "split.members_file=" in err and "random" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "unknown" / "audit.json").exists()
    for membership in (f"split.path={tmp_path / 'split.json'}", f"split.members_file={tmp_path / 'members.txt'}"):
        code, err = audit([*base, membership], tmp_path, monkeypatch, capsys)
        report = json.loads((tmp_path / "run" / "audit.json").read_text())
        assert code == 1 and "FAILED" in err, err
        assert not report["passed"] and all(row["auc"] > 0.8 for row in report["attacks"])
        assert str(tmp_path) in report["membership"] and report["sign"] == "labelled_subset"
        assert report["outcome"] == "FAIL" and report["rule"] == "simultaneous" and report["n_checks"] == 3
        for row in report["attacks"]:  # every row: the AUC and its simultaneous interval, decided
            assert row["auc_interval"][0] <= row["auc"] <= row["auc_interval"][1]
            assert row["sign_source"] == "labelled_subset" and row["decision"] == "fail"
        for item in report["most_exposed"]:
            exposed = {r["record_id"] for r in item["records"]}
            assert len(exposed) == 10 and exposed <= set(split.members.tolist())
    text = (tmp_path / "run" / "audit.md").read_text()
    assert "FAILED" in text and "Rule: simultaneous: 3 checks" in text and "members file" in text
    assert (tmp_path / "run" / "nearest_neighbours.png").is_file()


def test_a_release_that_never_saw_the_members_passes_once_the_records_can_show_it(tmp_path, monkeypatch, capsys):
    """Copies of records the model never saw, 64 members: at max_auc 0.6 the simultaneous intervals (+-0.1 at
    these sizes) reach past the threshold, so the gate says INCONCLUSIVE (exit 3) and how many records would
    decide; at max_auc 0.75 every interval lies inside, and it passes (exit 0)."""
    synthetic, _ = write_release(tmp_path, leaky=False)
    base = [*GATE, f"synthetic.path={synthetic}", f"split.path={tmp_path / 'split.json'}", "audit.access=samples"]
    code, err = audit(base, tmp_path, monkeypatch, capsys, run="a")
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert {row["attack"] for row in report["attacks"]} == {"sample_distance", "monte_carlo", "domias"}
    assert code == 3 and "INCONCLUSIVE" in err and report["outcome"] == "INCONCLUSIVE" and not report["passed"]
    assert not any(row["decision"] == "fail" for row in report["attacks"])
    undecided = [(row, c) for row in report["attacks"] for c in row["checks"] if c["decision"] == "inconclusive"]
    assert undecided and all(row["n_members"] < 64 for row, _ in undecided)  # less the labelled subset's
    assert all(c["records_to_decide"]["members"] > row["n_members"] for row, c in undecided if c["records_to_decide"])
    text = (tmp_path / "a" / "audit.md").read_text()
    assert "# Release audit: INCONCLUSIVE" in text and "'not shown to leak' is not 'safe'" in text
    assert report["split_shifted"] is False and "DISTRIBUTION-SHIFTED" not in text
    results = {r["attack"]: r["auc"] for r in json.loads((tmp_path / "a" / "results.json").read_text())["attacks"]}
    assert results == pytest.approx({row["attack"]: row["auc"] for row in report["attacks"]})
    code, err = audit([*base, "audit.max_auc=0.75"], tmp_path, monkeypatch, capsys, run="b")
    report = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert code == 0 and "PASSED" in err and report["outcome"] == "PASS", err
    assert all(row["auc_interval"][1] < 0.75 and row["auc_interval"][0] > 0.25 for row in report["attacks"])


def test_the_earlier_point_rule_flips_where_the_threshold_crosses_the_measured_leakage(tmp_path, monkeypatch, capsys):
    synthetic, _ = write_release(tmp_path, leaky=False)
    base = [*GATE, f"synthetic.path={synthetic}", f"split.path={tmp_path / 'split.json'}", "audit.access=samples",
            "audit.rule=point"]
    code, err = audit(base, tmp_path, monkeypatch, capsys, run="a")
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    measured = max(row["auc"] for row in report["attacks"])  # the signed AUC, as results.json writes it
    assert code == 0 and report["rule"] == "point" and measured < 0.6
    code, err = audit([*base, f"audit.max_auc={measured - 0.005}"], tmp_path, monkeypatch, capsys, run="b")
    assert code == 1 and "FAILED" in err
    code, err = audit([*base, f"audit.max_auc={measured + 0.005}"], tmp_path, monkeypatch, capsys, run="c")
    assert code == 0, err


def test_thresholds_are_validated_before_any_work(tmp_path, monkeypatch, capsys):
    """NaN would turn the gate off (a leak at AUC 1 exited 0); text was refused only after the whole run."""
    for setting, message in (("audit.max_auc=nan", "finite number"), ("audit.max_auc=1.5", "(0.5, 1)"),
                             ("audit.max_auc=high", "finite number"), ("audit.max_tpr=nan", "finite number")):
        code, err = audit([*GATE, f"synthetic.path={tmp_path / 'missing.npy'}", setting], tmp_path, monkeypatch, capsys)
        assert code == 2 and message in err, (setting, err)  # not the missing file: nothing ran


def test_a_split_of_digits_0_4_against_5_9_is_called_shifted_by_the_gate(tmp_path, monkeypatch, capsys):
    records = Pipeline(make_config(GATE, tmp_path / "cache"), tmp_path / "probe").records
    split = _shifted_split(records)
    split.save(tmp_path / "shifted.json")
    copies = records.get(split.reference[:200]).numpy()  # records the model never saw
    np.save(tmp_path / "release.npy", np.repeat(copies, 10, axis=0))
    code, err = audit([*GATE, f"synthetic.path={tmp_path / 'release.npy'}", f"split.path={tmp_path / 'shifted.json'}",
                       "attack=[sample_distance]"], tmp_path, monkeypatch, capsys)
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert code in (0, 1, 3) and "distribution-shifted" in err.splitlines()[-1]
    assert report["split_shifted"] and report["blind_baseline"]["shifted"]
    assert "WARNING: THE SPLIT IS DISTRIBUTION-SHIFTED" in (tmp_path / "run" / "audit.md").read_text()


def test_the_verdict_is_written_before_wandb_and_survives_its_failure(tmp_path, monkeypatch, capsys):
    """logger.mode=online without a network: W&B fails after the verdict is on disk; the verdict stands."""
    synthetic, _ = write_release(tmp_path, leaky=True)
    seen = []

    def unreachable(*args, **kwargs):
        seen.append((tmp_path / "run" / "audit.md").is_file())
        raise MiaGenError("W&B failed to start (CommError: network unreachable).")

    monkeypatch.setattr(evaluation_module, "make_tracker", unreachable)
    code, err = audit([*GATE, f"synthetic.path={synthetic}", f"split.path={tmp_path / 'split.json'}",
                       "attack=[sample_distance]", "logger=wandb", "logger.mode=online"], tmp_path, monkeypatch, capsys)
    assert seen == [True]  # the verdict files existed before the first W&B call
    assert code == 1 and "W&B failed" in err and "verdict stands" in err
    assert "FAILED" in (tmp_path / "run" / "audit.md").read_text()


def test_usage_errors_config_errors_and_crashes_exit_2(tmp_path, monkeypatch, capsys):
    code, err = audit([*GATE, "attack=[nope]"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "no verdict" in err
    code, err = audit([*GATE, "audit.rule=median"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "audit.rule must be one of" in err
    (tmp_path / "members.txt").write_text("12\nseven\n")
    code, err = audit([*GATE, f"synthetic.path={tmp_path / 'x.npy'}", f"split.members_file={tmp_path / 'members.txt'}"],
                      tmp_path, monkeypatch, capsys)
    assert code == 2 and "line 2" in err

    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(audit_module, "run_audit", crash)
    code, err = audit(GATE, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == ("mia-gen-audit: crashed (RuntimeError: disk on fire); "
                                                          "no verdict")


def test_a_typo_in_a_key_exits_2_from_the_console_script(tmp_path):
    result = run_cli([*GATE, "audit.max_aux=0.5", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                     script="mia-gen-audit")
    assert result.returncode == 2, result.stderr
    assert "audit.max_aux" in result.stderr and result.stderr.strip().endswith("no verdict.")


def test_a_plain_run_on_a_release_with_a_random_split_says_loudly_it_is_random(tmp_path, caplog):
    synthetic, _ = write_release(tmp_path, leaky=True)
    pipe = Pipeline(make_config([*GATE, f"synthetic.path={synthetic}"], tmp_path / "cache"), tmp_path / "run")
    with caplog.at_level("WARNING"):
        pipe.split
    assert "DRAWN AT RANDOM" in caplog.text and "split.members_file" in caplog.text
    members_file = f"split.members_file={tmp_path / 'members.txt'}"
    given = Pipeline(make_config([*GATE, f"synthetic.path={synthetic}", members_file], tmp_path / "cache"),
                     tmp_path / "run")
    caplog.clear()
    with caplog.at_level("WARNING"):
        given.split
    assert "DRAWN AT RANDOM" not in caplog.text


def test_a_model_audit_runs_what_its_access_allows(tmp_path, monkeypatch, capsys):
    """A model the gate trains itself on the split: its membership is known, no split file needed."""
    code, _ = audit([*MEMORIZER, "audit.access=white_box", "audit.max_auc=0.6",
                     "audit.attack_overrides={latent_inversion:{lambda_lpips:0,lambda_z:0,iterations:2}}"],
                    tmp_path, monkeypatch, capsys)
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert code == 1 and not report["passed"]  # a memoriser leaks to every attack
    assert report["membership"].startswith("the split this run trained the model on")
    assert {row["attack"] for row in report["attacks"]} >= {"sample_distance", "latent_inversion"}


def test_access_levels_are_checked():
    assert attacks_for_access("samples", None) == ["sample_distance", "monte_carlo", "domias"]
    assert "latent_inversion_pbb" in attacks_for_access("query", "gan")
    assert {"pia", "secmi_stat"} <= set(attacks_for_access("white_box", "diffusion"))
    with pytest.raises(MiaGenError, match="needs a model"):
        attacks_for_access("white_box", None)
    with pytest.raises(MiaGenError, match="must be one of"):
        attacks_for_access("root", "gan")


def result_row(auc, ci, tpr=0.0, tpr_ci=(0.0, 0.0), sign=1, source="labelled_subset"):
    return {"attack": "a", "access": "samples", "auc": auc, "sign": sign, "sign_source": source,
            "tpr_at_fpr": {"0.1": 0.5, "0.01": tpr}, "ci95": {"auc": list(ci), "tpr_at_fpr": {"0.01": list(tpr_ci)}},
            "n_non_members": 200}


def test_the_rule_decides_between_the_point_estimate_and_the_lower_bound():
    results = [result_row(0.65, (0.55, 0.75), tpr=0.08, tpr_ci=(0.02, 0.15))]
    point = verdict(results, max_auc=0.6, max_tpr=None, at_fpr=0.01, rule="point")
    assert not point["passed"] and point["rule"] == "point"
    (row,) = point["attacks"]
    assert row["auc"] == 0.65 and row["ci95"] == [0.55, 0.75] and row["tpr"] == 0.08 and row["tpr_ci95"] == [0.02, 0.15]
    assert verdict(results, max_auc=0.6, max_tpr=None, at_fpr=0.01, rule="lower_bound")["passed"]
    assert not verdict(results, max_auc=0.52, max_tpr=None, at_fpr=0.01, rule="lower_bound")["passed"]  # 0.55 > 0.52
    assert not verdict(results, None, max_tpr=0.05, at_fpr=0.01, rule="point")["passed"]
    assert verdict(results, None, max_tpr=0.05, at_fpr=0.01, rule="lower_bound")["passed"]  # 0.02 <= 0.05
    assert "tpr" in verdict(results, max_auc=0.9, max_tpr=None, at_fpr=0.01, rule="point")["attacks"][0]


def test_auc_is_read_as_written_and_a_significant_inversion_is_noted():
    inverted = verdict([result_row(0.2, (0.1, 0.3), source="declared", sign=1)], max_auc=0.7, max_tpr=None,
                       at_fpr=0.01, rule="point")
    (row,) = inverted["attacks"]
    assert inverted["passed"] and "leakage_auc" not in row  # never max(AUC, 1 - AUC)
    assert any("audit.sign=labelled_subset" in note for note in row["notes"])
    chance = verdict([result_row(0.45, (0.35, 0.55))], max_auc=0.7, max_tpr=None, at_fpr=0.01, rule="point")
    assert chance["attacks"][0]["notes"] == []


def test_thresholds_and_rules_are_checked():
    results = [result_row(0.6, (0.5, 0.7))]
    with pytest.raises(MiaGenError, match="needs a threshold"):
        verdict(results, None, None, 0.01)
    with pytest.raises(MiaGenError, match="evaluation.alphas"):
        verdict(results, None, 0.1, 0.05, rule="point")
    with pytest.raises(MiaGenError, match="scores.csv"):
        verdict(results, 0.6, None, 0.01)  # the default rule reads the evaluated scores
    with pytest.raises(MiaGenError, match="audit.rule must be one of"):
        verdict(results, 0.6, None, 0.01, rule="upper_bound")
    no_bootstrap = [{**results[0], "ci95": {"auc": None, "tpr_at_fpr": {"0.01": None}}}]
    assert verdict(no_bootstrap, 0.7, None, 0.01, rule="point")["attacks"][0]["ci95"] is None
    with pytest.raises(MiaGenError, match="evaluation.n_bootstrap"):
        verdict(no_bootstrap, 0.7, None, 0.01, rule="lower_bound")


def test_a_shifted_split_is_said_loudly_in_the_verdict(tmp_path):
    shifted = {"method": "logistic regression", "auc": 0.93, "ci95": [0.9, 0.96], "shifted": True, "message": ""}
    assert shift_warning({**shifted, "shifted": False}) is None and shift_warning(None) is None
    decision = verdict([result_row(0.95, (0.9, 0.98))], 0.6, None, 0.01, rule="point")
    warning = shift_warning(shifted)
    decision.update(audited="x", membership="y", sign="labelled_subset", blind_baseline=shifted,
                    split_shifted=True, warnings=[warning])
    write_audit(tmp_path, decision, [])
    text = (tmp_path / "audit.md").read_text()
    assert "DISTRIBUTION-SHIFTED" in text and "overstates leakage" in text
    assert text.index("DISTRIBUTION-SHIFTED") < text.index("| attack |")  # before the table, not a footnote
    assert json.loads((tmp_path / "audit.json").read_text())["split_shifted"] is True
