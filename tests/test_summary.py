"""Sweep summaries: the gan_leaks_digits experiment as a (shrunk) multirun, and mia-gen-summarize."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mia_gen.errors import MiaGenError
from mia_gen.experiments.summary import main as summarize_main
from mia_gen.experiments.summary import summarize
from test_pipeline import run_cli

TINY_GAN_LEAKS = [
    "experiment=gan_leaks_digits", "logger=none", "progress=false", "device=cpu",
    "split.n_members=16,32", "split.n_non_members=64", "sampling.n_samples=400", "sampling.shard_size=200",
    "model.training.steps=10", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
    "model.training.checkpoint_every=10", "model.training.sample_every=1000", "evaluation.n_bootstrap=50",
    "attack.latent_inversion.iterations=2", "attack.latent_inversion_pbb.generations=2",
    "attack.calibration.params.iterations=2", "attack.co_membership.encoder_steps=5",
    "attack.co_membership.iterations=2", "attack.co_membership.n_groups=10", "attack.co_membership.refine_steps=2",
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
            assert json.loads(row["group_auc_per_record_average"]) == entry["group_auc_per_record_average"]
    table = (sweep / "summary.md").read_text()
    assert "| 16 |" in table and "| 32 |" in table and "n=16" in table
    assert "co_membership (per-record average)" in table  # the baseline beside the joint attack


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


TINY_SEEDS = ["model=memorizer", "logger=none", "progress=false", "device=cpu", "attack=[sample_distance,monte_carlo]",
              "seed=0,1,2", "model.generator.noise_std=0.3,1.0", "split.n_members=32", "split.n_non_members=64",
              "split.n_reference=0", "sampling.n_samples=300", "sampling.shard_size=300", "evaluation.n_bootstrap=50",
              "utility.metric=none"]


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    return run_sweep(tmp_path_factory, "seeds", TINY_SEEDS)


def _write_job(sweep, job, overrides, seed, aucs, blind_auc):
    """A job directory as a multirun leaves it: `.hydra/overrides.yaml` and a results.json."""
    (sweep / job / ".hydra").mkdir(parents=True)
    (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    attacks = [{"attack": name, "access": "samples", "auc": auc, "ci95": {"auc": [auc - 0.1, auc + 0.1]},
                "tpr_at_fpr": {"0.1": auc / 2, "0.01": auc / 4, "0.001": auc / 8}, "n_members": 64,
                "n_non_members": 256, "sign": 1, "sign_source": "declared"} for name, auc in aucs.items()]
    payload = {"config_hash": job, "attacks": attacks,
               "metadata": {"seed": seed, "model": {"name": "dcgan"}, "utility": {"value": 10.0 + seed,
                                                                                  "metric": "fid_classifier"}},
               "blind_baseline": {"method": "m", "auc": blind_auc, "ci95": [blind_auc - 0.05, blind_auc + 0.05],
                                  "shifted": blind_auc - 0.05 > 0.5, "message": "x"}}
    (sweep / job / "results.json").write_text(json.dumps(payload))


def test_jobs_differing_only_by_seed_become_one_row_of_mean_and_sd(tmp_path):
    sweep = tmp_path / "sweep"
    aucs = {(0, 16): (0.8, 0.3), (1, 16): (0.9, 0.35), (2, 16): (0.7, 0.4), (0, 32): (0.6, 0.5)}
    for number, ((seed, members), (fbb, mc)) in enumerate(aucs.items()):
        _write_job(sweep, str(number), [f"seed={seed}", f"split.n_members={members}"], seed,
                   {"sample_distance": fbb, "monte_carlo": mc}, blind_auc=0.5 + 0.01 * seed)
    paths = summarize(sweep, logger_cfg=None)
    with open(paths["benchmark"]) as handle:
        rows = {row["split.n_members"]: row for row in csv.DictReader(handle)}
    three, one = rows["16"], rows["32"]
    assert (three["n_seeds"], three["seeds"], one["n_seeds"]) == ("3", "0,1,2", "1")
    for column, values in (("sample_distance/auc", [0.8, 0.9, 0.7]), ("monte_carlo/tpr@1%", [0.3 / 4, 0.35 / 4, 0.1]),
                           ("utility", [10.0, 11.0, 12.0]), ("blind_auc", [0.5, 0.51, 0.52])):
        mean = sum(values) / 3
        assert float(three[column]) == pytest.approx(mean)
        assert float(three[f"{column}_sd"]) == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
    assert float(one["sample_distance/auc"]) == 0.6 and one["sample_distance/auc_sd"] == ""
    assert float(three["max_auc"]) == pytest.approx(0.8) and float(one["max_auc"]) == 0.6  # signed, not 1 - 0.3
    table = paths["md"].read_text()
    assert "0.800 ± 0.100 / 0.20 ± 0.03 / 0.10 ± 0.01" in table and "1 (single seed)" in table
    assert "# AUC against split.n_members" in table and "WARNING" not in table
    with pytest.raises(MiaGenError, match="replicate key"):
        summarize(sweep, x="seed", logger_cfg=None)


def test_a_shifted_split_is_flagged_in_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    for number, blind_auc in enumerate((0.5, 0.9)):
        _write_job(sweep, str(number), [f"split.n_members={16 * (number + 1)}"], 0, {"pia": 0.9}, blind_auc)
    table = summarize(sweep, logger_cfg=None)["md"].read_text()
    assert "WARNING: distribution-shifted split in job(s) 1:" in table and "0.900 (shifted)" in table


@pytest.mark.slow
def test_a_seed_sweep_is_summarised_as_mean_and_sd_over_the_seeds(seed_sweep):
    sweep, _ = seed_sweep
    jobs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/results.json"))]
    assert len(jobs) == 6
    with open(sweep / "benchmark.csv") as handle:
        settings = list(csv.DictReader(handle))
    assert len(settings) == 2 and {row["n_seeds"] for row in settings} == {"3"}
    table = (sweep / "summary.md").read_text()
    for setting in settings:
        noise = float(setting["model.generator.noise_std"])
        mine = [json.loads((sweep / job / "results.json").read_text()) for job in setting["job"].split(",")]
        assert {f"model.generator.noise_std={noise}"} == {
            line.strip("- ") for job in setting["job"].split(",")
            for line in (sweep / job / ".hydra" / "overrides.yaml").read_text().splitlines() if "noise_std" in line}
        assert sorted(job["metadata"]["seed"] for job in mine) == [0, 1, 2]
        for attack in ("sample_distance", "monte_carlo"):
            entries = [next(e for e in job["attacks"] if e["attack"] == attack) for job in mine]
            for column, values in (("auc", [e["auc"] for e in entries]),
                                   ("tpr@1%", [e["tpr_at_fpr"]["0.01"] for e in entries]),
                                   ("tpr@0.1%", [e["tpr_at_fpr"]["0.001"] for e in entries])):
                mean = sum(values) / 3
                sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # sample sd
                assert float(setting[f"{attack}/{column}"]) == pytest.approx(mean, abs=1e-12)
                assert float(setting[f"{attack}/{column}_sd"]) == pytest.approx(sd, abs=1e-12)
            auc_mean = sum(e["auc"] for e in entries) / 3
            auc_sd = (sum((e["auc"] - auc_mean) ** 2 for e in entries) / 2) ** 0.5
            assert f"{auc_mean:.3f} ± {auc_sd:.3f}" in table
        blind = [job["blind_baseline"]["auc"] for job in mine]
        assert float(setting["blind_auc"]) == pytest.approx(sum(blind) / 3, abs=1e-12)
        best = max(float(setting[f"{a}/auc"]) for a in ("sample_distance", "monte_carlo"))
        assert float(setting["max_auc"]) == pytest.approx(best)  # the largest signed (mean) AUC, not max(AUC, 1-AUC)
    assert "# AUC against model.generator.noise_std" in table and "max AUC (signed)" in table
    assert "| 3 |" in table and "1 (single seed)" not in table


def test_single_seed_rows_are_marked(gan_leaks_sweep):
    sweep, _ = gan_leaks_sweep
    table = (sweep / "summary.md").read_text()
    assert table.count("1 (single seed)") == 4  # two settings, in the benchmark and in the swept table
