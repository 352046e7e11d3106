"""GAN trainer: checkpoints, bit-identical resume, and the errors a user can hit."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import crash_on_checkpoint_move
from mia_gen.errors import MiaGenError
from mia_gen.models import gan_trainer
from mia_gen.models.checkpoint import load_module
from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator
from mia_gen.models.gan_trainer import MemberBatches, train_gan
from mia_gen.models.wgan_gp import WGANGPCritic, WGANGPGenerator


pytestmark = pytest.mark.usefixtures("single_thread")


ARCHS = {"dcgan": (DCGANGenerator, DCGANDiscriminator), "wgan_gp": (WGANGPGenerator, WGANGPCritic)}


def tiny_cfg(loss="dcgan", **overrides):
    cfg = dict(
        loss=loss, steps=6, batch_size=4, lr_g=1e-3, lr_d=1e-3, betas=[0.5, 0.999],
        n_critic=2 if loss == "wgan_gp" else 1, gp_weight=10.0, checkpoint_every=2, sample_every=3, seed=3,
    )
    return {**cfg, **overrides}


def tiny_models(loss="dcgan", init_seed=0, channels=1):
    torch.manual_seed(init_seed)
    gen_cls, disc_cls = ARCHS[loss]
    return gen_cls(latent_dim=4, resolution=16, channels=channels, base_channels=2), disc_cls(16, channels, 2)


def tiny_members(n=10, channels=1):
    return torch.rand(n, channels, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def straight_run(out_dir, loss="dcgan", **cfg):
    g, d = tiny_models(loss)
    return train_gan(g, d, tiny_members(), tiny_cfg(loss, **cfg), out_dir, "cpu", progress=False), d


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("loss", ["dcgan", "wgan_gp"])
def test_resume_after_interruption_is_bit_identical(tmp_path, loss):
    g_ref, d_ref = straight_run(tmp_path / "straight", loss)
    out = tmp_path / "resumed"
    g, d = tiny_models(loss)
    train_gan(g, d, tiny_members(), tiny_cfg(loss), out, "cpu", progress=False, stop_after=3)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    assert json.loads((out / "trainer_state.json").read_text())["complete"] is False
    g, d = tiny_models(loss, init_seed=1)  # other initial weights: the checkpoint must replace them
    g = train_gan(g, d, tiny_members(), tiny_cfg(loss), out, "cpu", progress=False)
    assert_same_weights(g, g_ref)
    assert_same_weights(d, d_ref)
    ref_state = torch.load(tmp_path / "straight" / "trainer_state.pt", weights_only=True)
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    for name in ("optimizer_generator", "optimizer_discriminator"):
        for key, values in ref_state[name]["state"].items():
            for field, tensor in values.items():
                assert torch.equal(tensor, state[name]["state"][key][field])


def test_crash_between_checkpoints_resumes_from_the_last_one(tmp_path, monkeypatch):
    g_ref, _ = straight_run(tmp_path / "straight")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gan_trainer, "_save_grid", crash)  # first grid at step 3, after the step-2 checkpoint
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        straight_run(out)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.undo()
    g, _ = straight_run(out)
    assert_same_weights(g, g_ref)


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    g_ref, _ = straight_run(tmp_path / "straight", steps=6)
    straight_run(tmp_path / "extended", steps=3)
    assert json.loads((tmp_path / "extended" / "trainer_state.json").read_text())["complete"] is True
    g, d = tiny_models()
    cfg = OmegaConf.create(tiny_cfg(steps=6))  # as the pipeline passes it
    g = train_gan(g, d, tiny_members(), cfg, tmp_path / "extended", "cpu", progress=False)
    assert_same_weights(g, g_ref)


def test_finished_run_is_loaded_without_training(tmp_path):
    g_ref, _ = straight_run(tmp_path)
    stamp = (tmp_path / "trainer_state.json").stat().st_mtime_ns
    time.sleep(0.01)
    g, d = tiny_models(init_seed=5)
    calls = []
    d.register_forward_hook(lambda *args: calls.append(1))
    out = train_gan(g, d, tiny_members(), tiny_cfg(), tmp_path, "cpu", progress=False)
    assert out is g and not out.training
    assert_same_weights(out, g_ref)
    assert calls == [] and (tmp_path / "trainer_state.json").stat().st_mtime_ns == stamp


def test_checkpoint_files_and_modes(tmp_path):
    g, d = tiny_models()
    modes = []
    g.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    out = train_gan(g, d, tiny_members(), tiny_cfg(sample_every=3), tmp_path, "cpu", progress=False)
    assert not out.training and True in modes  # train() while training (eval() only for sample grids)
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 6
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6
    assert_same_weights(load_module(tmp_path, "generator"), out)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    g_ref, _ = straight_run(tmp_path / "straight")
    real_save, calls = gan_trainer.save_module, []

    def crashing_save(module, directory, name):
        calls.append(name)
        if len(calls) == 4:  # second checkpoint, after its generator was written
            raise KeyboardInterrupt
        return real_save(module, directory, name)

    monkeypatch.setattr(gan_trainer, "save_module", crashing_save)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        straight_run(out)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2  # the step-4 one never landed
    monkeypatch.setattr(gan_trainer, "save_module", real_save)
    g, _ = straight_run(out)  # resumes at step 2, not from the half-written checkpoint
    assert_same_weights(g, g_ref)
    assert not (out / ".checkpoint-next").exists()


def test_crash_while_moving_a_checkpoint_in_is_finished_by_the_next_run(tmp_path, monkeypatch):
    g_ref, _ = straight_run(tmp_path / "straight")
    crash_on_checkpoint_move(monkeypatch, 9)  # second checkpoint (6 moves each): its discriminator has moved in
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        straight_run(out)
    monkeypatch.undo()
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2  # beside the step-4 discriminator
    assert json.loads((out / ".checkpoint-next" / "trainer_state.json").read_text())["step"] == 4
    g, _ = straight_run(out)
    assert_same_weights(g, g_ref)


def finished_then_stopped(out):
    """A run stopped at step 3 of 6: its next call resumes (weights and trainer state are read)."""
    g, d = tiny_models()
    train_gan(g, d, tiny_members(), tiny_cfg(), out, "cpu", progress=False, stop_after=3)
    return out


@pytest.mark.parametrize("name, damage", [
    ("trainer_state.pt", lambda data: data[: len(data) // 2]),  # truncated
    ("generator.safetensors", lambda data: data[:-1] + bytes([data[-1] ^ 1])),  # same size, one bit flipped
    ("discriminator.json", lambda data: data.replace(b"{", b"[", 1)),  # garbled
], ids=["truncated-state", "flipped-weights", "garbled-config"])
def test_a_damaged_checkpoint_is_an_error_naming_the_directory_to_delete(tmp_path, name, damage):
    from mia_gen.errors import CorruptStoreError

    out = finished_then_stopped(tmp_path / "run")
    (out / name).write_bytes(damage((out / name).read_bytes()))
    with pytest.raises(CorruptStoreError, match=f"damaged: {name} .*Delete {out} and train again"):
        straight_run(out)


def test_a_damaged_state_without_recorded_checksums_is_an_error_too(tmp_path):
    """Checkpoints written before sizes and sha256 were recorded: the loaders refuse unreadable files."""
    from mia_gen.errors import CorruptStoreError

    out = finished_then_stopped(tmp_path / "run")
    summary = json.loads((out / "trainer_state.json").read_text())
    del summary["files"]
    (out / "trainer_state.json").write_text(json.dumps(summary))
    (out / "trainer_state.pt").write_bytes((out / "trainer_state.pt").read_bytes()[:1000])
    with pytest.raises(CorruptStoreError, match=f"trainer_state.pt cannot be read .*Delete {out} and train again"):
        straight_run(out)
    (out / "trainer_state.json").write_text('{"step": 3, "comp')
    with pytest.raises(CorruptStoreError, match=f"trainer_state.json is not valid JSON .*Delete {out}"):
        straight_run(out)


def test_member_batches_cover_each_epoch_once():
    batches = MemberBatches(n_members=10, batch_size=4, seed=0)
    drawn = torch.cat([batches.next_indices() for _ in range(5)]).tolist()  # 20 indices = 2 epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    state = batches.state_dict()
    following = batches.next_indices()
    other = MemberBatches(n_members=10, batch_size=4, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.next_indices(), following)


def test_mismatched_members_say_what_to_change(tmp_path):
    g, d = tiny_models()
    with pytest.raises(MiaGenError, match="data.channels=1"):
        train_gan(g, d, tiny_members(channels=3), tiny_cfg(), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match="data.resolution=16"):
        train_gan(g, d, torch.zeros(4, 1, 32, 32), tiny_cfg(), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match=r"\[-1, 1\]"):
        train_gan(g, d, tiny_members() * 127.5 + 127.5, tiny_cfg(), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match="same data.channels"):
        train_gan(g, tiny_models(channels=3)[1], tiny_members(), tiny_cfg(), tmp_path, "cpu", progress=False)
    assert not (tmp_path / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss": "hinge"}, "use one of"),
        ({"betas": [0.5]}, "two numbers"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"n_critics": 5}, "unknown keys"),
        ({"lr_g": "2e-4"}, "lr_g must be a positive number"),
    ],
)
def test_bad_training_config(tmp_path, overrides, message):
    g, d = tiny_models()
    with pytest.raises(MiaGenError, match=message):
        train_gan(g, d, tiny_members(), tiny_cfg(**overrides), tmp_path, "cpu", progress=False)


def test_resuming_with_other_settings_or_model_is_refused(tmp_path):
    straight_run(tmp_path, steps=4)
    g, d = tiny_models()
    with pytest.raises(MiaGenError, match="other training settings"):
        train_gan(g, d, tiny_members(), tiny_cfg(steps=6, lr_g=0.1), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match="training.steps>=4"):
        train_gan(g, d, tiny_members(), tiny_cfg(steps=2), tmp_path, "cpu", progress=False)
    wider = DCGANGenerator(latent_dim=4, resolution=16, channels=1, base_channels=3)
    with pytest.raises(MiaGenError, match="fresh output directory"):
        train_gan(wider, d, tiny_members(), tiny_cfg(steps=6), tmp_path, "cpu", progress=False)


def digits_16px():
    """sklearn's 8x8 digits scaled to [-1, 1] and resized bilinearly to 16x16, `(1797, 1, 16, 16)`."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.mark.slow
def test_default_dcgan_memorises_64_digits(tmp_path):
    """The quick-start's signal: 1-NN L2 over 20k samples separates 64 members from 64 held-out digits."""
    from sklearn.metrics import roc_auc_score

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / "dcgan.yaml")
    cfg = OmegaConf.merge({"data": {"resolution": 16, "channels": 1}, "seed": 0}, {"model": cfg}).model
    x = digits_16px()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    members, held_out = x[order[:64]], x[order[64:128]]
    torch.manual_seed(0)
    g, d = instantiate(cfg.generator), instantiate(cfg.discriminator)
    g = train_gan(g, d, members, cfg.training, tmp_path, "cpu", progress=False)
    with torch.no_grad():
        rng = torch.Generator().manual_seed(99)
        samples = torch.cat([g(g.sample_latent(2000, rng)) for _ in range(10)]).flatten(1)
    distances = torch.cdist(torch.cat([members, held_out]).flatten(1), samples).min(1).values.numpy()
    auc = roc_auc_score(np.r_[np.ones(64), np.zeros(64)], -distances)
    assert auc > 0.7
