"""Sweep summaries: the gan_leaks_digits experiment as a (shrunk) multirun, and mia-gen-summarize."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mia_gen.errors import MiaGenError
from mia_gen.summary import main as summarize_main
from mia_gen.summary import summarize
from test_pipeline import run_cli

TINY_GAN_LEAKS = [
    "experiment=gan_leaks_digits", "logger=none", "progress=false", "device=cpu",
    "split.n_members=16,32", "split.n_non_members=64", "sampling.n_samples=400", "sampling.shard_size=200",
    "model.training.steps=10", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
    "model.training.checkpoint_every=10", "model.training.sample_every=1000", "evaluation.n_bootstrap=50",
    "attack.latent_inversion.iterations=2", "attack.latent_inversion_pbb.generations=2",
    "attack.calibration.params.iterations=2", "attack.co_membership.encoder_steps=5",
    "attack.co_membership.iterations=2", "attack.co_membership.n_groups=10",
]


@pytest.fixture(scope="module")
def gan_leaks_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gan_leaks")
    result = run_cli(["-m", *TINY_GAN_LEAKS, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "sweep", result


def test_the_gan_leaks_sweep_ends_with_its_table_and_plot(gan_leaks_sweep):
    sweep, result = gan_leaks_sweep
    assert "# AUC against split.n_members" in result.stdout
    for name in ("summary.md", "summary.csv", "auc_vs_split.n_members.png"):
        assert (sweep / name).stat().st_size > 0, name
    attacks = {"sample_distance", "latent_inversion_pbb", "latent_inversion", "calibration",
               "calibrated_fbb", "co_membership"}
    for job in sweep.glob("*/results.json"):
        assert {entry["attack"] for entry in json.loads(job.read_text())["attacks"]} == attacks


def test_the_summary_table_matches_the_runs_results(gan_leaks_sweep):
    sweep, _ = gan_leaks_sweep
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 6
    for row in rows:
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        (entry,) = [e for e in results["attacks"] if e["attack"] == row["attack"]]
        assert float(row["auc"]) == entry["auc"]
        assert [float(row["ci95_low"]), float(row["ci95_high"])] == entry["ci95"]["auc"]
        assert json.loads(row["tpr_at_fpr"]) == entry["tpr_at_fpr"]
        assert int(row["split.n_members"]) == results["metadata"]["split"]["n_members"]
        if row["attack"] == "co_membership":
            assert json.loads(row["group_auc"]) == entry["group_auc"]
    table = (sweep / "summary.md").read_text()
    assert "| 16 |" in table and "| 32 |" in table and "n=16" in table


def test_mia_gen_summarize_rewrites_the_same_table(gan_leaks_sweep, capsys):
    sweep, _ = gan_leaks_sweep
    before = (sweep / "summary.csv").read_text()
    assert summarize_main([str(sweep)]) == 0
    assert (sweep / "summary.csv").read_text() == before
    assert "AUC against split.n_members" in capsys.readouterr().out


def test_summarize_without_results_says_what_to_run(tmp_path):
    with pytest.raises(MiaGenError, match="run the sweep"):
        summarize(tmp_path)
    script = Path(sys.executable).parent / "mia-gen-summarize"
    result = subprocess.run([str(script), str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2 and "not a directory" in result.stderr
