"""Training-time defenses (models/defense.py) as the GAN and DDPM trainers apply them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mia_gen.errors import MiaGenError
from mia_gen.models.ddpm_trainer import train_ddpm
from mia_gen.models.defense import Defense
from mia_gen.models.gan_trainer import train_gan
from test_ddpm_trainer import tiny_model_cfg
from test_ddpm_trainer import tiny_members as ddpm_members
from test_gan_trainer import assert_same_weights, tiny_cfg, tiny_members, tiny_models

pytestmark = pytest.mark.usefixtures("single_thread")

AUGMENT = Defense.from_config({"name": "augmentation", "hflip": True, "crop_padding": 2,
                               "randaugment_ops": 2, "randaugment_magnitude": 0.5})
DECAY = Defense.from_config({"name": "weight_decay", "weight_decay": 0.5})


@pytest.mark.parametrize("cfg, message", [
    ({"name": "dp"}, "not one this trainer applies"),
    ({"name": "weight_decay", "weight_decay": -1}, "weight_decay must be a number >= 0"),
    ({"name": "weight_decay", "hflip": True}, "no setting"),
    ({"name": "augmentation", "crop_padding": 1.5}, "crop_padding must be an integer"),
    ({"name": "augmentation", "randaugment_ops": 4}, "at most 3"),
    ({"name": "augmentation", "randaugment_magnitude": 2}, r"in \[0, 1\]"),
    ({"name": "early_stopping", "steps": None, "fraction": None}, "needs steps"),
    ({"name": "early_stopping", "fraction": 1.5}, r"in \(0, 1\]"),
    ({"name": "early_stopping", "steps": 0}, "positive integer"),
])
def test_bad_defense_settings_say_what_is_allowed(cfg, message):
    with pytest.raises(MiaGenError, match=message):
        Defense.from_config(cfg)


def test_early_stopping_trains_the_undefended_model_for_fewer_steps():
    from omegaconf import OmegaConf

    from mia_gen.models.defense import effective_training

    model = OmegaConf.create({"name": "dcgan", "training": {"steps": 2000, "lr_g": 2e-4}})
    for defense, steps in (({"name": "early_stopping", "fraction": 0.25}, 500),
                           ({"name": "early_stopping", "fraction": 0.25, "steps": 300}, 300)):  # steps wins
        trained, trained_defense = effective_training(model, defense)
        assert trained.training.steps == steps and trained.training.lr_g == 2e-4
        assert Defense.from_config(trained_defense).name == "none" and model.training.steps == 2000
    assert effective_training(model, {"name": "weight_decay", "weight_decay": 0.1})[0] is model
    with pytest.raises(MiaGenError, match="beyond model.training.steps"):
        effective_training(model, {"name": "early_stopping", "steps": 2001})


@pytest.mark.parametrize("cfg, label", [
    ({"name": "none"}, ""),
    ({"name": "weight_decay", "weight_decay": 0.001}, "λ=0.001"),
    ({"name": "augmentation", "hflip": True, "crop_padding": 2, "randaugment_ops": 2, "randaugment_magnitude": 0.5},
     "flip+crop2+RA2x0.5"),
    ({"name": "augmentation", "crop_padding": 2, "augment_fakes": True}, "crop2 (real and fake)"),
    ({"name": "dp_sgd", "target_epsilon": 10.0}, "target ε=10, C=1"),
    ({"name": "dp_sgd", "target_epsilon": None, "noise_multiplier": 1.5}, "σ=1.5, C=1"),
    ({"name": "federated", "clients": 4, "rounds": 10}, "K=4, 10 rounds"),
    ({"name": "early_stopping", "steps": 500}, "500 steps"),
])
def test_each_defense_names_its_strength_for_the_tables(cfg, label):
    assert Defense.from_config(cfg).strength == label


def test_no_defense_leaves_the_batch_and_the_random_stream_alone():
    x, rng = torch.rand(4, 1, 8, 8), torch.Generator().manual_seed(0)
    state = rng.get_state()
    assert Defense.from_config({"name": "none"}).augment(x, rng) is x
    assert torch.equal(rng.get_state(), state)
    assert Defense.from_config(None).name == "none"


def test_crops_are_windows_of_the_reflect_padded_image_and_flips_mirror_it():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    cropped = Defense(name="augmentation", crop_padding=2).augment(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(16):  # each output is one of the 25 windows of its own padded image
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows), i
    flipped = Defense(name="augmentation", hflip=True).augment(x, torch.Generator().manual_seed(2))
    same = [torch.equal(flipped[i], x[i]) for i in range(16)]
    assert all(s or torch.equal(flipped[i], x[i].flip(-1)) for i, s in enumerate(same)) and 0 < sum(same) < 16


def test_augmentation_keeps_shape_and_range_and_is_seeded():
    x = torch.rand(32, 1, 16, 16) * 2 - 1
    a = AUGMENT.augment(x, torch.Generator().manual_seed(3))
    b = AUGMENT.augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b) and not torch.equal(a, x)
    zero = Defense(name="augmentation", randaugment_ops=3, randaugment_magnitude=0.0)
    assert torch.allclose(zero.augment(x, torch.Generator().manual_seed(3)), x, atol=1e-6)


def test_gan_augmentation_of_the_fakes_is_differentiable_and_reaches_both_steps(tmp_path, monkeypatch):
    x = (torch.rand(8, 1, 16, 16) * 2 - 1).requires_grad_(True)
    AUGMENT.augment(x, torch.Generator().manual_seed(4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator learns through the transforms

    seen = []
    original = Defense.augment

    def spy(self, batch, rng):
        seen.append(batch.requires_grad)
        return original(self, batch, rng)

    monkeypatch.setattr(Defense, "augment", spy)
    for fakes in (False, True):
        seen.clear()
        g, d = tiny_models()
        defense = Defense(name="augmentation", crop_padding=2, augment_fakes=fakes)
        train_gan(g, d, tiny_members(), tiny_cfg(steps=3), tmp_path / str(fakes), "cpu", progress=False, defense=defense)
        # per step: the real batch; with augment_fakes also D's fake batch and G's fake batch (with gradients)
        assert seen == ([False] * 3 if not fakes else [False, False, True] * 3)


def test_weight_decay_uses_adamw_and_shrinks_the_weights(tmp_path):
    norms = {}
    for name, defense in (("none", None), ("decay", DECAY)):
        g, d = tiny_models()
        train_gan(g, d, tiny_members(), tiny_cfg(steps=20, lr_g=1e-2, lr_d=1e-2), tmp_path / name, "cpu",
                  progress=False, defense=defense)
        norms[name] = sum(p.norm() ** 2 for p in g.parameters()) + sum(p.norm() ** 2 for p in d.parameters())
    assert norms["decay"] < 0.9 * norms["none"], norms
    optimizer = DECAY.optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.5, 0.999))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.5
    with pytest.raises(MiaGenError, match="keep one"):
        DECAY.optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.5, 0.999), weight_decay=0.1)


@pytest.mark.parametrize("trainer", ["gan", "ddpm"])
def test_a_defended_run_resumes_bit_identically_and_refuses_another_defense(tmp_path, trainer):
    def run(out, stop_after=None, defense=AUGMENT, init_seed=0):
        if trainer == "gan":
            g, d = tiny_models(init_seed=init_seed)
            return train_gan(g, d, tiny_members(), tiny_cfg(), out, "cpu", progress=False, stop_after=stop_after,
                             defense=defense)
        return train_ddpm(tiny_model_cfg(), ddpm_members(), out, "cpu", progress=False, stop_after=stop_after,
                          defense=defense)

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after=3)
    resumed = run(tmp_path / "resumed", init_seed=1)
    assert_same_weights(resumed, straight)
    undefended = run(tmp_path / "undefended", defense=None)
    assert not all(torch.equal(a, b) for a, b in zip(undefended.state_dict().values(), straight.state_dict().values()))
    run(tmp_path / "partial", stop_after=3)
    with pytest.raises(MiaGenError, match="other training settings|another model or other training settings"):
        run(tmp_path / "partial", defense=DECAY)
    state = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())
    assert state["complete"] is True


DP_TARGET = Defense.from_config({"name": "dp_sgd", "target_epsilon": 5.0, "noise_multiplier": None})
DP_SIGMA = Defense.from_config({"name": "dp_sgd", "target_epsilon": None, "noise_multiplier": 1.1, "delta": 1e-3,
                                "max_grad_norm": 0.5})


def private_gan_models(init_seed=0):
    from mia_gen.models.dcgan import DCGANDiscriminatorGroupNorm, DCGANGenerator

    torch.manual_seed(init_seed)
    return DCGANGenerator(latent_dim=4, resolution=16, channels=1, base_channels=2), DCGANDiscriminatorGroupNorm(16, 1, 2)


def opacus_epsilon(sigma, sample_rate, steps, delta):
    """The accountant stepped once per private step, as Opacus' PrivacyEngine does."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("trainer", ["gan", "ddpm"])
def test_the_epsilon_reported_is_opacus_accountants_for_the_same_settings(tmp_path, trainer):
    for name, defense in (("sigma", DP_SIGMA), ("target", DP_TARGET)):
        out = tmp_path / name
        if trainer == "gan":
            g, d = private_gan_models()
            train_gan(g, d, tiny_members(), tiny_cfg(steps=6), out, "cpu", progress=False, defense=defense)
        else:
            train_ddpm(tiny_model_cfg(), ddpm_members(), out, "cpu", progress=False, defense=defense)
        report = json.loads((out / "privacy.json").read_text())
        assert report["sample_rate"] == 4 / 10 and report["private_steps"] == 6
        assert report["delta"] == (1e-3 if name == "sigma" else 1 / (10 * 10))
        expected = opacus_epsilon(report["noise_multiplier"], 0.4, 6, report["delta"])
        assert report["epsilon"] == pytest.approx(expected, rel=1e-9)
        if name == "sigma":
            assert report["noise_multiplier"] == 1.1 and report["max_grad_norm"] == 0.5
        else:  # the noise was solved so that the whole run spends (just under) the target
            assert 4.5 <= report["epsilon"] <= 5.0


@pytest.mark.parametrize("trainer", ["gan", "ddpm"])
def test_a_private_run_resumes_bit_identically(tmp_path, trainer):
    def run(out, stop_after=None, init_seed=0):
        if trainer == "gan":
            g, d = private_gan_models(init_seed)
            return train_gan(g, d, tiny_members(), tiny_cfg(), out, "cpu", progress=False, stop_after=stop_after,
                             defense=DP_SIGMA)
        return train_ddpm(tiny_model_cfg(), ddpm_members(), out, "cpu", progress=False, stop_after=stop_after,
                          defense=DP_SIGMA)

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after=3)
    assert json.loads((tmp_path / "resumed" / "privacy.json").read_text())["private_steps"] == 3
    assert_same_weights(run(tmp_path / "resumed", init_seed=1), straight)


def test_layers_without_per_sample_gradients_fail_with_opacus_explanation(tmp_path):
    g, d = tiny_models()  # the DCGAN discriminator has BatchNorm
    with pytest.raises(MiaGenError, match="(?s)Opacus says: BatchNorm.*DCGANDiscriminatorGroupNorm"):
        train_gan(g, d, tiny_members(), tiny_cfg(), tmp_path / "bn", "cpu", progress=False, defense=DP_SIGMA)
    g, d = tiny_models("wgan_gp")
    with pytest.raises(MiaGenError, match="loss=dcgan"):
        train_gan(g, d, tiny_members(), tiny_cfg("wgan_gp"), tmp_path / "gp", "cpu", progress=False, defense=DP_SIGMA)


@pytest.mark.parametrize("cfg, message", [
    ({"name": "dp_sgd", "target_epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one of"),
    ({"name": "dp_sgd", "target_epsilon": None, "noise_multiplier": None}, "exactly one of"),
    ({"name": "dp_sgd", "target_epsilon": -1.0}, "positive number"),
    ({"name": "dp_sgd", "target_epsilon": 1.0, "accountant": "moments"}, "accountant"),
    ({"name": "dp_sgd", "target_epsilon": 1.0, "delta": 2.0}, r"\(0, 1\)"),
])
def test_bad_dp_settings_are_explained(cfg, message):
    with pytest.raises(MiaGenError, match=message):
        Defense.from_config(cfg)


def test_a_delta_that_allows_publishing_a_record_is_refused(tmp_path):
    g, d = private_gan_models()
    defense = Defense.from_config({"name": "dp_sgd", "target_epsilon": 1.0, "delta": 0.5})
    with pytest.raises(MiaGenError, match="not below 1/N"):
        train_gan(g, d, tiny_members(), tiny_cfg(), tmp_path, "cpu", progress=False, defense=defense)
