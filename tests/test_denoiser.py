"""Denoiser: loading diffusers pipelines / UNets / own networks, exact prediction-type conversion, errors."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.models.denoiser import Denoiser, load_denoiser

TINY_UNET = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, dropout=0.3,
)
BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, **overrides}).eval()


def save_pipeline(path, prediction_type="epsilon", seed=0, ema_seed=None):
    unet = tiny_unet(seed)
    scheduler = DDPMScheduler(**BETAS, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    if ema_seed is not None:
        tiny_unet(ema_seed).save_pretrained(path / "unet_ema")
    return unet, scheduler


def batch(n=3, channels=1, size=16):
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 417, 999][:n])
    return x, t


def test_pipeline_dir_gives_the_unets_epsilon(tmp_path):
    unet, scheduler = save_pipeline(tmp_path)
    denoiser = load_denoiser({"prediction_type": None}, tmp_path, "cpu")
    x, t = batch()
    with torch.no_grad():
        expected = unet(x, t).sample
    eps = denoiser.epsilon(x, t)
    assert torch.allclose(eps, expected, atol=1e-6)
    assert denoiser.num_train_timesteps == 1000 and denoiser.sample_shape == (1, 16, 16)
    assert denoiser.alphas_cumprod.dtype == torch.float64 and denoiser.alphas_cumprod.device.type == "cpu"
    reference = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(denoiser.alphas_cumprod, reference, rtol=1e-5)
    assert not eps.requires_grad
    eps64 = denoiser.epsilon(x.double(), t)  # attacks may work in float64
    assert eps64.dtype == torch.float64 and torch.allclose(eps64.float(), expected, atol=1e-6)


def test_always_eval_so_dropout_is_off(tmp_path):
    save_pipeline(tmp_path)
    denoiser = load_denoiser({}, tmp_path, "cpu")
    denoiser.train()
    assert not denoiser.training and not any(m.training for m in denoiser.modules())
    x, t = batch()
    assert torch.equal(denoiser.epsilon(x, t), denoiser.epsilon(x, t))  # dropout=0.3 in TINY_UNET


def test_gradients_when_asked(tmp_path):
    save_pipeline(tmp_path)
    denoiser = load_denoiser({}, tmp_path, "cpu")
    x, t = batch()
    x.requires_grad_(True)
    denoiser.epsilon(x, t, grad=True).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ema_weights_preferred_when_present(tmp_path):
    save_pipeline(tmp_path, seed=0, ema_seed=7)
    x, t = batch()
    with torch.no_grad():
        ema_eps, raw_eps = tiny_unet(7)(x, t).sample, tiny_unet(0)(x, t).sample
    assert torch.allclose(load_denoiser({"use_ema": True}, tmp_path).epsilon(x, t), ema_eps, atol=1e-6)
    assert torch.allclose(load_denoiser({"use_ema": False}, tmp_path).epsilon(x, t), raw_eps, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_are_converted_to_epsilon_exactly(tmp_path, prediction_type):
    unet, scheduler = save_pipeline(tmp_path, prediction_type)
    denoiser = load_denoiser({"prediction_type": None}, tmp_path)
    x, t = batch()
    with torch.no_grad():
        out = unet(x, t).sample.double()
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    xd = x.double()
    if prediction_type == "v_prediction":
        expected = a.sqrt() * out + (1 - a).sqrt() * xd
    else:
        expected = (xd - a.sqrt() * out) / (1 - a).sqrt()
    eps = denoiser.epsilon(x, t)
    assert torch.allclose(eps.double(), expected, rtol=1e-4, atol=1e-4)
    # Independent check: diffusers' own x0 prediction equals the x0 implied by our epsilon.
    scheduler = DDPMScheduler(**BETAS, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(1000)
    for i in range(len(t)):
        step = scheduler.step(out[i : i + 1].float(), int(t[i]), x[i : i + 1])
        x0_from_eps = (xd[i] - (1 - a[i]).sqrt() * eps[i].double()) / a[i].sqrt()
        assert torch.allclose(step.pred_original_sample[0].double(), x0_from_eps, rtol=1e-3, atol=1e-3)


def test_declared_prediction_type_contradicting_the_checkpoint(tmp_path):
    save_pipeline(tmp_path, "v_prediction")
    with pytest.raises(MiaGenError, match="a v-prediction model used as an epsilon"):
        load_denoiser({"prediction_type": "epsilon"}, tmp_path)
    assert load_denoiser({"prediction_type": "v_prediction"}, tmp_path).prediction_type == "v_prediction"


def test_input_errors_name_the_config_fix(tmp_path):
    save_pipeline(tmp_path)
    denoiser = load_denoiser({}, tmp_path)
    x, t = batch()
    with pytest.raises(MiaGenError, match="data.channels=1"):
        denoiser.epsilon(x.repeat(1, 3, 1, 1), t)
    with pytest.raises(MiaGenError, match="data.resolution=16"):
        denoiser.epsilon(torch.zeros(3, 1, 32, 32), t)
    with pytest.raises(MiaGenError, match=r"\[0, 1000\)"):
        denoiser.epsilon(x, torch.tensor([0, 1, 1000]))
    with pytest.raises(MiaGenError, match=r"\[0, 1000\)"):
        denoiser.epsilon(x, torch.tensor([-1, 1, 2]))
    with pytest.raises(MiaGenError, match="x / 127.5 - 1"):
        denoiser.epsilon((x * 100).to(torch.uint8), t)
    with pytest.raises(MiaGenError, match="integer timesteps"):
        denoiser.epsilon(x, t.float())
    with pytest.raises(MiaGenError, match="one timestep per image"):
        denoiser.epsilon(x, t[:2])
    assert torch.equal(denoiser.epsilon(x, 5), denoiser.epsilon(x, torch.full((3,), 5)))


def test_bare_unet_dir_needs_betas(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet_only")
    with pytest.raises(MiaGenError, match="model.betas"):
        load_denoiser({}, tmp_path / "unet_only")
    denoiser = load_denoiser({"betas": BETAS}, tmp_path / "unet_only")
    x, t = batch()
    with torch.no_grad():
        assert torch.allclose(denoiser.epsilon(x, t), unet(x, t).sample, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_missing_assets_say_where_and_which_switch(tmp_path):
    with pytest.raises(MissingAssetError, match="allow_download=true"):
        load_denoiser({}, tmp_path / "nowhere")
    with pytest.raises(MissingAssetError, match="allow_download=true"):
        load_denoiser({"allow_download": False}, "someone/not-a-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingAssetError, match="model_index.json"):
        load_denoiser({}, tmp_path / "empty")
    save_pipeline(tmp_path / "pipe")
    for path in (tmp_path / "pipe" / "unet").iterdir():
        path.unlink()
    (tmp_path / "pipe" / "unet").rmdir()
    with pytest.raises(MissingAssetError, match="unet/"):
        load_denoiser({}, tmp_path / "pipe")


def test_own_network_with_safetensors_weights(tmp_path):
    unet = tiny_unet(3)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "eps.safetensors"))
    cfg = {"network": {"_target_": "diffusers.UNet2DModel", **{k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in TINY_UNET.items()}},
           "weights": "eps.safetensors", "betas": BETAS, "sample_shape": [1, 16, 16]}
    denoiser = load_denoiser(cfg, tmp_path)
    x, t = batch()
    with torch.no_grad():
        assert torch.allclose(denoiser.epsilon(x, t), unet(x, t).sample, atol=1e-6)
    with pytest.raises(MissingAssetError, match="model.weights"):
        load_denoiser({**cfg, "weights": "missing.safetensors"}, tmp_path)
    wrong = {**cfg, "network": {**cfg["network"], "block_out_channels": [8, 16], "norm_num_groups": 4}}
    with pytest.raises(MiaGenError, match="another architecture"):
        load_denoiser(wrong, tmp_path)


def test_unfinished_training_run_is_loaded_with_a_warning(tmp_path, caplog):
    save_pipeline(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "steps": 10, "complete": False}))
    with caplog.at_level("WARNING"):
        load_denoiser({}, tmp_path)
    assert "unfinished" in caplog.text


def test_direct_construction_checks():
    with pytest.raises(MiaGenError, match="model.prediction_type"):
        Denoiser(tiny_unet(), torch.linspace(0.99, 0.01, 10), (1, 16, 16), "x0")
    with pytest.raises(MiaGenError, match="model.betas"):
        Denoiser(tiny_unet(), torch.linspace(0.99, 0.0, 10), (1, 16, 16))
