"""Federated training (FedAvg on Flower) as the `federated` defense."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mia_gen.models.federated as federated
from mia_gen.errors import MiaGenError
from mia_gen.models.factory import load_generator, train_model
from test_ddpm_trainer import tiny_model_cfg
from test_pipeline import TINY_DCGAN, make_config

pytestmark = pytest.mark.usefixtures("single_thread")


def gan_config(tmp_path, *overrides):
    return make_config(TINY_DCGAN + ["model.training.steps=6", "model.training.checkpoint_every=2", *overrides],
                       tmp_path / "unused")


def members(n=16):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def train(cfg, out, data, defense=None):
    torch.manual_seed(0)
    train_model(cfg.model, data, out, torch.device("cpu"), progress=False, defense_cfg=defense)


def weights(directory):
    return {f"{p.relative_to(directory)}::{k}": v for p in sorted(directory.glob("*.safetensors"))
            if p.name != "global.safetensors" for k, v in load_file(str(p)).items()} | {
        f"{p.relative_to(directory)}::{k}": v for p in sorted(directory.glob("unet*/*.safetensors"))
        for k, v in load_file(str(p)).items()}


def assert_close_weights(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize("family", ["gan", "ddpm"])
def test_one_client_equals_pooled_training(tmp_path, family):
    one_client = {"name": "federated", "clients": 1, "rounds": 3}
    if family == "gan":
        cfg = gan_config(tmp_path)
        train(cfg, tmp_path / "pooled", members())
        train(cfg, tmp_path / "federated", members(), one_client)
    else:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({"model": tiny_model_cfg(hflip=False)})
        train(cfg, tmp_path / "pooled", members())
        train(cfg, tmp_path / "federated", members(), one_client)
    assert_close_weights(weights(tmp_path / "federated"), weights(tmp_path / "pooled"))
    state = json.loads((tmp_path / "federated" / "federated.json").read_text())
    assert state["complete"] and state["rounds_done"] == 3 and state["client_sizes"] == [16]


def test_clients_share_nothing_and_the_global_model_is_their_weighted_average(tmp_path):
    shares = federated.client_shares(10, 3, seed=0)
    assert sorted(np.concatenate(shares).tolist()) == list(range(10)) and [len(s) for s in shares] == [4, 3, 3]
    cfg = gan_config(tmp_path)
    train(cfg, tmp_path / "fed", members(10), {"name": "federated", "clients": 3, "rounds": 2})
    client_weights = [weights(tmp_path / "fed" / "clients" / str(k)) for k in range(3)]
    expected = {key: sum(w[key].double() * n for w, n in zip(client_weights, (4, 3, 3))) / 10
                for key in client_weights[0]}
    assert_close_weights(weights(tmp_path / "fed"), expected)
    generator = load_generator(cfg.model, tmp_path / "fed", torch.device("cpu"))
    assert generator(torch.zeros(2, generator.latent_dim)).shape == (2, 1, 16, 16)


def test_a_crash_mid_round_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = gan_config(tmp_path)
    defense = {"name": "federated", "clients": 2, "rounds": 3}
    train(cfg, tmp_path / "straight", members(), defense)
    real_fit = federated.MemberClient.fit
    calls = []

    def crashing_fit(self, parameters, config):
        calls.append(config["round"])
        if config["round"] == 2 and len(calls) == 4:  # the second client of round 2
            raise RuntimeError("killed")
        return real_fit(self, parameters, config)

    monkeypatch.setattr(federated.MemberClient, "fit", crashing_fit)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, tmp_path / "crashed", members(), defense)
    assert json.loads((tmp_path / "crashed" / "federated.json").read_text())["rounds_done"] == 1
    monkeypatch.setattr(federated.MemberClient, "fit", real_fit)
    train(cfg, tmp_path / "crashed", members(), defense)
    assert_close_weights(weights(tmp_path / "crashed"), weights(tmp_path / "straight"))


def test_bad_federated_settings_are_explained(tmp_path):
    cfg = gan_config(tmp_path)
    with pytest.raises(MiaGenError, match="multiple of rounds=4"):
        train(cfg, tmp_path / "a", members(), {"name": "federated", "clients": 2, "rounds": 4})
    with pytest.raises(MiaGenError, match="at least 20 members"):
        train(cfg, tmp_path / "b", members(), {"name": "federated", "clients": 20, "rounds": 2})
    with pytest.raises(MiaGenError, match="positive integer"):
        train(cfg, tmp_path / "c", members(), {"name": "federated", "clients": 0, "rounds": 2})
