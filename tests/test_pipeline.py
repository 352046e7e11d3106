"""The whole pipeline, composed from the real configs and shrunk so it runs in seconds."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import mia_gen.experiments.pipeline as pipeline_module
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.errors import MiaGenError
from mia_gen.experiments.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]

FAST = [
    "logger=none", "progress=false", "device=cpu",
    "split.n_members=100", "split.n_non_members=100", "split.n_reference=400",
    "sampling.n_samples=3000", "sampling.shard_size=1000", "evaluation.n_bootstrap=200",
    "utility.metric=none",  # tests of utility say so; it trains a feature classifier per cache
]
MEMORIZER = FAST + ["model=memorizer"]
TINY_DCGAN = FAST + [
    "model=dcgan", "model.training.steps=20", "model.generator.base_channels=8",
    "model.discriminator.base_channels=8", "model.training.checkpoint_every=10",
    "model.training.sample_every=1000", "sampling.n_samples=1500",
]


def make_config(overrides, cache_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache_dir}"])


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_outputs_follow_the_contract(tmp_path):
    cfg = make_config(MEMORIZER, tmp_path / "cache")
    run_dir = tmp_path / "run"
    Pipeline(cfg, run_dir).run()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["config_hash"] and results["metadata"]["samples"]["n_samples"] == 3000
    assert results["metadata"]["data"]["fingerprint"]
    names = [entry["attack"] for entry in results["attacks"]]
    assert sorted(names) == ["domias", "monte_carlo", "sample_distance"]
    for entry in results["attacks"]:
        assert {"attack", "access", "auc", "asr", "tpr_at_fpr", "ci95", "n_members", "n_non_members",
                "seconds"} <= set(entry)
        assert set(entry["tpr_at_fpr"]) == {"0.1", "0.01", "0.001"}
        assert entry["access"] == "samples" and entry["n_members"] == entry["n_non_members"] == 100
        assert entry["auc"] >= 0.95  # a memorising generator leaks
    rows = read_csv(run_dir / "scores.csv")
    assert len(rows) == 3 * 200 and set(rows[0]) == {"attack", "record_id", "is_member", "score"}
    members = {int(r["record_id"]) for r in rows if r["is_member"] == "1"}
    assert len(members) == 100
    for name in ("roc.png", "score_histograms.png", "nearest_neighbours.png", "report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    report = (run_dir / "report.md").read_text()
    assert "sample_distance" in report and "roc.png" in report


def test_same_config_and_seed_give_identical_scores(tmp_path):
    """Training, sampling and every attack are deterministic on CPU (fresh caches each time)."""
    outputs = []
    for attempt in ("a", "b"):
        cfg = make_config(TINY_DCGAN, tmp_path / f"cache_{attempt}")
        Pipeline(cfg, tmp_path / f"run_{attempt}").run()
        outputs.append((tmp_path / f"run_{attempt}" / "scores.csv").read_bytes())
    assert outputs[0] == outputs[1]


def test_a_sweep_over_attack_parameters_never_retrains_or_resamples(tmp_path, monkeypatch):
    Pipeline(make_config(MEMORIZER, tmp_path / "cache"), tmp_path / "run1").run()

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(pipeline_module, "train_model", forbidden)
    monkeypatch.setattr(pipeline_module, "write_samples", forbidden)
    cfg = make_config(MEMORIZER + ["attack.monte_carlo.variant=log"], tmp_path / "cache")
    results = Pipeline(cfg, tmp_path / "run2").run()
    assert {r["attack"] for r in results} == {"sample_distance", "monte_carlo", "domias"}
    scores = len(list((tmp_path / "cache" / "scores").glob("*.json")))
    assert scores == 4  # three first-run attacks + the changed monte_carlo


def test_evaluate_alone_needs_cached_scores(tmp_path):
    cfg = make_config(MEMORIZER, tmp_path / "cache")
    with pytest.raises(MiaGenError, match="mia-gen-attack"):
        Pipeline(cfg, tmp_path / "run").evaluate(require_cached=True)
    Pipeline(cfg, tmp_path / "run").run("attack")
    results = Pipeline(cfg, tmp_path / "run").evaluate(require_cached=True)
    assert len(results) == 3


def test_bad_input_is_reported_with_the_fix(tmp_path):
    too_many = make_config(MEMORIZER + ["split.n_members=5000"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="n_members"):
        Pipeline(too_many, tmp_path / "run").run()
    missing = make_config(MEMORIZER + [f"model.checkpoint={tmp_path / 'nowhere'}"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="mia-gen-train"):
        Pipeline(missing, tmp_path / "run").run()


def test_channel_mismatch_between_data_and_model_is_explained(tmp_path):
    cfg = make_config(TINY_DCGAN + ["model.generator.channels=3", "model.discriminator.channels=3"],
                      tmp_path / "cache")
    with pytest.raises(MiaGenError, match="channels"):
        Pipeline(cfg, tmp_path / "run").run("train")


def run_cli(args, tmp_path, script="mia-gen", cache="cache"):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([str(Path(sys.executable).parent / script), *args,
                           f"cache_dir={tmp_path / cache}"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_a_stage_and_then_the_rest_with_wandb_offline(tmp_path):
    overrides = [*MEMORIZER, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"]
    sampled = run_cli([*overrides, "logger=none"], tmp_path, script="mia-gen-sample")
    assert sampled.returncode == 0, sampled.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    done = run_cli(overrides, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "sample_distance" in done.stdout  # the results table
    assert (tmp_path / "run" / "results.json").is_file()
    assert list((tmp_path / "run").glob("wandb/offline-run-*"))


def test_cli_multirun_writes_one_run_per_job(tmp_path):
    result = run_cli(["-m", *MEMORIZER, "attack=sample_distance", "attack.sample_distance.k=1,3",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(jobs) == 2
    configs = [json.loads(j.read_text())["attacks"][0]["config"]["k"] for j in jobs]
    assert sorted(configs) == [1, 3]


def test_cli_error_exits_nonzero_with_the_fix(tmp_path):
    result = run_cli([*MEMORIZER, "split.n_members=5000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert "n_members" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override", ["split.n_membrs=64", "attack=[no_such_attack]"])
def test_a_config_the_cli_cannot_use_exits_with_the_usage_code_not_the_crash_code(tmp_path, override):
    """Hydra exits 1 on its own config errors; 1 is the crash code here, so the CLI maps them to 2."""
    result = run_cli([*MEMORIZER, override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config is invalid" in result.stderr


@pytest.mark.parametrize("script", ["mia-gen", "mia-gen-audit", "mia-gen-summarize"])
def test_every_console_script_prints_the_package_version(tmp_path, script):
    import mia_gen

    result = subprocess.run([str(Path(sys.executable).parent / script), "--version"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"mia-gen {mia_gen.__version__}")


def test_queries_reach_attacks_in_record_id_order(tmp_path):
    """Attacks see members and non-members mixed in dataset order, never grouped by label."""
    cfg = make_config(MEMORIZER, tmp_path / "cache")
    pipe = Pipeline(cfg, tmp_path / "run")
    ids = pipe.query_ids
    assert np.all(np.diff(ids) > 0)  # record-id order: nothing in the order hints at membership


def test_sampling_killed_mid_run_resumes_to_the_uninterrupted_store(tmp_path):
    """SIGKILL the real CLI while it writes shards; the rerun must finish byte-identical."""
    import signal
    import time

    overrides = [*MEMORIZER, "sampling.n_samples=120000", "sampling.shard_size=4000",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    script = str(Path(sys.executable).parent / "mia-gen-sample")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    process = subprocess.Popen([script, *overrides, f"cache_dir={tmp_path / 'killed'}"], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    manifests = []
    while time.time() < deadline and process.poll() is None:
        manifests = list((tmp_path / "killed" / "samples").glob("*/manifest.json"))
        if manifests and len(json.loads(manifests[0].read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert manifests, "sampling never started"
    partial = json.loads(manifests[0].read_text())
    assert not partial["complete"], "sampling finished before it could be killed; raise n_samples"

    resumed = run_cli(overrides, tmp_path, script="mia-gen-sample", cache="killed")
    assert resumed.returncode == 0, resumed.stderr
    fresh = run_cli(overrides, tmp_path, script="mia-gen-sample", cache="fresh")
    assert fresh.returncode == 0, fresh.stderr
    killed_dir = manifests[0].parent
    fresh_dir = tmp_path / "fresh" / "samples" / killed_dir.name
    shard_files = sorted(p.name for p in fresh_dir.glob("shard_*.npy"))
    assert shard_files == sorted(p.name for p in killed_dir.glob("shard_*.npy")) and shard_files
    for name in shard_files:
        assert (killed_dir / name).read_bytes() == (fresh_dir / name).read_bytes(), name


def test_auditing_a_synthetic_image_dataset_finds_copied_members(tmp_path):
    """A synthetic dataset that holds near-copies of the members is caught without any model."""
    cfg = make_config(FAST, tmp_path / "cache")
    pipe = Pipeline(cfg, tmp_path / "probe")
    members = pipe.records.get(pipe.split.members)
    rng = np.random.default_rng(0)
    copies = members[rng.integers(0, len(members), 2000)].numpy()
    copies = np.clip(copies + rng.normal(0, 0.1, copies.shape), -1, 1).astype(np.float32)
    np.save(tmp_path / "synthetic.npy", copies)

    cfg = make_config(FAST + [f"synthetic.path={tmp_path / 'synthetic.npy'}"], tmp_path / "cache")
    results = Pipeline(cfg, tmp_path / "run").run()
    assert all(r["auc"] >= 0.95 for r in results), [(r["attack"], r["auc"]) for r in results]
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["metadata"]
    assert meta["model"]["synthetic"].endswith("synthetic.npy") and meta["samples"]["n_samples"] == 2000
    with pytest.raises(MiaGenError, match="synthetic.path"):
        Pipeline(cfg, tmp_path / "run").train()


def test_auditing_synthetic_tabular_data(tmp_path):
    """Non-image records: a real table (scikit-learn's breast cancer data) and a leaky synthetic copy."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer().data
    table = ((table - table.mean(0)) / table.std(0)).astype(np.float32)
    np.save(tmp_path / "real.npy", table)
    overrides = ["logger=none", "progress=false", "device=cpu", "data=array",
                 f"data.path={tmp_path / 'real.npy'}", "data.value_range=null",
                 "split.n_members=100", "split.n_non_members=100", "split.n_reference=300",
                 "evaluation.n_bootstrap=100", "attack.domias.n_components=5"]
    pipe = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "probe")
    rng = np.random.default_rng(1)
    members = table[pipe.split.members]
    leaky = members[rng.integers(0, len(members), 3000)] + rng.normal(0, 0.1, (3000, table.shape[1]))
    np.save(tmp_path / "synthetic.npy", leaky.astype(np.float32))
    cfg = make_config(overrides + [f"synthetic.path={tmp_path / 'synthetic.npy'}"], tmp_path / "cache")
    results = Pipeline(cfg, tmp_path / "run").run()
    assert all(r["auc"] >= 0.9 for r in results), [(r["attack"], r["auc"]) for r in results]
    rows = read_csv(tmp_path / "run" / "scores.csv")
    assert len(rows) == 3 * 200


def test_a_trained_model_or_a_sample_store_from_elsewhere_is_attacked_by_pointing_at_it(tmp_path):
    first = Pipeline(make_config(MEMORIZER, tmp_path / "cache"), tmp_path / "run")
    first.run()
    expected = (tmp_path / "run" / "scores.csv").read_bytes()

    by_model = make_config(MEMORIZER + [f"model.checkpoint={first.model_dir}"], tmp_path / "other")
    Pipeline(by_model, tmp_path / "run_model").run()
    assert (tmp_path / "run_model" / "scores.csv").read_bytes() == expected
    by_store = make_config(MEMORIZER + [f"sampling.store={first.sample_dir}"], tmp_path / "third")
    Pipeline(by_store, tmp_path / "run_store").run()
    assert (tmp_path / "run_store" / "scores.csv").read_bytes() == expected

    # Replacing the weights in place is a different model: nothing cached for the old one is reused.
    before = Pipeline(by_model, tmp_path / "x").train_key
    (first.model_dir / "generator.json").write_text((first.model_dir / "generator.json").read_text() + " ")
    assert Pipeline(by_model, tmp_path / "y").train_key != before


def test_records_an_attack_learnt_from_are_not_evaluated_and_sweeps_are_plotted(tmp_path):
    """A learning attack that memorises its labelled subset must gain nothing from it."""
    from mia_gen.attacks.base import ATTACKS, Access, Attack, AttackOutput

    class LabelEcho(Attack):
        name, access, needs_labelled_subset = "label_echo", Access.SAMPLES, True
        defaults = {"strength": 1.0}

        def score(self, context):
            positions, labels = context.labelled_subset
            scores = np.zeros(len(context.queries))
            scores[positions] = self.strength * labels  # perfect on what it saw, blind elsewhere
            sweep = {t: (scores * t).tolist() for t in (10, 20)}
            return AttackOutput(scores=scores, info={"trained_on": positions.tolist(), "sweep": sweep})

    ATTACKS["label_echo"] = LabelEcho
    try:
        cfg = make_config(MEMORIZER + ["attack=sample_distance", "+attack.label_echo.strength=2.0"],
                          tmp_path / "cache")
        pipe = Pipeline(cfg, tmp_path / "run")
        results = {r["attack"]: r for r in pipe.run()}
    finally:
        del ATTACKS["label_echo"]
    positions, labels = pipe.labelled_subset()
    assert len(positions) == 40 and labels.sum() == 20  # 20% of the 100 members and 20% of the 100 non-members
    echo = results["label_echo"]
    assert echo["auc"] == 0.5 and echo["n_members"] + echo["n_non_members"] == 160
    assert echo["auc_by_timestep"] == {"10": 0.5, "20": 0.5}
    assert (tmp_path / "run" / "timestep_sweep.png").stat().st_size > 0
    rows = [r for r in read_csv(tmp_path / "run" / "scores.csv") if r["attack"] == "label_echo"]
    assert len(rows) == 160
    assert not {int(r["record_id"]) for r in rows} & set(pipe.query_ids[positions].tolist())


TINY_DDPM = FAST + [
    "model=ddpm", "model.unet.block_out_channels=[8,16]", "model.unet.norm_num_groups=8",
    "model.training.steps=4", "model.training.warmup_steps=1", "model.training.checkpoint_every=2",
    "model.training.sample_every=100", "model.training.batch_size=16",
]


def test_diffusion_white_box_attacks_run_through_the_pipeline_without_sampling(tmp_path):
    attacks = ["attack=[diffusion_loss,secmi_stat,secmi_nn,pia,pian]", "attack.secmi_nn.nn_epochs=2",
               "attack.secmi_nn.classifier=small_cnn"]  # the ResNet-18 has its own tests
    cfg = make_config(TINY_DDPM + attacks, tmp_path / "cache")
    pipe = Pipeline(cfg, tmp_path / "run")
    results = {r["attack"]: r for r in pipe.run()}
    assert set(results) == {"diffusion_loss", "secmi_stat", "secmi_nn", "pia", "pian"}
    assert all(r["access"] == "white_box" for r in results.values())
    assert results["pia"]["info"]["model_calls_per_record"] == 2
    # secmi_nn learnt from 20% of the 200 queries; those are not evaluated.
    assert results["secmi_nn"]["n_members"] + results["secmi_nn"]["n_non_members"] == 160
    assert results["pia"]["n_members"] + results["pia"]["n_non_members"] == 200
    assert not (tmp_path / "cache" / "samples").exists()  # white-box attacks need no samples


def test_a_saved_diffusers_pipeline_is_attacked_by_pointing_at_it_with_a_split_file(tmp_path):
    trained = Pipeline(make_config(TINY_DDPM + ["attack=pia"], tmp_path / "cache"), tmp_path / "run")
    expected = {r["attack"]: r["auc"] for r in trained.run()}
    assert (trained.model_dir / "model_index.json").is_file()  # a real diffusers pipeline directory
    trained.split.save(tmp_path / "split.json")

    cfg = make_config(FAST + ["model=diffusers", f"model.checkpoint={trained.model_dir}", "attack=pia",
                              f"split.path={tmp_path / 'split.json'}"], tmp_path / "elsewhere")
    results = Pipeline(cfg, tmp_path / "run2").run()
    assert {r["attack"]: r["auc"] for r in results} == expected


def test_loading_options_of_a_given_checkpoint_are_part_of_its_cache_key(tmp_path):
    """Attacking the raw weights instead of the EMA weights of the same directory is another model."""
    trained = Pipeline(make_config(TINY_DDPM + ["attack=pia"], tmp_path / "cache"), tmp_path / "run")
    trained.train()
    keys = {
        ema: Pipeline(make_config(FAST + ["model=diffusers", f"model.checkpoint={trained.model_dir}",
                                          f"model.use_ema={ema}", "attack=pia"], tmp_path / "c"),
                      tmp_path / "r").train_key
        for ema in ("true", "false")
    }
    assert keys["true"] != keys["false"]


def test_calibration_trains_a_reference_model_on_reference_records(tmp_path):
    """The reference model is trained like the target on reference records, cached beside it, and the
    calibrated score is the target's minus the reference's; a second key can wrap another attack."""
    # lambda_z=0: the memoriser's latent is (record index, 256 noise values), so the norm prior would
    # move the index (a jump to another record) rather than fit the noise.
    overrides = MEMORIZER + [
        "attack=[latent_inversion,calibration]", "attack.latent_inversion.lambda_lpips=0",
        "attack.latent_inversion.lambda_z=0", "attack.latent_inversion.iterations=3",
        "attack.calibration.params={lambda_lpips:0,lambda_z:0,iterations:3}",
        "+attack.calibrated_fbb={_target_:mia_gen.attacks.calibration.Calibration,attack:sample_distance}",
    ]
    cfg = make_config(overrides, tmp_path / "cache")
    pipeline = Pipeline(cfg, tmp_path / "run")
    pipeline.run()
    models = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "models").iterdir())
    assert models == ["memorizer", "reference"]
    reference = pipeline.reference_pipeline(pipeline.attacks()["calibration"])
    assert set(reference.training_ids) <= set(pipeline.split.reference)
    assert len(reference.training_ids) == len(pipeline.split.members)
    scored = pipeline.attack(require_cached=True)
    for name in ("calibration", "calibrated_fbb"):
        info = scored[name]["info"]
        np.testing.assert_allclose(scored[name]["scores"],
                                   np.subtract(info["target_scores"], info["reference_scores"]))
    np.testing.assert_allclose(scored["calibration"]["info"]["target_scores"], scored["latent_inversion"]["scores"])
    results = {r["attack"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())["attacks"]}
    assert results["calibrated_fbb"]["auc"] >= 0.85 and results["calibration"]["auc"] >= 0.85
    assert "target_scores" not in results["calibration"]["info"]  # per-record detail stays in the cache


def test_calibration_without_reference_records_or_with_a_given_checkpoint_explains_the_fix(tmp_path):
    cfg = make_config(MEMORIZER + ["attack=[calibration]", "split.n_reference=0"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="split.n_reference"):
        Pipeline(cfg, tmp_path / "run").run()
    Pipeline(make_config(MEMORIZER, tmp_path / "cache"), tmp_path / "first").run("train")
    trained = next((tmp_path / "cache" / "models").iterdir())
    cfg = make_config(MEMORIZER + ["attack=[calibration]", f"model.checkpoint={trained}"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="reference_checkpoint"):
        Pipeline(cfg, tmp_path / "run2").run()


def test_co_membership_reports_the_joint_attack_beside_the_per_record_average_on_unlabelled_groups(tmp_path):
    from mia_gen.groups import group_labels

    overrides = MEMORIZER + [
        "attack=[co_membership]", "attack.co_membership.lambda_lpips=0", "attack.co_membership.encoder_steps=5",
        "attack.co_membership.encoder_batch_size=16", "attack.co_membership.iterations=2",
        "attack.co_membership.refine_steps=2", "attack.co_membership.group_sizes=[1,4]", "attack.co_membership.n_groups=20",
    ]
    pipeline = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    pipeline.run()
    (result,) = json.loads((tmp_path / "run" / "results.json").read_text())["attacks"]
    assert set(result["group_auc"]) == set(result["group_auc_per_record_average"]) == {"1", "4"}
    # disjoint groups (20 of each class per n here) and each group AUC with its 95% DeLong interval
    assert result["n_groups"] == {"1": [20, 20], "4": [20, 20]}
    for key in ("group_auc", "group_auc_per_record_average"):
        for n, interval in result[f"{key}_ci"].items():
            if interval is None:  # DeLong's variance vanishes only at AUC 0 or 1
                assert result[key][n] in (0.0, 1.0)
            else:
                assert interval[0] <= result[key][n] <= interval[1] and interval[1] - interval[0] > 0
    assert "groups" not in result["info"] and "group_scores" not in result["info"]  # kept in the cached scores
    assert (tmp_path / "run" / "group_auc.png").stat().st_size > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "group_auc.png" in report and "mean of per-record scores" in report and "groups (members / non-members)" in report
    # the attack gets groups, not labels: member and non-member groups come shuffled together
    attack = pipeline.attacks()["co_membership"]
    context = pipeline.context_for(attack)
    assert context.labelled_subset is None
    labels = group_labels(context.groups[4], np.isin(context.record_ids, pipeline.split.members))
    assert labels.sum() == 20 and 0 < labels[:20].sum() < 20
    # the groups are part of the scores' identity; with a labelled calibration subset none of its records is drawn
    calibrated = Pipeline(make_config(overrides + ["evaluation.sign=labelled_subset"], tmp_path / "cache"), tmp_path / "b")
    assert calibrated.attack_key("co_membership", attack) != pipeline.attack_key("co_membership", attack)
    assert set(calibrated.groups([4], 20)[4].ravel()).isdisjoint(calibrated.labelled_subset()[0])


def test_groups_larger_than_the_split_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "train_model", lambda *a, **k: pytest.fail("trained anyway"))
    cfg = make_config(MEMORIZER + ["attack=[co_membership]", "attack.co_membership.group_sizes=[1,128]"],
                      tmp_path / "cache")
    with pytest.raises(MiaGenError, match="n=128"):
        Pipeline(cfg, tmp_path / "run").run()


def test_a_defense_is_part_of_the_models_identity_and_the_memorizer_refuses_one(tmp_path):
    plain = Pipeline(make_config(TINY_DCGAN, tmp_path / "cache"), tmp_path / "a")
    augmented = Pipeline(make_config(TINY_DCGAN + ["defense=augmentation"], tmp_path / "cache"), tmp_path / "b")
    assert plain.train_key != augmented.train_key
    augmented.run("train")
    assert json.loads((augmented.model_dir / "trainer_state.json").read_text())["complete"]
    cfg = make_config(MEMORIZER + ["defense=weight_decay"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="does not apply to the memorizer"):
        Pipeline(cfg, tmp_path / "c").run("train")


def test_a_dp_trained_model_reports_the_epsilon_it_spent(tmp_path):
    overrides = TINY_DCGAN + ["defense=dp_sgd", "defense.target_epsilon=8.0", "attack=[sample_distance]",
                              "model.discriminator._target_=mia_gen.models.dcgan.DCGANDiscriminatorGroupNorm"]
    Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run").run()
    privacy = json.loads((tmp_path / "run" / "results.json").read_text())["metadata"]["privacy"]
    assert privacy["mechanism"] == "dp_sgd" and 7.0 <= privacy["epsilon"] <= 8.0
    assert privacy["private_steps"] == 20 and privacy["delta"] == 1 / (10 * 100)


def test_parallel_jobs_share_one_model_and_one_sample_store(tmp_path):
    """Two jobs run at once (joblib); the model and store they both need are built once, then reused."""
    result = run_cli(["-m", "hydra/launcher=parallel", *TINY_DCGAN, "attack=sample_distance",
                      "attack.sample_distance.k=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == 2
    assert len([p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]) == 1
    assert len([p for p in (tmp_path / "cache" / "samples").iterdir() if p.is_dir()]) == 1


def test_a_failed_job_does_not_lose_the_others_and_a_rerun_only_finishes_what_is_missing(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *MEMORIZER, "attack=sample_distance", f"hydra.sweep.dir={sweep}"]
    failed = run_cli([*args, "split.n_members=5000,100"], tmp_path)
    assert failed.returncode != 0 and "5000 members" in failed.stderr
    assert not (sweep / "0" / "results.json").exists() and (sweep / "1" / "results.json").is_file()
    scores = sorted((tmp_path / "cache" / "scores").iterdir())
    rerun = run_cli([*args, "split.n_members=100", f"hydra.sweep.dir={tmp_path / 'rerun'}"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted((tmp_path / "cache" / "scores").iterdir()) == scores  # nothing was scored again
    log = (tmp_path / "rerun" / "0" / "mia-gen.log").read_text()
    assert "cached scores" in log and "cached store" in log and "train:" not in log


def test_early_stopping_is_the_undefended_model_trained_for_fewer_steps(tmp_path):
    overrides = [*TINY_DCGAN, "attack=[sample_distance]", "utility.metric=fid_classifier",
                 "utility.classifier_epochs=2", "utility.n_samples=200"]
    stopped = Pipeline(make_config([*overrides, "defense=early_stopping", "defense.fraction=0.5"], tmp_path / "cache"),
                       tmp_path / "stopped")
    short = Pipeline(make_config([*overrides, "model.training.steps=10"], tmp_path / "cache"), tmp_path / "short")
    assert stopped.train_key == short.train_key and stopped.model_dir == short.model_dir  # one cached model
    stopped.run()
    state = json.loads((stopped.model_dir / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["complete"]
    meta = json.loads((tmp_path / "stopped" / "results.json").read_text())["metadata"]
    assert meta["defense"]["name"] == "early_stopping" and meta["defense"]["strength"] == "0.5 of training"
    assert meta["training_steps"] == 10
    assert meta["utility"]["metric"] == "fid_classifier" and meta["utility"]["n_samples"] == 200
    assert meta["utility"]["value"] > 0 and "fallback" in meta["utility"]["label"]
    short.run()  # the same model and samples: the same utility, read from the cache
    assert json.loads((tmp_path / "short" / "results.json").read_text())["metadata"]["utility"] == meta["utility"]
    cfg = make_config([*overrides, "defense=early_stopping", "defense.steps=50"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="beyond model.training.steps=20"):
        Pipeline(cfg, tmp_path / "beyond").run("train")


def test_a_longer_run_resumes_from_a_finished_shorter_one_bit_identically(tmp_path, caplog):
    from safetensors.torch import load_file

    Pipeline(make_config([*TINY_DCGAN, "model.training.steps=10"], tmp_path / "cache"), tmp_path / "a").run("train")
    longer = Pipeline(make_config(TINY_DCGAN, tmp_path / "cache"), tmp_path / "b")
    with caplog.at_level("INFO", logger="mia_gen.experiments.pipeline"):
        longer.run("train")
    assert "resuming from the finished 10-step run" in caplog.text
    fresh = Pipeline(make_config(TINY_DCGAN, tmp_path / "fresh"), tmp_path / "c")
    fresh.run("train")
    for name in ("generator", "discriminator"):
        extended = load_file(longer.model_dir / f"{name}.safetensors")
        scratch = load_file(fresh.model_dir / f"{name}.safetensors")
        assert all(torch.equal(extended[k], scratch[k]) for k in scratch)
    assert json.loads((longer.model_dir / "lineage.json").read_text())["steps"] == 20
    # DP-SGD solves its noise for the whole run: a longer run is not an extension of a shorter one
    dp = Pipeline(make_config([*TINY_DCGAN, "defense=dp_sgd"], tmp_path / "cache"), tmp_path / "d")
    assert dp.lineage_key() is None and longer.lineage_key() is not None


def test_a_shard_overwritten_in_place_is_caught_rebuilt_in_the_cache_and_refused_when_given(
        tmp_path, monkeypatch, caplog):
    from test_sample_store import overwrite_keeping_size_and_mtime

    from mia_gen import checksums
    from mia_gen.errors import CorruptStoreError

    ONE_ATTACK = MEMORIZER + ["attack=[sample_distance]", "evaluation.blind_baseline=false"]
    first = Pipeline(make_config(ONE_ATTACK, tmp_path / "cache"), tmp_path / "run")
    first.run()
    expected = (tmp_path / "run" / "scores.csv").read_bytes()
    shard = first.sample_dir / "shard_00001.samples.npy"

    overwrite_keeping_size_and_mtime(shard)
    monkeypatch.setattr(checksums, "_hashed", {})  # the next run is a new process
    with pytest.raises(CorruptStoreError, match=f"shard 1 .*sha256.*Delete {first.sample_dir} and sample again"):
        Pipeline(make_config(ONE_ATTACK, tmp_path / "cache"), tmp_path / "cached").run()  # scores cached: read in metadata
    shutil.rmtree(tmp_path / "cache" / "scores")  # the attacks read the samples again
    with caplog.at_level("WARNING", logger="mia_gen.experiments.pipeline"):
        Pipeline(make_config(ONE_ATTACK, tmp_path / "cache"), tmp_path / "rerun").run()
    assert "rebuilding the cached store" in caplog.text and "shard 1 file shard_00001.samples.npy" in caplog.text
    assert (tmp_path / "rerun" / "scores.csv").read_bytes() == expected

    overwrite_keeping_size_and_mtime(shard)
    damaged = shard.read_bytes()
    monkeypatch.setattr(checksums, "_hashed", {})
    given = make_config(ONE_ATTACK + [f"sampling.store={first.sample_dir}"], tmp_path / "other")
    with pytest.raises(CorruptStoreError, match=f"shard 1 .*sha256.*Delete {first.sample_dir} and sample again"):
        Pipeline(given, tmp_path / "given").run("sample")
    assert shard.read_bytes() == damaged  # a store the user gave is never resampled over


def test_a_synthetic_array_of_another_shape_is_refused_with_the_shape_it_needs(tmp_path):
    cfg = make_config(FAST, tmp_path / "cache")
    shape = Pipeline(cfg, tmp_path / "probe").records.record_shape  # digits: (1, 16, 16)
    np.save(tmp_path / "bigger.npy", np.zeros((50, 1, 32, 32), np.float32))
    np.save(tmp_path / "table.npy", np.zeros((50, 7), np.float32))
    for name in ("bigger.npy", "table.npy"):
        pipe = Pipeline(make_config(FAST + [f"synthetic.path={tmp_path / name}"], tmp_path / "cache"), tmp_path / "run")
        with pytest.raises(MiaGenError, match=r"of shape \((1, 32, 32|7,)\), but the records of data=digits .*"
                                              rf"shape \(N, {', '.join(map(str, shape))}\)"):
            pipe.sample()


def test_a_synthetic_image_folder_of_another_size_is_converted_with_a_logged_line(tmp_path, caplog):
    from PIL import Image

    (tmp_path / "synthetic" / "all").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "synthetic" / "all" / f"{i}.png")
    pipe = Pipeline(make_config(FAST + [f"synthetic.path={tmp_path / 'synthetic'}"], tmp_path / "cache"),
                    tmp_path / "run")
    with caplog.at_level("INFO", logger="mia_gen.datasets"):
        synthetic = pipe.synthetic_records
    assert synthetic.record_shape == pipe.records.record_shape == (1, 16, 16)
    assert "converted images" in caplog.text and "[(3, 32, 32)] to (1, 16, 16)" in caplog.text


def test_model_keys_count_data_captions_only_when_set(tmp_path):
    """data.captions (false by default) leaves the model keys of runs from before captions existed
    unchanged; turning captions on changes them (the records then carry captions)."""
    keys = {}
    for name, extra in {"default": [], "removed": ["~data.captions"], "false": ["data.captions=false"],
                        "on": ["data.captions=true"]}.items():
        pipeline = Pipeline(make_config(TINY_DCGAN + extra, tmp_path / "cache"), tmp_path / name)
        keys[name] = pipeline.train_key
    assert keys["default"] == keys["removed"] == keys["false"]
    assert keys["on"] != keys["default"]


def test_a_trained_model_damaged_on_disk_is_named_not_attacked(tmp_path):
    """Bytes flipped in the generator's weights, its size and modification time kept: the next run that loads the
    model checks it against the sha256 its trainer recorded (a given model.checkpoint too) and stops."""
    import os

    from mia_gen import checksums
    from mia_gen.errors import CorruptStoreError

    overrides = [*TINY_DCGAN, "attack=[logan]", "attack.logan.mode=white_box"]
    pipe = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    pipe.attack()
    weights = next(pipe.model_dir.glob("generator*.safetensors"))
    status = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    checksums._hashed.clear()  # another process: nothing hashed yet
    for given, cache in (([], "cache"), ([f"model.checkpoint={pipe.model_dir}"], "cache2")):  # cached / given
        checksums._hashed.clear()
        again = Pipeline(make_config([*overrides, *given], tmp_path / cache), tmp_path / "run2")
        with pytest.raises(CorruptStoreError, match=rf"{weights.name} does not match the sha256 recorded"):
            again.generator


def test_a_damaged_shorter_run_is_named_when_a_longer_run_would_extend_it(tmp_path):
    """A finished 20-step run whose trainer_state.pt is damaged: the 30-step run of the same lineage names that
    run's folder (deleting the new one looped), and once it is deleted trains from scratch."""
    from mia_gen import checksums
    from mia_gen.errors import CorruptStoreError

    short = Pipeline(make_config(TINY_DCGAN, tmp_path / "cache"), tmp_path / "run")
    short.train()
    state = short.model_dir / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    state.write_bytes(bytes(data))
    checksums._hashed.clear()
    longer = Pipeline(make_config([*TINY_DCGAN, "model.training.steps=30"], tmp_path / "cache"), tmp_path / "run")
    with pytest.raises(CorruptStoreError, match=rf"checkpoint in {short.model_dir} is damaged: trainer_state.pt"):
        longer.train()
    shutil.rmtree(short.model_dir)
    longer = Pipeline(make_config([*TINY_DCGAN, "model.training.steps=30"], tmp_path / "cache"), tmp_path / "run")
    assert longer.train() == longer.model_dir and (longer.model_dir / "generator.safetensors").is_file()


def test_a_bad_synthetic_file_is_named_by_the_synthetic_keys_the_user_set(tmp_path):
    """The data loader's messages named data.* keys, which a user auditing a synthetic file never set."""
    from mia_gen.errors import MiaGenError, MissingAssetError

    np.save(tmp_path / "wide.npy", (np.random.default_rng(0).random((20, 1, 8, 8)) * 255).astype(np.float32))
    cases = ((tmp_path / "wide.npy", MiaGenError, "synthetic.value_range"),
             (tmp_path / "missing.npy", MissingAssetError, "synthetic.path"))
    for path, error, key in cases:
        pipe = Pipeline(make_config([*FAST, f"synthetic.path={path}"], tmp_path / "cache"), tmp_path / "run")
        with pytest.raises(error, match=rf"synthetic dataset .*{key}") as caught:
            pipe.synthetic_records
        assert "data.path" not in str(caught.value) and "data.value_range" not in str(caught.value)
