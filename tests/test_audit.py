"""The release gate: mia-gen-audit's verdict, exit code and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mia_gen.audit import attacks_for_access, verdict
from mia_gen.errors import MiaGenError
from mia_gen.pipeline import Pipeline
from test_pipeline import FAST, MEMORIZER, make_config, run_cli


def write_synthetic(tmp_path, leaky: bool):
    """Near-copies of the members (leaky) or of other records (not leaky), as a .npy release."""
    pipe = Pipeline(make_config(FAST, tmp_path / "cache"), tmp_path / "probe")
    source = pipe.split.members if leaky else pipe.split.reference
    records = pipe.records.get(source).numpy()
    rng = np.random.default_rng(0)
    copies = np.clip(records[rng.integers(0, len(records), 2000)] + rng.normal(0, 0.1, (2000, *records.shape[1:])),
                     -1, 1).astype(np.float32)
    path = tmp_path / ("leaky.npy" if leaky else "clean.npy")
    np.save(path, copies)
    return path


def test_the_exit_code_flips_where_the_threshold_crosses_the_measured_leakage(tmp_path):
    synthetic = write_synthetic(tmp_path, leaky=False)
    base = [*FAST, f"synthetic.path={synthetic}", "audit.access=samples"]
    first = run_cli([*base, "audit.max_auc=0.99", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, script="mia-gen-audit")
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    measured = max(row["leakage_auc"] for row in report["attacks"])
    assert report["passed"] and 0.5 <= measured < 0.7
    assert {row["attack"] for row in report["attacks"]} == {"sample_distance", "monte_carlo", "domias"}
    below = run_cli([*base, f"audit.max_auc={measured - 0.005}", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path,
                    script="mia-gen-audit")
    assert below.returncode == 1 and "FAILED" in below.stderr
    above = run_cli([*base, f"audit.max_auc={measured + 0.005}", f"hydra.run.dir={tmp_path / 'c'}"], tmp_path,
                    script="mia-gen-audit")
    assert above.returncode == 0, above.stderr


def test_a_leaky_release_fails_and_the_report_names_the_most_exposed_members(tmp_path):
    synthetic = write_synthetic(tmp_path, leaky=True)
    result = run_cli([*FAST, f"synthetic.path={synthetic}", "audit.max_tpr=0.2", "audit.max_auc=null",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, script="mia-gen-audit")
    assert result.returncode == 1
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert not report["passed"] and all(row["tpr"] > 0.2 for row in report["attacks"])
    members = set(Pipeline(make_config(FAST, tmp_path / "cache"), tmp_path / "probe").split.members.tolist())
    for item in report["most_exposed"]:
        assert len(item["records"]) == 10 and {r["record_id"] for r in item["records"]} <= members
    text = (tmp_path / "run" / "audit.md").read_text()
    assert "FAILED" in text and "nearest_neighbours.png" in text
    assert (tmp_path / "run" / "nearest_neighbours.png").is_file()


def test_a_model_audit_runs_what_its_access_allows(tmp_path):
    result = run_cli([*MEMORIZER, "audit.access=white_box", "audit.max_auc=0.6",
                      "audit.attack_overrides={latent_inversion:{lambda_lpips:0,lambda_z:0,iterations:2}}",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, script="mia-gen-audit")
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert result.returncode == 1 and not report["passed"]  # a memoriser leaks to every attack
    assert {row["attack"] for row in report["attacks"]} >= {"sample_distance", "latent_inversion"}


def test_access_levels_and_thresholds_are_checked():
    assert attacks_for_access("samples", None) == ["sample_distance", "monte_carlo", "domias"]
    assert "latent_inversion_pbb" in attacks_for_access("query", "gan")
    assert {"pia", "secmi_stat"} <= set(attacks_for_access("white_box", "diffusion"))
    with pytest.raises(MiaGenError, match="needs a model"):
        attacks_for_access("white_box", None)
    with pytest.raises(MiaGenError, match="must be one of"):
        attacks_for_access("root", "gan")
    results = [{"attack": "a", "access": "samples", "auc": 0.2, "tpr_at_fpr": {"0.01": 0.3}}]
    decision = verdict(results, max_auc=0.7, max_tpr=None, at_fpr=0.01)
    assert not decision["passed"] and decision["attacks"][0]["leakage_auc"] == pytest.approx(0.8)  # wrong-sign leak
    with pytest.raises(MiaGenError, match="needs a threshold"):
        verdict(results, None, None, 0.01)
    with pytest.raises(MiaGenError, match="evaluation.alphas"):
        verdict(results, None, 0.1, 0.05)
