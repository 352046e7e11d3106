"""Real signal from real GANs (slow: each trains a DCGAN for ~2-3 minutes on the CPU).

The quick-start's DCGAN memorises its 64 digit members and the full black-box attack must find
that; the same DCGAN trained on other digits must not accuse anybody.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.device import resolve_device
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.sample_store import write_samples
from mia_gen.models.factory import load_generator, train_model

pytestmark = pytest.mark.slow


def quickstart_config(cache_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["logger=none", "progress=false", "device=cpu",
                                            f"cache_dir={cache_dir}", *overrides])


def test_quickstart_dcgan_leaks_its_members(tmp_path):
    cfg = quickstart_config(tmp_path / "cache", "attack=[sample_distance,monte_carlo,domias]")
    results = {r["attack"]: r for r in Pipeline(cfg, tmp_path / "run").run()}
    assert results["sample_distance"]["auc"] >= 0.70
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["metadata"]["samples"]["n_samples"] == 20000


def test_dcgan_trained_on_other_records_does_not_accuse_anybody(tmp_path):
    """Train the quick-start DCGAN on records disjoint from everyone it is asked about."""
    cfg = quickstart_config(tmp_path / "cache", "split.n_members=200", "split.n_non_members=200",
                            "split.n_reference=0")
    pipeline = Pipeline(cfg, tmp_path / "run")
    split, records = pipeline.split, pipeline.records
    outsiders = np.setdiff1d(np.arange(len(records)), np.concatenate([split.members, split.non_members]))
    training_set = np.random.default_rng(0).permutation(outsiders)[:64]
    device = resolve_device("cpu")
    train_model(cfg.model, records.get(training_set), tmp_path / "model", device, progress=False)
    generator = load_generator(cfg.model, tmp_path / "model", device)

    @torch.no_grad()
    def sample_fn(n, rng):
        z = generator.sample_latent(n, rng)
        return generator(z), z

    store = write_samples(tmp_path / "samples", sample_fn, 20000, progress=False)
    ids = np.sort(np.concatenate([split.members, split.non_members]))
    context = AttackContext(queries=records.get(ids), record_ids=ids, samples=store)
    labels = np.isin(ids, split.members).astype(int)
    auc = roc_auc_score(labels, build_attack("sample_distance")(context).scores)
    assert 0.40 <= auc <= 0.60


def test_dp_sgd_at_epsilon_10_brings_every_attack_to_chance_on_the_benchmark_dcgan(tmp_path):
    """The defense benchmark's DP row (README): the same DCGAN, DP-SGD on its discriminator at a
    target epsilon of 10, attacked from the samples and through the discriminator."""
    cfg = quickstart_config(tmp_path / "cache", "experiment=defense_benchmark", "model=dcgan", "defense=dp_sgd",
                            "attack=[sample_distance,monte_carlo,domias,logan]", "utility.metric=none")
    results = {r["attack"]: r for r in Pipeline(cfg, tmp_path / "run").run()}
    privacy = json.loads((tmp_path / "run" / "results.json").read_text())["metadata"]["privacy"]
    assert 9.0 <= privacy["epsilon"] <= 10.0
    assert all(r["auc"] <= 0.60 for r in results.values()), {a: r["auc"] for a, r in results.items()}
