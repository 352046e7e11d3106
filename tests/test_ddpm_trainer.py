"""DDPM trainer: loss and EMA against hand computations, checkpoints, bit-identical resume, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from omegaconf import OmegaConf

from conftest import crash_on_checkpoint_move
from mia_gen.errors import MiaGenError
from mia_gen.models import ddpm_trainer
from mia_gen.models.ddpm import build_unet, diffusion_loss
from mia_gen.models.ddpm_trainer import ema_update, learning_rate, train_ddpm
from mia_gen.models.denoiser import load_denoiser

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model_cfg(prediction_type="epsilon", **training):
    return {
        "name": "ddpm", "family": "diffusion", "checkpoint": None, "prediction_type": prediction_type,
        "unet": {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
                 "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "dropout": 0.1},
        "betas": {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        "training": {"steps": 6, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "adam_betas": [0.9, 0.999],
                     "weight_decay": 0.0, "warmup_steps": 3, "grad_clip": 1.0, "ema_decay": 0.9, "hflip": True,
                     "checkpoint_every": 2, "sample_every": 3, "sample_steps": 2, "seed": 3, **training},
    }


def tiny_members(n=10, channels=1, size=16):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def run(out_dir, prediction_type="epsilon", stop_after=None, **training):
    return train_ddpm(tiny_model_cfg(prediction_type, **training), tiny_members(), out_dir, "cpu",
                      progress=False, stop_after=stop_after)


def weights(out_dir, folder):
    from safetensors.torch import load_file

    return load_file(str(out_dir / folder / "diffusion_pytorch_model.safetensors"))


def assert_same_checkpoint(a, b):
    for folder in ("unet", "unet_ema"):
        wa, wb = weights(a, folder), weights(b, folder)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (folder, key)
    sa = torch.load(a / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(b / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    for key, values in sa.items():
        for field, tensor in values.items():
            assert torch.equal(tensor, sb[key][field])


def test_loss_matches_the_formula():
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.02)
    unet = build_unet(tiny_model_cfg()["unet"]).eval()
    x0, noise = tiny_members(3), torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 50, 99])
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1).float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        prediction = unet(x_t, t).sample
        expected_eps = ((prediction - noise) ** 2).mean()
        assert torch.allclose(diffusion_loss(unet, scheduler, x0, t, noise), expected_eps, rtol=1e-5)
        v_scheduler = DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.02,
                                    prediction_type="v_prediction")
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        expected_v = ((prediction - v) ** 2).mean()
        assert torch.allclose(diffusion_loss(unet, v_scheduler, x0, t, noise), expected_v, rtol=1e-5)


def test_ema_update_against_a_plain_loop():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [p.detach().clone() for p in ema.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape))
        ema_update(ema, model, 0.9)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.parameters()):
        assert torch.allclose(e, p, atol=1e-6)


def test_warmup_is_linear_then_constant():
    cfg = {"lr": 1e-3, "warmup_steps": 4}
    assert [learning_rate(s, cfg) for s in (1, 2, 4, 5, 100)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(1, {"lr": 1e-3, "warmup_steps": 0}) == 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_resume_after_interruption_is_bit_identical(tmp_path, prediction_type):
    run(tmp_path / "straight", prediction_type)
    out = tmp_path / "resumed"
    run(out, prediction_type, stop_after=3)
    summary = json.loads((out / "trainer_state.json").read_text())
    assert summary["step"] == 3 and summary["complete"] is False
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    run(out, prediction_type)
    assert_same_checkpoint(tmp_path / "straight", out)


def test_crash_between_checkpoints_resumes_from_the_last_one(tmp_path, monkeypatch):
    run(tmp_path / "straight")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm_trainer, "_save_grid", crash)  # first grid at step 3, after the step-2 checkpoint
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.undo()
    run(out)
    assert_same_checkpoint(tmp_path / "straight", out)


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    run(tmp_path / "straight", steps=6)
    run(tmp_path / "extended", steps=4)
    assert json.loads((tmp_path / "extended" / "trainer_state.json").read_text())["complete"] is True
    cfg = OmegaConf.create(tiny_model_cfg(steps=6))  # as the pipeline passes it
    train_ddpm(cfg, tiny_members(), tmp_path / "extended", "cpu", progress=False)
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "extended")


def test_checkpoint_is_a_diffusers_pipeline_and_ema_is_attacked(tmp_path):
    returned = run(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model_index.json", "samples", "scheduler", "trainer_state.json", "trainer_state.pt",
                     "unet", "unet_ema"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    summary = json.loads((tmp_path / "trainer_state.json").read_text())
    assert summary["step"] == 6 and summary["complete"] is True and summary["training_hash"]
    pipeline = DDPMPipeline.from_pretrained(tmp_path)  # any diffusers user can load it
    assert pipeline.scheduler.config.num_train_timesteps == 100
    denoiser = load_denoiser({"use_ema": True}, tmp_path)
    x, t = tiny_members(2), torch.tensor([5, 60])
    with torch.no_grad():
        ema_eps = load_denoiser({"use_ema": True}, tmp_path).network(x, t).sample
        raw_eps = pipeline.unet.eval()(x, t).sample
    # (to float rounding: the Denoiser calls the network on `rows_per_call` rows, the direct call here on 2)
    assert torch.allclose(denoiser.epsilon(x, t), ema_eps, atol=1e-6)
    assert torch.allclose(returned.epsilon(x, t), ema_eps, atol=1e-6)
    assert not torch.allclose(ema_eps, raw_eps)
    assert not returned.training


def test_finished_run_is_loaded_without_training(tmp_path):
    run(tmp_path)
    stamp = (tmp_path / "trainer_state.json").stat().st_mtime_ns
    denoiser = run(tmp_path)
    assert (tmp_path / "trainer_state.json").stat().st_mtime_ns == stamp
    x, t = tiny_members(2), torch.tensor([5, 60])
    assert torch.allclose(denoiser.epsilon(x, t), load_denoiser({}, tmp_path).epsilon(x, t))


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    run(tmp_path / "straight")
    real_save, calls = torch.save, []

    def crashing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # second checkpoint, after its UNets were written
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2  # the step-4 one never landed
    monkeypatch.undo()
    run(out)  # resumes at step 2, not from the half-written checkpoint
    assert_same_checkpoint(tmp_path / "straight", out)


def test_crash_while_moving_a_checkpoint_in_is_finished_by_the_next_run(tmp_path, monkeypatch):
    run(tmp_path / "straight")
    # second checkpoint (6 moves each): its old unet/ is deleted, the new one not in
    moves = crash_on_checkpoint_move(monkeypatch, 10)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.undo()
    assert moves[-1] == "unet" and not (out / "unet").exists()
    run(out)
    assert_same_checkpoint(tmp_path / "straight", out)


@pytest.mark.parametrize("name, resuming", [
    ("trainer_state.pt", True), ("unet_ema/diffusion_pytorch_model.safetensors", False),
    ("scheduler/scheduler_config.json", False),
])
def test_a_damaged_checkpoint_is_an_error_naming_the_directory_to_delete(tmp_path, name, resuming):
    from mia_gen.errors import CorruptStoreError

    out = tmp_path / "run"
    run(out, stop_after=3 if resuming else None)
    (out / name).write_bytes((out / name).read_bytes()[:-10])  # truncated
    with pytest.raises(CorruptStoreError, match=f"damaged: {name} has .*Delete {out} and train again"):
        run(out)


def test_no_ema_writes_no_ema_unet(tmp_path):
    run(tmp_path, ema_decay=None, sample_every=0)
    assert not (tmp_path / "unet_ema").exists()
    load_denoiser({"use_ema": True}, tmp_path)  # falls back to the raw weights


def test_mismatched_members_say_what_to_change(tmp_path):
    cfg = tiny_model_cfg()
    with pytest.raises(MiaGenError, match="data.channels=1"):
        train_ddpm(cfg, tiny_members(channels=3), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match="data.resolution=16"):
        train_ddpm(cfg, tiny_members(size=32), tmp_path, "cpu", progress=False)
    with pytest.raises(MiaGenError, match=r"\[-1, 1\]"):
        train_ddpm(cfg, tiny_members() * 127.5 + 127.5, tmp_path, "cpu", progress=False)
    assert not (tmp_path / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "section,overrides,message",
    [
        ("training", {"optimizer": "sgd"}, "use one of"),
        ("training", {"adam_betas": [0.9]}, "two numbers"),
        ("training", {"steps": 0}, "steps must be an integer >= 1"),
        ("training", {"ema": 0.9}, "unknown keys"),
        ("training", {"ema_decay": 1.5}, r"ema_decay must lie in \(0, 1\)"),
        ("training", {"grad_clip": 0}, "grad_clip must be a positive"),
        ("training", {"hflip": "yes"}, "hflip must be true or false"),
        ("unet", {"sample_size": 24}, "data.resolution"),
        ("unet", {"norm_num_groups": 32}, "norm_num_groups=32"),
        ("unet", {"down_block_types": ["DownBlock2D"]}, "one block type per resolution level"),
        ("betas", {"beta_schedule": "cubic"}, "beta_schedule"),
        (None, {"prediction_type": "sample"}, "cannot be trained"),
    ],
)
def test_bad_config(tmp_path, section, overrides, message):
    cfg = tiny_model_cfg()
    if section:
        cfg[section] = {**cfg[section], **overrides}
    else:
        cfg.update(overrides)
    with pytest.raises(MiaGenError, match=message):
        train_ddpm(cfg, tiny_members(), tmp_path, "cpu", progress=False)


def test_resuming_with_other_settings_or_model_is_refused(tmp_path):
    run(tmp_path, steps=2, sample_every=0)
    with pytest.raises(MiaGenError, match="other training settings"):
        run(tmp_path, steps=4, lr=0.1)
    with pytest.raises(MiaGenError, match="training.steps>=2"):
        run(tmp_path, steps=1)
    wider = tiny_model_cfg(steps=4)
    wider["unet"]["block_out_channels"] = [8, 8]
    with pytest.raises(MiaGenError, match="another model"):
        train_ddpm(wider, tiny_members(), tmp_path, "cpu", progress=False)


def digits_16px():
    """sklearn's 8x8 digits scaled to [-1, 1] and resized bilinearly to 16x16, `(1797, 1, 16, 16)`."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)


def loss_attack_scores(denoiser, x, timesteps=(50, 100, 150, 200, 250, 300), draws=4, seed=0):
    """Minus the mean denoising error over a few t in [50, 300] (higher = more likely member)."""
    rng, errors = torch.Generator().manual_seed(seed), torch.zeros(len(x))
    a = denoiser.alphas_cumprod.float()
    for t in timesteps:
        for _ in range(draws):
            noise = torch.randn(x.shape, generator=rng)
            x_t = a[t].sqrt() * x + (1 - a[t]).sqrt() * noise
            errors += (denoiser.epsilon(x_t, torch.full((len(x),), t)) - noise).square().flatten(1).mean(1)
    return -errors.numpy()


def pia_scores(denoiser, x, t=200, p=4):
    """PIA (Kong et al., 2024): eps0 = eps(x0, 0); x_t = sqrt(a)x0 + sqrt(1-a)eps0; score -||eps0 - eps(x_t, t)||_p."""
    a = denoiser.alphas_cumprod.float()[t]
    eps0 = denoiser.epsilon(x, torch.zeros(len(x), dtype=torch.int64))
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps0
    return -(eps0 - denoiser.epsilon(x_t, torch.full((len(x),), t))).abs().pow(p).flatten(1).sum(1).numpy()


@pytest.fixture(scope="module")
def digits_ddpm(tmp_path_factory):
    """configs/model/ddpm.yaml trained on 64 digit members; the denoiser and 64 + 64 labelled queries."""
    import time

    cfg = OmegaConf.load(ROOT / "configs" / "model" / "ddpm.yaml")
    cfg = OmegaConf.merge({"data": {"resolution": 16, "channels": 1}, "seed": 0}, {"model": cfg}).model
    x = digits_16px()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    members, held_out = x[order[:64]], x[order[64:128]]
    started = time.perf_counter()
    denoiser = train_ddpm(cfg, members, tmp_path_factory.mktemp("digits_ddpm"), "cpu", progress=False)
    print(f"trained {cfg.training.steps} steps in {time.perf_counter() - started:.0f} s")
    return denoiser, torch.cat([members, held_out]), np.r_[np.ones(64), np.zeros(64)]


@pytest.mark.slow
def test_default_ddpm_leaks_membership_to_the_loss_attack(digits_ddpm):
    """Measured: 800 steps in 343-580 s (loaded 2-core CPU), EMA weights, loss-attack AUC 0.976."""
    from sklearn.metrics import roc_auc_score

    denoiser, queries, labels = digits_ddpm
    auc = roc_auc_score(labels, loss_attack_scores(denoiser, queries))
    print(f"loss-attack AUC {auc:.3f}")
    assert auc >= 0.8


@pytest.mark.slow
def test_default_ddpm_leaks_membership_to_pia(digits_ddpm):
    """Measured (800 steps, EMA, GroupNorm with 8 groups): PIA AUC 0.98-0.99 over two seeds; with 32 groups
    (per-channel instance norm) it was 0.09, inverted."""
    from sklearn.metrics import roc_auc_score

    denoiser, queries, labels = digits_ddpm
    auc = roc_auc_score(labels, pia_scores(denoiser, queries))
    print(f"PIA AUC {auc:.3f}")
    assert auc >= 0.8


def compose_model(name, resolution=16, channels=1):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.merge({"data": {"resolution": resolution, "channels": channels}, "seed": 0}, {"model": cfg}).model


def test_model_configs_keep_the_shared_keys_and_build():
    for name in ("ddpm", "ddpm_cifar10", "diffusers"):
        cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
        assert {"name", "family", "checkpoint"} <= set(cfg) and cfg.family == "diffusion" and cfg.name == name
    digits = compose_model("ddpm")
    assert sum(p.numel() for p in build_unet(digits.unet).parameters()) == 651_041  # ~0.65M (DESIGN.md)
    ddpm_trainer.validate_training_config(digits.training)
    cifar = compose_model("ddpm_cifar10", 32, 3)
    ddpm_trainer.validate_training_config(cifar.training)
    unet = build_unet(cifar.unet)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7  # Ho et al. (2020): 35.7M
    attention = [type(b).__name__ for b in unet.down_blocks]
    assert attention == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert OmegaConf.is_missing(OmegaConf.load(ROOT / "configs" / "model" / "diffusers.yaml"), "checkpoint")


def test_factory_trains_and_loads_the_diffusion_family(tmp_path):
    from mia_gen.models.diffusion_sampling import DiffusionSampler
    from mia_gen.models.factory import load_diffusion_denoiser, load_generator, train_model

    cfg = OmegaConf.create({**tiny_model_cfg(sample_every=0, steps=2),
                            "use_ema": True, "sampler": {"name": "ddim", "steps": 3, "eta": None}})
    train_model(cfg, tiny_members(), tmp_path, torch.device("cpu"), progress=False)
    generator = load_generator(cfg, tmp_path, torch.device("cpu"))
    assert isinstance(generator, DiffusionSampler) and generator.latent_dim == 256 and generator.steps == 3
    images = generator(generator.sample_latent(2, torch.Generator().manual_seed(0)))
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    denoiser = load_diffusion_denoiser(cfg, tmp_path, torch.device("cpu"))
    assert denoiser.num_train_timesteps == 100
    pretrained = OmegaConf.create({"name": "diffusers", "family": "diffusion", "checkpoint": None})
    with pytest.raises(MiaGenError, match="model.checkpoint=<pipeline directory>"):
        train_model(pretrained, tiny_members(), tmp_path / "other", torch.device("cpu"), progress=False)
