"""The shadow zoo in the pipeline: drawn on the split, trained as the target, built as a multirun that
resumes, read when incomplete, and handed to LiRA / RMIA as the IN/OUT matrix says."""

from __future__ import annotations

import json
import shutil
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

import mia_gen.experiments.pipeline as pipeline_module
from mia_gen.attacks.base import build_attack
from mia_gen.attacks.shadow_stats import lira_online, rmia
from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.experiments.pipeline import Pipeline

ZOO = [
    "logger=none", "progress=false", "device=cpu", "model=memorizer",
    "split.n_members=24", "split.n_non_members=24", "split.n_reference=40",
    "sampling.n_samples=400", "sampling.shard_size=400", "evaluation.n_bootstrap=50",
    "utility.metric=none", "evaluation.blind_baseline=false", "zoo.n_shadows=4",
]
LIRA = ["attack=[sample_distance,lira]", "attack.lira.attack=sample_distance"]


def make_config(overrides, cache_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache_dir}"])


def trained_records(model_dir: Path) -> torch.Tensor:
    """The records a memorizer was trained on, read from its weights (not from the zoo's matrix)."""
    return load_file(str(model_dir / "generator.safetensors"))["records"]


def test_the_zoo_is_drawn_on_the_split_and_each_shadow_trains_on_its_half(tmp_path):
    pipe = Pipeline(make_config(ZOO + LIRA, tmp_path / "cache"), tmp_path / "run")
    zoo = pipe.zoo
    assert zoo.n_shadows == 4 and np.array_equal(np.sort(zoo.record_ids), pipe.query_ids)
    assert (zoo.membership.sum(axis=0) == 2).all()  # every evaluated record IN for exactly K/2 shadows
    assert len(list((tmp_path / "cache" / "zoos").glob("zoo-*.json"))) == 1
    assert Pipeline(make_config(ZOO + LIRA, tmp_path / "cache"), tmp_path / "run2").zoo == zoo  # same file
    for k in range(4):
        shadow = pipe.shadow_pipeline(k)
        shadow.train()
        stored = trained_records(shadow.model_dir)
        expected = pipe.records.get(np.sort(zoo.training_records(k)))
        assert torch.equal(stored, expected)  # the records of its half, nothing else
        assert shadow.model_dir.name.startswith("shadow-memorizer-")
    with pytest.raises(MiaGenError, match=r"zoo.index=7 is not a shadow"):
        pipe.shadow_pipeline(7)


def test_a_run_reads_its_zoo_file_once_however_many_shadows_it_fits(tmp_path, monkeypatch):
    overrides = ZOO + ["attack=[sample_distance,lira,rmia]", "attack.lira.attack=sample_distance",
                       "attack.rmia.attack=sample_distance"]
    Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run").run()  # draws and keeps the zoo file
    loads = []
    real_load = pipeline_module.ZooMembership.load
    monkeypatch.setattr(pipeline_module.ZooMembership, "load",
                        staticmethod(lambda *a, **k: loads.append(a) or real_load(*a, **k)))
    monkeypatch.setattr(pipeline_module, "draw_zoo", lambda *a, **k: pytest.fail("the zoo was drawn again"))
    rerun = Pipeline(make_config(overrides + ["attack.rmia.temperature=2.0"], tmp_path / "cache"), tmp_path / "run2")
    rerun.run()  # rescoring RMIA: every shadow's population view, the zoo read once
    assert len(loads) == 1


def test_a_zoo_multirun_killed_midway_trains_only_the_missing_shadows(tmp_path, monkeypatch):
    calls, real_train = [], pipeline_module.train_model

    def dying_train(model_cfg, members, out_dir, *args, **kwargs):
        calls.append(Path(out_dir).name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while training its shadow
        return real_train(model_cfg, members, out_dir, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "train_model", dying_train)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        for k in range(4):  # what `mia-gen-train -m ... zoo.index='range(0,4)'` runs, one job after another
            Pipeline(make_config(ZOO + LIRA + [f"zoo.index={k}"], cache), tmp_path / f"job{k}").run("train")
    first = list(calls)
    calls.clear()
    for k in range(4):
        Pipeline(make_config(ZOO + LIRA + [f"zoo.index={k}"], cache), tmp_path / f"again{k}").run("train")
    assert calls == first[2:] + [calls[-1]] and len(calls) == 2  # shadows 2 and 3 only
    pipe = Pipeline(make_config(ZOO + LIRA, cache), tmp_path / "run")
    assert pipe.trained_shadows() == [0, 1, 2, 3]


def test_zoo_index_is_a_train_job_only(tmp_path):
    pipe = Pipeline(make_config(ZOO + LIRA + ["zoo.index=1"], tmp_path / "cache"), tmp_path / "run")
    with pytest.raises(MiaGenError, match="mia-gen-train"):
        pipe.run("evaluate")


def test_lira_and_rmia_through_the_pipeline_equal_their_formulas_on_each_shadows_statistic(tmp_path):
    overrides = ZOO + ["attack=[sample_distance,lira,rmia]", "attack.lira.attack=sample_distance",
                       "attack.rmia.attack=sample_distance"]
    pipe = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    results = {r["attack"]: r for r in pipe.run()}
    scored = pipe.attack(require_cached=True)
    inner = build_attack("sample_distance", {})
    # each shadow's statistic, and its IN/OUT read from the records it memorised
    stats, stats_z, membership = [], [], []
    queries = pipe.records.get(pipe.query_ids)
    for k in range(4):
        shadow = pipe.shadow_pipeline(k)
        stats.append(-inner(shadow.context_for(inner)).scores)
        stats_z.append(-inner(shadow.context_for(inner, ids=pipe.split.reference)).scores)
        stored = trained_records(shadow.model_dir)
        membership.append([(stored == q).flatten(1).all(dim=1).any().item() for q in queries])
    target = -inner(pipe.context_for(inner)).scores
    target_z = -inner(pipe.context_for(inner, ids=pipe.split.reference)).scores
    expected = lira_online(target, np.stack(stats), np.array(membership)).scores
    np.testing.assert_allclose(scored["lira"]["scores"], expected)
    # temperature=auto: an L2 distance over d = C*H*W dimensions has per-dimension scale sqrt(d)
    temperature = np.sqrt(np.prod(queries.shape[1:]))
    assert scored["rmia"]["info"]["temperature"] == pytest.approx(temperature)
    expected_rmia = rmia(target, np.stack(stats), target_z, np.stack(stats_z),
                         log_probability=lambda s: -s / temperature).scores
    np.testing.assert_allclose(scored["rmia"]["scores"], expected_rmia)
    # a memoriser leaks its members: both beat chance by a margin, and report their shadows
    for name in ("lira", "rmia"):
        assert results[name]["auc"] > 0.9
        assert scored[name]["info"]["n_shadows"] == 4 and scored[name]["info"]["n_shadows_requested"] == 4
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["metadata"]
    assert meta["zoo"]["n_shadows"] == 4 and meta["zoo"]["trained"] == [0, 1, 2, 3]


def test_shadow_attacks_on_a_model_that_never_saw_the_members_stay_near_chance(tmp_path, monkeypatch):
    # the target memorises 24 reference records instead of its members (the shadows keep their halves)
    monkeypatch.setattr(Pipeline, "training_ids", property(lambda self: self.split.reference[:24]))
    pipe = Pipeline(make_config(ZOO + LIRA, tmp_path / "cache"), tmp_path / "run")
    results = {r["attack"]: r for r in pipe.run()}
    assert torch.equal(trained_records(pipe.model_dir), pipe.records.get(pipe.split.reference[:24]))
    assert 0.3 < results["lira"]["auc"] < 0.7


def test_an_incomplete_zoo_is_used_with_a_warning_and_the_count(tmp_path, caplog):
    cache = tmp_path / "cache"
    for k in (0, 2):
        Pipeline(make_config(ZOO + LIRA + [f"zoo.index={k}"], cache), tmp_path / f"job{k}").run("train")
    overrides = ZOO + LIRA + ["zoo.train_missing=false", "attack.lira.global_variance=true"]
    pipe = Pipeline(make_config(overrides, cache), tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="mia_gen.experiments.pipeline"):
        results = {r["attack"]: r for r in pipe.run()}
    assert "INCOMPLETE: 2 of 4 shadow models are trained (missing: 1, 3)" in caplog.text
    entry = pipe.attack(require_cached=True)["lira"]
    assert entry["info"]["n_shadows"] == 2 and entry["info"]["n_shadows_requested"] == 4
    assert entry["info"]["shadow_indices"] == [0, 2]
    # records IN both trained shadows (no OUT) or neither (no IN) are reported, never scored
    in_trained = pipe.zoo.membership[[0, 2]][:, np.searchsorted(pipe.zoo.record_ids, pipe.query_ids)]
    count = in_trained.sum(axis=0)
    unscored = np.flatnonzero((count == 0) | (count == 2))
    assert unscored.size and entry["info"]["unscored"]["positions"] == unscored.tolist()
    assert entry["info"]["unscored"]["reasons"] == ["no IN shadow" if count[i] == 0 else "no OUT shadow"
                                                    for i in unscored]
    assert np.isnan(np.asarray(entry["scores"])[unscored]).all()
    assert results["lira"]["n_unscored"] == unscored.size
    # the scores of a complete zoo are another cache entry (which shadows were read is part of the key)
    for k in (1, 3):
        Pipeline(make_config(ZOO + LIRA + [f"zoo.index={k}"], cache), tmp_path / f"job{k}").run("train")
    complete = Pipeline(make_config(overrides, cache), tmp_path / "run2")
    complete.trained_shadows()
    assert complete.attack_key("lira", complete.attacks()["lira"]) != pipe.attack_key("lira", pipe.attacks()["lira"])


def test_shadows_of_a_given_checkpoint_are_refused_with_the_reason(tmp_path):
    trained = Pipeline(make_config(ZOO + ["attack=[sample_distance]"], tmp_path / "cache"), tmp_path / "run")
    model_dir = trained.train()
    cfg = make_config(ZOO + LIRA + [f"model.checkpoint={model_dir}"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match="recipe mia-gen does not know"):
        Pipeline(cfg, tmp_path / "run2").run()


def test_the_zoo_builds_as_a_hydra_multirun(tmp_path):
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mia_gen.experiments.train", "-m", *ZOO, *LIRA, "zoo.index=range(0,4)",
               f"cache_dir={cache}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    pipe = Pipeline(make_config(ZOO + LIRA, cache), tmp_path / "run")
    assert pipe.trained_shadows() == [0, 1, 2, 3]
    assert not any(p.name.startswith("memorizer-") for p in (cache / "models").iterdir())  # the target is not a zoo job


TINY_DCGAN_ZOO = [
    "logger=none", "device=cpu", "threads=1", "model=dcgan", "model.training.steps=300",
    "model.generator.base_channels=8", "model.discriminator.base_channels=8", "model.training.checkpoint_every=50",
    "model.training.sample_every=1000", "split.n_members=24", "split.n_non_members=24", "split.n_reference=40",
    "zoo.n_shadows=4", "attack=[sample_distance,lira]", "attack.lira.attack=sample_distance",
]


@pytest.mark.slow
def test_killing_the_zoo_multirun_and_rerunning_it_trains_only_the_missing_shadows(tmp_path):
    """A real `mia-gen-train -m ... zoo.index=range(0,4)` killed (SIGKILL) while shadow 2 trains: the
    rerun skips shadows 0 and 1, resumes the one that was training from its checkpoint, trains the rest."""
    import os
    import signal
    import time

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mia_gen.experiments.train", "-m", *TINY_DCGAN_ZOO, "zoo.index=range(0,4)",
               f"cache_dir={cache}", "progress=false"]
    pipe = Pipeline(make_config(TINY_DCGAN_ZOO, cache), tmp_path / "run")
    first = subprocess.Popen([*command, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    checkpoint = pipe.shadow_pipeline(2).model_dir / "trainer_state.json"
    while not checkpoint.is_file():  # shadows 0 and 1 finished, shadow 2 has its first checkpoint
        assert first.poll() is None and time.time() < deadline, "the zoo multirun ended before shadow 2 started"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert [pipe.shadow_pipeline(k).is_trained() for k in range(4)] == [True, True, False, False]
    finished = {k: pipe.shadow_pipeline(k).model_dir / "finished.json" for k in (0, 1)}
    stamps = {k: path.stat().st_mtime_ns for k, path in finished.items()}
    again = subprocess.run([*command, f"hydra.sweep.dir={tmp_path / 'sweep2'}"], cwd=tmp_path, check=True,
                           capture_output=True, text=True, timeout=900)
    log = again.stdout + again.stderr
    assert "shadow 0 of 4 is trained" in log and "shadow 1 of 4 is trained" in log
    assert "shadow 2 of 4, dcgan" in log and "shadow 3 of 4, dcgan" in log
    assert "resuming" in log.split("shadow 2 of 4, dcgan")[1].split("shadow 3 of 4")[0]  # from its checkpoint
    assert pipe.trained_shadows() == [0, 1, 2, 3]
    assert {k: path.stat().st_mtime_ns for k, path in finished.items()} == stamps  # not retrained


@pytest.mark.slow
def test_the_ddpm_shadow_preset_runs_end_to_end_at_a_tiny_scale(tmp_path):
    """experiment=shadow_ddpm_digits, shrunk: the zoo, LiRA online / offline, RMIA and GSA on one run."""
    overrides = [
        "experiment=shadow_ddpm_digits", "logger=none", "progress=false", "device=cpu", "threads=1",
        "split.n_members=16", "split.n_non_members=16", "split.n_reference=16", "zoo.n_shadows=4",
        "model.unet.block_out_channels=[8,16]", "model.unet.norm_num_groups=8", "model.training.steps=6",
        "model.training.warmup_steps=1", "model.training.checkpoint_every=6", "model.training.sample_every=100",
        "model.training.batch_size=16", "evaluation.n_bootstrap=20", "evaluation.blind_baseline=false",
        "attack.diffusion_loss.n_draws=1", "attack.lira.params={n_draws:1}", "attack.gsa.n_timesteps=2",
        "attack.gsa.n_estimators=10",
    ]
    pipe = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    results = {r["attack"]: r for r in pipe.run()}
    assert set(results) == {"diffusion_loss", "lira", "lira_offline", "rmia", "gsa"}
    for name in ("lira", "lira_offline", "rmia", "gsa"):
        assert results[name]["n_shadows"] == 4 and results[name]["n_shadows_requested"] == 4
    assert results["lira"]["base_statistic"]["attack"] == "diffusion_loss"
    assert results["lira"]["base_statistic"]["auc"] == pytest.approx(results["diffusion_loss"]["auc"])
    assert (tmp_path / "run" / "roc_shadows.png").is_file()
    assert "shadows" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("name, params, message", [
    ("lira", {"attack": "secmi_nn"}, "wrap a per-record attack"),
    ("rmia", {"attack": "co_membership"}, "wrap a per-record attack"),
    ("lira", {"mode": "both"}, "mode must be one of"),
    ("lira", {"queries": [50, 100]}, "list of parameter overrides"),
    ("rmia", {"mode": "offline"}, "needs offline_a in"),
    ("rmia", {"temperature": 0}, "temperature must be auto .* or a positive number"),
    ("lira", {"attack": "lira"}, "cannot wrap itself"),
])
def test_shadow_attack_settings_that_cannot_work_are_refused_when_built(name, params, message):
    with pytest.raises(MiaGenError, match=message):
        build_attack(name, params)


@pytest.mark.parametrize("overrides, message", [
    (["zoo.n_shadows=2.5", "attack=[rmia]"], "whole number"),
    (["zoo.n_shadows=true", "attack=[gsa]"], "whole number"),
    (["zoo.n_shadows=2", "attack=[lira]"], "at least 4 shadow models"),
    (["zoo.n_shadows=3", "attack=[lira]"], "at least 4 shadow models"),
])
def test_a_zoo_too_small_for_its_attacks_is_refused_before_any_shadow_trains(tmp_path, overrides, message):
    pipe = Pipeline(make_config([*ZOO, *overrides], tmp_path / "cache"), tmp_path / "run")
    with pytest.raises(MiaGenError, match=message):
        pipe.attack()
    assert not (tmp_path / "cache" / "models").exists()  # nothing trained: not the target, not a shadow
    fewer = Pipeline(make_config([*ZOO, "zoo.n_shadows=2", "attack=[lira]", "attack.lira.global_variance=true"],
                                 tmp_path / "cache"), tmp_path / "run")
    assert fewer.attacks()["lira"].min_shadows == 2  # one variance for all records: 2 shadows suffice


def test_a_presets_settings_for_an_attack_not_selected_do_not_run_it(tmp_path, caplog):
    """`experiment=shadow_dcgan_digits attack=[rmia]` ran LiRA too: the preset's `attack.lira.attack` setting left
    a lira entry behind. Selected attacks come from configs/attack/ with their `_target_`; such leftovers do not."""
    pipe = Pipeline(make_config([*ZOO, "experiment=shadow_dcgan_digits", "attack=[rmia]"], tmp_path / "cache"),
                    tmp_path / "run")
    assert set(pipe.cfg.attack) == {"rmia", "lira"}  # what Hydra composes
    with caplog.at_level("WARNING"):
        assert list(pipe.attacks()) == ["rmia"]
    assert "attack.lira holds settings (attack) but lira was not selected" in caplog.text


def test_a_finished_shadow_without_its_weights_names_the_folder_to_delete_and_then_retrains(tmp_path):
    """finished.json alone decided that a shadow was trained, and the suggested fix looped."""
    overrides = [*ZOO, *LIRA]
    pipe = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    pipe.attack()
    shadow = pipe.shadow_pipeline(1).model_dir
    for weights in shadow.rglob("*.safetensors"):
        weights.unlink()
    again = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    with pytest.raises(CorruptStoreError, match=rf"shadow 1 at {shadow} is marked finished .* Delete the whole folder"):
        again.attack()
    shutil.rmtree(shadow)  # the fix it names: the shadow trains again
    Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run").attack()
    assert any(shadow.rglob("*.safetensors"))
