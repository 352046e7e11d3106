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


def run_sweep(tmp_path_factory, name, overrides):
    """Run a multirun with `overrides` in a fresh directory; returns its sweep directory and the process."""
    tmp_path = tmp_path_factory.mktemp(name)
    result = run_cli(["-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "sweep", result


@pytest.fixture(scope="module")
def gan_leaks_sweep(tmp_path_factory):
    return run_sweep(tmp_path_factory, "gan_leaks", TINY_GAN_LEAKS)


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


TINY_DEFENSES = [
    "experiment=defense_benchmark", "model=dcgan", "defense=none,early_stopping,dp_sgd", "logger=wandb",
    "progress=false", "device=cpu", "split.n_members=32", "split.n_non_members=64", "split.n_reference=64",
    "benchmark.n_samples=400", "model.training.steps=8", "model.training.batch_size=16", "model.generator.base_channels=8",
    "model.discriminator.base_channels=8", "model.training.checkpoint_every=4", "model.training.sample_every=1000",
    "evaluation.n_bootstrap=50", "attack.latent_inversion.iterations=2", "attack.logan.batch_size=64",
    "utility.classifier_epochs=2", "utility.n_samples=200",
]


@pytest.fixture(scope="module")
def defense_sweep(tmp_path_factory):
    return run_sweep(tmp_path_factory, "defenses", TINY_DEFENSES)


def test_the_defense_table_matches_the_runs_results(defense_sweep):
    sweep, result = defense_sweep
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 5 and {row["defense"] for row in rows} == {"none", "early_stopping", "dp_sgd"}
    for row in rows:
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        meta = results["metadata"]
        (entry,) = [e for e in results["attacks"] if e["attack"] == row["attack"]]
        assert float(row["auc"]) == entry["auc"] and json.loads(row["tpr_at_fpr"]) == entry["tpr_at_fpr"]
        assert row["defense"] == meta["defense"]["name"] and row["strength"] == meta["defense"]["strength"]
        assert float(row["utility"]) == meta["utility"]["value"] and row["utility_metric"] == "fid_classifier"
        assert int(row["training_steps"]) == meta["training_steps"]
        if row["defense"] == "dp_sgd":
            assert float(row["epsilon"]) == meta["privacy"]["epsilon"] and meta["privacy"]["epsilon"] <= 10
        else:
            assert row["epsilon"] == "" and "privacy" not in meta
    assert {row["training_steps"] for row in rows if row["defense"] == "early_stopping"} == {"2"}
    table = (sweep / "summary.md").read_text()
    assert "| dcgan | dp_sgd | target ε=10, C=1 |" in table and "0.25 of training" in table
    dp_row = next(line for line in table.splitlines() if line.startswith("| dcgan | dp_sgd"))
    dp = [row for row in rows if row["defense"] == "dp_sgd"]
    assert f"{float(dp[0]['epsilon']):.2f}" in dp_row and f"{float(dp[0]['utility']):.2f}" in dp_row
    for row in dp:  # every attack's AUC / TPR@1% / TPR@0.1% in its cell
        tpr = json.loads(row["tpr_at_fpr"])
        assert f"{float(row['auc']):.3f} / {tpr['0.01']:.2f} / {tpr['0.001']:.2f}" in dp_row
    assert (sweep / "privacy_utility.png").stat().st_size > 0


def test_the_defense_table_is_logged_to_wandb(defense_sweep):
    sweep, _ = defense_sweep
    (run,) = (sweep / "wandb").glob("offline-run-*")  # the summary's own run, beside the jobs' runs
    tables = list(run.rglob("benchmark_*.table.json"))
    assert tables, sorted(p.name for p in run.rglob("*"))
    logged = json.loads(tables[0].read_text())
    assert "max_auc" in logged["columns"] and "dp_sgd" in {row[logged["columns"].index("defense")]
                                                           for row in logged["data"]}
    assert len(logged["data"]) == 3
