"""Training-time defenses (models/defense.py) as the GAN and DDPM trainers apply them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mia_gen.errors import MiaGenError
from models.ddpm_trainer import train_ddpm
from models.defense import Defense
from models.gan_trainer import train_gan
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
])
def test_bad_defense_settings_say_what_is_allowed(cfg, message):
    with pytest.raises(MiaGenError, match=message):
        Defense.from_config(cfg)


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
