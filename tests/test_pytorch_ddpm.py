"""model=pytorch_ddpm (models/pytorch_ddpm.py): SecMI's / PIA's released checkpoints in w86763777/pytorch-ddpm's
ckpt.pt layout, held to an independent forward written from the state dict's tensors with plain ops, and the
papers' one-command protocol on a tiny model of the same architecture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mia_gen.errors import MiaGenError
from mia_gen.models.denoiser import load_denoiser
from mia_gen.models.pytorch_ddpm import UNet, hyperparameters, load_network, read_flagfile

TINY = {"T": 1000, "ch": 32, "ch_mult": [1, 2], "attn": [1], "num_res_blocks": 1, "dropout": 0.1}


def random_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny UNet's state dict with every weight drawn at random (no zero biases, unit-ish norms' scales)."""
    network = UNet(**TINY)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in network.state_dict().items():
        if name.endswith("timembedding.0.weight"):
            state[name] = tensor.clone()  # the frozen sinusoidal table, as saved
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * (0.2 if tensor.dim() > 1 else 0.1)
            if "group_norm.weight" in name or name.endswith((".0.weight",)) and tensor.dim() == 1:
                state[name] = 1.0 + state[name]
    return state


def write_release(directory, flags=True, ema_prefix="module.") -> tuple[dict, dict]:
    """A pytorch-ddpm logdir: ckpt.pt (net_model, ema_model with DataParallel's prefix, optimiser, step) and
    flagfile.txt, as its train.py writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    net, ema = random_state(0), random_state(1)
    torch.save({"net_model": net, "ema_model": {ema_prefix + k: v for k, v in ema.items()},
                "optim": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}, "step": 800000,
                "x_T": torch.randn(2, 3, 8, 8)}, directory / "ckpt.pt")
    if flags:
        lines = [f"--T={TINY['T']}", "--attn=1", f"--ch={TINY['ch']}", "--ch_mult=1", "--ch_mult=2", "--dropout=0.1",
                 "--beta_1=0.0001", "--beta_T=0.02", "--img_size=8", "--num_res_blocks=1", "--lr=0.0002", "--train"]
        (directory / "flagfile.txt").write_text("\n".join(lines) + "\n")
    return net, ema


# ---- the independent forward: plain ops on the state dict's tensors, block by block -----------------
def plain_forward(state: dict, x: torch.Tensor, t: torch.Tensor, ch_mult, attn, num_res_blocks) -> torch.Tensor:
    def swish(h):
        return h * torch.sigmoid(h)

    def conv(h, name, stride=1):
        weight = state[f"{name}.weight"]
        return F.conv2d(h, weight, state[f"{name}.bias"], stride=stride, padding=weight.shape[-1] // 2)

    def norm(h, name):
        return F.group_norm(h, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    def attention(h, name):
        b, c, height, width = h.shape
        n = norm(h, f"{name}.group_norm")
        q, k, v = (conv(n, f"{name}.proj_{p}").reshape(b, c, height * width) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, height, width)
        return h + conv(out, f"{name}.proj")

    def resblock(h, name, temb, with_attention):
        out = conv(swish(norm(h, f"{name}.block1.0")), f"{name}.block1.2")
        out = out + F.linear(swish(temb), state[f"{name}.temb_proj.1.weight"], state[f"{name}.temb_proj.1.bias"])[:, :, None, None]
        out = conv(swish(norm(out, f"{name}.block2.0")), f"{name}.block2.3")  # dropout: identity in eval
        skip = conv(h, f"{name}.shortcut") if f"{name}.shortcut.weight" in state else h
        out = out + skip
        return attention(out, f"{name}.attn") if with_attention else out

    table = state["time_embedding.timembedding.0.weight"]
    temb = F.linear(table[t], state["time_embedding.timembedding.1.weight"], state["time_embedding.timembedding.1.bias"])
    temb = F.linear(swish(temb), state["time_embedding.timembedding.3.weight"], state["time_embedding.timembedding.3.bias"])
    h = conv(x, "head")
    skips, index = [h], 0
    for level in range(len(ch_mult)):
        for _ in range(num_res_blocks):
            h = resblock(h, f"downblocks.{index}", temb, level in attn)
            skips.append(h)
            index += 1
        if level != len(ch_mult) - 1:
            h = conv(h, f"downblocks.{index}.main", stride=2)
            skips.append(h)
            index += 1
    h = resblock(h, "middleblocks.0", temb, True)
    h = resblock(h, "middleblocks.1", temb, False)
    index = 0
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            h = resblock(torch.cat([h, skips.pop()], dim=1), f"upblocks.{index}", temb, level in attn)
            index += 1
        if level != 0:
            h = conv(h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), f"upblocks.{index}.main")
            index += 1
    assert not skips
    return conv(swish(norm(h, "tail.0")), "tail.2")


def test_the_loaded_model_predicts_what_the_checkpoints_tensors_compute(tmp_path):
    """eps(x_t, t) of the loaded EMA weights equals the independent forward on the same tensors, to 1e-5; the
    schedule is pytorch-ddpm's float64 linspace; net_model is the other choice."""
    _, ema = write_release(tmp_path / "logdir")
    denoiser = load_denoiser({"format": "pytorch_ddpm", "use_ema": True, "flags": {}}, str(tmp_path / "logdir"))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 17, 420, 999])
    with torch.no_grad():
        expected = plain_forward(ema, x, t, TINY["ch_mult"], TINY["attn"], TINY["num_res_blocks"])
        got = denoiser.epsilon(x, t)
    assert expected.abs().mean() > 0.1  # the check sees real signal, not near-zero outputs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    betas = torch.linspace(1e-4, 0.02, 1000).double().numpy()  # diffusion.py: float32 linspace, then double
    np.testing.assert_allclose(denoiser.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert denoiser.sample_shape == (3, 8, 8)
    net_denoiser = load_denoiser({"format": "pytorch_ddpm", "use_ema": False, "flags": {}},
                                 str(tmp_path / "logdir" / "ckpt.pt"))
    net_state = torch.load(tmp_path / "logdir" / "ckpt.pt", weights_only=True)["net_model"]
    with torch.no_grad():
        torch.testing.assert_close(net_denoiser.epsilon(x, t),
                                   plain_forward(net_state, x, t, TINY["ch_mult"], TINY["attn"], 1), rtol=1e-5, atol=1e-5)


def test_settings_come_from_the_flagfile_else_from_model_flags(tmp_path):
    write_release(tmp_path / "with")
    assert read_flagfile(tmp_path / "with" / "flagfile.txt") == {
        "T": 1000, "attn": [1], "ch": 32, "ch_mult": [1, 2], "dropout": 0.1, "beta_1": 1e-4, "beta_T": 0.02,
        "img_size": 8, "num_res_blocks": 1}
    with pytest.raises(MiaGenError, match="model.flags.ch=64 but .*flagfile.txt says 32"):
        hyperparameters(tmp_path / "with", {"ch": 64})
    write_release(tmp_path / "bare", flags=False)
    with pytest.raises(MiaGenError, match="does not fit UNet\\(T=1000, ch=128"):  # the released CIFAR-10 defaults
        load_network(tmp_path / "bare", {}, True)
    network, settings = load_network(tmp_path / "bare", {**TINY, "img_size": 8}, True)
    assert settings["ch"] == 32 and isinstance(network, UNet)
    with pytest.raises(MiaGenError, match="unknown settings \\['channels'\\]"):
        hyperparameters(tmp_path / "bare", {"channels": 3})


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_key(tmp_path):
    net, ema = write_release(tmp_path / "logdir", ema_prefix="")
    path = tmp_path / "logdir" / "ckpt.pt"
    for change, message in (
        (lambda s: s.pop("head.weight"), r"missing \['head.weight'\]"),
        (lambda s: s.update({"head.extra": torch.zeros(1)}), r"not in the UNet \['head.extra'\]"),
        (lambda s: s.update({"tail.2.bias": torch.zeros(4)}), r"tail.2.bias \(4,\) \(the UNet has \(3,\)\)"),
    ):
        damaged = dict(ema)
        change(damaged)
        torch.save({"net_model": net, "ema_model": damaged}, path)
        with pytest.raises(MiaGenError, match=message):
            load_network(tmp_path / "logdir", {}, True)
    torch.save({"net_model": net}, path)
    with pytest.raises(MiaGenError, match="no 'ema_model' state dict .*\\['net_model'\\].*model.use_ema=false"):
        load_network(tmp_path / "logdir", {}, True)
    torch.save(UNet(**TINY), path)  # a pickled module: code, not tensors
    with pytest.raises(MiaGenError, match="weights_only=True"):
        load_network(tmp_path / "logdir", {}, True)
    with pytest.raises(MiaGenError, match="model.checkpoint"):
        load_denoiser({"format": "pytorch_ddpm"}, tmp_path / "nowhere")


@pytest.mark.parametrize("experiment, attacks", [("secmi_cifar10", {"secmi_stat", "secmi_nn"}),
                                                 ("pia_cifar10", {"pia", "pian", "secmi_stat", "diffusion_loss"})])
def test_the_papers_protocol_runs_on_a_released_checkpoint_in_one_command(tmp_path, experiment, attacks):
    """experiment=secmi_cifar10 / pia_cifar10 with model=pytorch_ddpm, the checkpoint and the paper's npz split: no
    training, the split's members and non-members scored by the paper's attacks (here on 8x8 images of a tiny model
    of the same architecture; CIFAR-10 itself is not on this machine)."""
    from test_pipeline import make_config

    from mia_gen.experiments.pipeline import Pipeline

    write_release(tmp_path / "logdir")
    images = np.random.default_rng(0).uniform(-1, 1, (60, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    np.savez(tmp_path / "split.npz", mia_train_idxs=np.arange(0, 40, 2), mia_eval_idxs=np.arange(1, 40, 2))
    cfg = make_config([f"experiment={experiment}", "model=pytorch_ddpm", f"model.checkpoint={tmp_path / 'logdir'}",
                       f"split.secmi_npz={tmp_path / 'split.npz'}", "data=array", f"data.path={tmp_path / 'images.npy'}",
                       "data.value_range=[-1,1]", "device=cpu", "logger=none", "progress=false",
                       "evaluation.n_bootstrap=50", "utility.metric=none",
                       *(["attack.secmi_nn.nn_epochs=2"] if "secmi_nn" in attacks else [])],
                      tmp_path / "cache")
    pipeline = Pipeline(cfg, tmp_path / "run")
    results = pipeline.run()
    assert {r["attack"] for r in results} == attacks
    assert not (tmp_path / "cache" / "models").exists()  # nothing trained
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    assert payload["metadata"]["split"]["membership"] == "secmi_npz"
    by_attack = {r["attack"]: r for r in results}
    assert by_attack["secmi_stat"]["n_members"] == 20 and by_attack["secmi_stat"]["n_non_members"] == 20
    # the key is the checkpoint's and the flagfile's bytes: a flagfile edited in place is another model
    before = pipeline.train_key
    (tmp_path / "logdir" / "flagfile.txt").write_text((tmp_path / "logdir" / "flagfile.txt").read_text() + "--noeval\n")
    assert Pipeline(cfg, tmp_path / "run2").train_key != before
