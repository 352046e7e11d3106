"""White-box diffusion attacks (loss, SecMI, PIA/PIAN) against plain loops, closed forms and real signal.

The toy denoisers are exact: the noise prediction of a Gaussian mixture is analytic, so a model
that "memorised" its members is the mixture centred on them, and a model that saw other records is
the mixture centred on those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.attacks.timesteps import ddim_step, denoiser_of, record_noise
from mia_gen.errors import MiaGenError
from mia_gen.models.memorizer import NoisyCopyGenerator

T = 1000
SHAPE = (1, 8, 8)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """The DDPM linear schedule, beta from 1e-4 to 0.02 over 1000 steps (Ho et al.)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), dim=0)


class MixtureDenoiser(nn.Module):
    """Exact eps for data ~ (1/M) sum_m N(centre_m, s^2 I): E[eps | x_t] = sqrt(1-a)/sigma^2 (x - sqrt(a) E[mu|x])."""

    def __init__(self, centres: torch.Tensor, s: float):
        super().__init__()
        self.centres = centres.double().flatten(1)
        self.s = s
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.num_train_timesteps = T
        self.sample_shape = tuple(centres.shape[1:])
        self.calls = 0  # records evaluated, to count model calls

    def epsilon(self, x_t, t):
        self.calls += len(x_t)
        a = self.alphas_cumprod[t].view(-1, 1)
        x = x_t.double().flatten(1)
        sigma2 = a * self.s ** 2 + 1 - a
        d2 = ((x[:, None, :] - a.sqrt()[:, :, None] * self.centres[None]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * sigma2), dim=1)
        eps = (1 - a).sqrt() / sigma2 * (x - a.sqrt() * (w @ self.centres))
        return eps.view(x_t.shape).to(x_t.dtype)


class ConstantDenoiser(nn.Module):
    """eps_theta(x, t) = c for every x and t: DDIM is then exactly reversible."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.num_train_timesteps = T
        self.sample_shape = tuple(c.shape)

    def epsilon(self, x_t, t):
        return self.c.expand_as(x_t).to(x_t.dtype)


class UNetDenoiser(nn.Module):
    """A tiny, untrained diffusers UNet2DModel behind the Denoiser interface."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.unet = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4, dropout=0.5)  # dropout: the attacks must switch it off (eval mode)
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.num_train_timesteps = T
        self.sample_shape = SHAPE

    def epsilon(self, x_t, t):
        return self.unet(x_t, t).sample


def context(model, queries, record_ids=None, seed=0, **fields):
    ids = np.arange(len(queries)) if record_ids is None else np.asarray(record_ids)
    ctx = AttackContext(queries=queries, record_ids=ids, denoiser=model, seed=seed)
    for key, value in fields.items():
        setattr(ctx, key, value)
    return ctx


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def records():
    """600 images in [-1, 1]: 200 members, 200 non-members, 200 that only an independent model saw."""
    return torch.rand(600, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def unet():
    return UNetDenoiser()


# ---- plain per-record loops, written from the papers' formulas -----------------------------------


def abar(t):
    return float(ddpm_alphas_cumprod()[t])


def eps_of(model, x, t):
    with torch.no_grad():
        return model.epsilon(x[None].float(), torch.tensor([t])).double()[0]


def loss_loop(model, queries, record_ids, seed, timesteps, n_draws):
    scores = []
    for x0, record_id in zip(queries.double(), record_ids):
        noise = record_noise(np.array([record_id]), seed, n_draws, x0.shape)[0].double()
        losses = []
        for t in timesteps:
            for eps in noise:
                x_t = math.sqrt(abar(t)) * x0 + math.sqrt(1 - abar(t)) * eps
                losses.append(float(((eps - eps_of(model, x_t, t)) ** 2).sum()))
        scores.append(-np.mean(losses))
    return np.array(scores)


def pia_loop(model, queries, t, p, normalised):
    scores = []
    for x0 in queries.double():
        eps0 = eps_of(model, x0, 0)
        if normalised:  # PIAN, Eq. 10: eps0 * N * sqrt(2/pi) / ||eps0||_1
            eps0 = eps0 * eps0.numel() * math.sqrt(2 / math.pi) / eps0.abs().sum()
        x_t = math.sqrt(abar(t)) * x0 + math.sqrt(1 - abar(t)) * eps0
        scores.append(-float(((eps0 - eps_of(model, x_t, t)).abs() ** p).sum() ** (1 / p)))
    return np.array(scores)


def ddim_loop(model, x, t_from, t_to):
    eps = eps_of(model, x, t_from)
    x0_hat = (x - math.sqrt(1 - abar(t_from)) * eps) / math.sqrt(abar(t_from))
    return math.sqrt(abar(t_to)) * x0_hat + math.sqrt(1 - abar(t_to)) * eps


def secmi_loop(model, queries, t_sec, k):
    """The reference script at --t_sec, --k: invert along range(0, t_sec, k), then step out and back."""
    scores = []
    path = list(range(0, t_sec, k))
    for x in queries.double():
        for t_from, t_to in zip(path[:-1], path[1:]):
            x = ddim_loop(model, x, t_from, t_to)
        t = path[-1]  # t_sec - k
        x_back = ddim_loop(model, ddim_loop(model, x, t, t + k), t + k, t)
        scores.append(-float(((x_back - x) ** 2).sum()))
    return np.array(scores)


@pytest.mark.parametrize("params", [{}, {"timesteps": [20, 300], "n_draws": 3}])
def test_diffusion_loss_equals_a_loop(unet, records, params):
    queries, ids = records[:5], np.array([7, 3, 11, 5, 2])
    output = build_attack("diffusion_loss", {**params, "batch_size": 4})(context(unet, queries, ids, seed=5))
    expected = loss_loop(unet, queries, ids, 5, params.get("timesteps", [100]), params.get("n_draws", 4))
    np.testing.assert_allclose(output.scores, expected, rtol=1e-4)
    assert output.info["model_calls_per_record"] == len(params.get("timesteps", [100])) * params.get("n_draws", 4)


@pytest.mark.parametrize("name", ["pia", "pian"])
@pytest.mark.parametrize("t,p", [(200, 4), (50, 2)])
def test_pia_equals_a_loop(unet, records, name, t, p):
    queries = records[:5]
    output = build_attack(name, {"t": t, "p": p, "batch_size": 3})(context(unet, queries))
    np.testing.assert_allclose(output.scores, pia_loop(unet, queries, t, p, name == "pian"), rtol=1e-4)


@pytest.mark.parametrize("t_sec,k", [(100, 10), (40, 20)])
def test_secmi_stat_equals_a_loop(unet, records, t_sec, k):
    queries = records[:5]
    output = build_attack("secmi_stat", {"t_sec": t_sec, "k": k, "batch_size": 2})(context(unet, queries))
    np.testing.assert_allclose(output.scores, secmi_loop(unet, queries, t_sec, k), rtol=1e-3)
    assert output.info["t_measured"] == t_sec - k
    # timestep_convention=measured: t_sec is the timestep measured, the reference's t_sec + k
    measured = build_attack("secmi_stat", {"t_sec": t_sec, "k": k, "timestep_convention": "measured"})
    np.testing.assert_allclose(measured(context(unet, queries)).scores,
                               secmi_loop(unet, queries, t_sec + k, k), rtol=1e-3)


def test_scores_do_not_depend_on_batch_or_company(unet, records):
    """A record's score is a function of (record, id, seed), whatever it is batched with."""
    full = build_attack("diffusion_loss", {"batch_size": 7})(context(unet, records[:6], seed=1)).scores
    part = build_attack("diffusion_loss", {"batch_size": 256})(
        context(unet, records[[4, 1]], record_ids=[4, 1], seed=1)).scores
    np.testing.assert_allclose(part, full[[4, 1]], rtol=1e-5)
    other_seed = build_attack("diffusion_loss")(context(unet, records[:6], seed=2)).scores
    assert not np.allclose(other_seed, full)


# ---- model calls, sweeps --------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,calls", [
    ("diffusion_loss", {}, 4), ("diffusion_loss", {"timesteps": [10, 50], "n_draws": 2}, 4),
    ("pia", {}, 2), ("pian", {}, 2), ("secmi_stat", {}, 11), ("secmi_stat", {"t_sec": 50, "k": 25}, 3),
    ("secmi_stat", {"timestep_convention": "measured"}, 12),
])
def test_model_calls_per_record_are_counted(records, name, params, calls):
    model = MixtureDenoiser(records[:20], s=0.1)
    output = build_attack(name, params)(context(model, records[:9]))
    assert output.info["model_calls_per_record"] == calls
    assert model.calls == 9 * calls


@pytest.mark.parametrize("name,key", [("diffusion_loss", "timesteps"), ("pia", "t"), ("pian", "t"),
                                      ("secmi_stat", "t_sec")])
def test_sweep_equals_separate_runs(unet, records, name, key):
    sweep = [20, 60, 100]
    ctx = context(unet, records[:4])
    output = build_attack(name, {"sweep_timesteps": sweep, "batch_size": 5})(ctx)
    assert list(output.info["sweep"]) == [str(t) for t in sweep]  # JSON-stable keys
    for t in sweep:
        alone = build_attack(name, {key: [t] if key == "timesteps" else t})(ctx).scores
        np.testing.assert_allclose(output.info["sweep"][str(t)], alone, rtol=1e-4)
    assert "sweep" not in build_attack(name)(ctx).info


# ---- DDIM closed forms ----------------------------------------------------------------------------


def test_ddim_inversion_then_denoising_returns_the_input():
    """With eps_theta = c, x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) c whatever the path."""
    generator = torch.Generator().manual_seed(1)
    c = torch.randn(*SHAPE, generator=generator, dtype=torch.float64)
    x = torch.rand(3, *SHAPE, generator=generator, dtype=torch.float64) * 2 - 1
    alphas = ddpm_alphas_cumprod()
    path = list(range(0, 310, 10))
    state = x
    for t_from, t_to in zip(path[:-1], path[1:]):
        state = ddim_step(state, c.expand_as(x), torch.full((3,), t_from), torch.full((3,), t_to), alphas)
    x0_hat = (x - math.sqrt(1 - abar(0)) * c) / math.sqrt(abar(0))
    np.testing.assert_allclose(state, math.sqrt(abar(300)) * x0_hat + math.sqrt(1 - abar(300)) * c, atol=1e-10)
    for t_from, t_to in zip(path[::-1][:-1], path[::-1][1:]):
        state = ddim_step(state, c.expand_as(x), torch.full((3,), t_from), torch.full((3,), t_to), alphas)
    np.testing.assert_allclose(state, x, atol=1e-5)
    # through the attack (float32): exactly reversible, so no t-error at all
    t_error = -build_attack("secmi_stat")(context(ConstantDenoiser(c.float()), x.float())).scores
    np.testing.assert_allclose(t_error, 0.0, atol=1e-5)


def test_secmi_t_error_of_a_gaussian_matches_its_closed_form():
    """Data N(mu, s^2 I): each DDIM step a -> b multiplies u = x - sqrt(a) mu by
    (sqrt(ab) s^2 + sqrt((1-a)(1-b))) / (a s^2 + 1 - a), so the t-error is (f_out f_back - 1)^2 ||u_t||^2."""
    s, t_sec, k = 0.5, 100, 10
    t_m = t_sec - k  # the reference convention measures t_sec - k -> t_sec -> t_sec - k
    mu = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def factor(a, b):
        return (math.sqrt(a * b) * s ** 2 + math.sqrt((1 - a) * (1 - b))) / (a * s ** 2 + 1 - a)

    u = (x.double() - math.sqrt(abar(0)) * mu.double()).flatten(1)
    for t in range(0, t_m, k):
        u = u * factor(abar(t), abar(t + k))
    round_trip = factor(abar(t_m), abar(t_m + k)) * factor(abar(t_m + k), abar(t_m))
    expected = (round_trip - 1) ** 2 * (u ** 2).sum(dim=1)
    t_error = -build_attack("secmi_stat")(context(MixtureDenoiser(mu, s), x)).scores
    np.testing.assert_allclose(t_error, expected.numpy(), rtol=1e-4)  # measured: 7e-6 (float32)


# ---- real signal ----------------------------------------------------------------------------------


def signal_auc(name, records, memorised: bool, params=None):
    members, non_members, independent = records[:200], records[200:400], records[400:600]
    model = MixtureDenoiser(members if memorised else independent, s=0.1)
    queries = torch.cat([members, non_members])
    labels = np.r_[np.ones(200), np.zeros(200)].astype(int)
    fields = {}
    if name == "secmi_nn":
        positions = np.r_[np.arange(0, 40), np.arange(200, 240)]
        fields["labelled_subset"] = (positions, labels[positions])
    output = build_attack(name, params)(context(model, queries, **fields))
    keep = np.setdiff1d(np.arange(400), output.info.get("trained_on", []))
    return roc_auc_score(labels[keep], output.scores[keep])


@pytest.mark.parametrize("name,params", [
    ("diffusion_loss", None), ("pia", None), ("pian", None), ("secmi_stat", None),
    ("secmi_nn", {"classifier": "small_cnn", "nn_epochs": 30, "nn_batch_size": 64}),
    pytest.param("secmi_nn", {"nn_epochs": 30}, marks=pytest.mark.slow),  # the reference's ResNet-18: ~1 min
])
def test_memorised_members_are_found_and_others_are_not(records, name, params):
    assert signal_auc(name, records, memorised=True, params=params) >= 0.95
    assert 0.4 <= signal_auc(name, records, memorised=False, params=params) <= 0.6


def test_secmi_nn_says_what_it_trained_on_and_is_deterministic(records):
    model = MixtureDenoiser(records[:30], s=0.1)
    positions = np.array([0, 1, 2, 40, 41, 42])
    labels = np.array([1, 1, 1, 0, 0, 0])
    ctx = context(model, records[:60], labelled_subset=(positions, labels), seed=3)
    attack = build_attack("secmi_nn", {"nn_epochs": 2, "sweep_timesteps": [50]})
    first, second = attack(ctx), attack(ctx)
    assert first.info["trained_on"] == positions.tolist()
    np.testing.assert_array_equal(first.scores, second.scores)
    assert len(first.info["sweep"]["50"]) == 60


# ---- errors that say what to do -------------------------------------------------------------------


@pytest.mark.parametrize("name,params,match", [
    ("diffusion_loss", {"timesteps": [1000]}, r"t=1000, outside.*\[0, 1000\)"),
    ("diffusion_loss", {"timesteps": []}, "non-empty list"),
    ("diffusion_loss", {"n_draws": 0}, "n_draws must be a positive integer"),
    ("pia", {"t": -1}, r"t=-1, outside"),
    ("pian", {"sweep_timesteps": [100, 5000]}, "sweep_timesteps contains t=5000"),
    ("pia", {"p": 0.5}, "p must be a number >= 1"),
    ("pia", {"p": "l4"}, "p must be a number >= 1"),
    ("secmi_stat", {"t_sec": 990, "timestep_convention": "measured"}, "choose t <= 989"),
    ("secmi_stat", {"t_sec": 1000}, r"t=1000, outside.*\[0, 1000\)"),
    ("secmi_stat", {"t_sec": 0}, "choose t >= 10, or timestep_convention=measured"),
    ("secmi_stat", {"timestep_convention": "paper"}, "timestep_convention must be one of reference, measured"),
    ("secmi_nn", {"classifier": "vgg"}, "classifier must be one of resnet18, small_cnn"),
    ("secmi_stat", {"t_sec": 105}, "multiples of 10"),
    ("secmi_stat", {"batch_size": 0}, "batch_size must be a positive integer"),
    ("secmi_stat", {"k": 2.5}, "k .the DDIM interval. must be a positive integer"),
    ("diffusion_loss", {"timesteps": 100}, r"must be a non-empty list of integers, e.g. \[100\]"),
    ("pia", {"t": None}, "t=None, outside"),
    ("secmi_nn", {"nn_epochs": 0}, "nn_epochs must be a positive integer"),
])
def test_bad_settings_are_clear_errors(records, name, params, match):
    subset = (np.array([0, 1]), np.array([1, 0]))
    with pytest.raises(MiaGenError, match=match):
        build_attack(name, params)(context(MixtureDenoiser(records[:5], 0.1), records[:3], labelled_subset=subset))


@pytest.mark.parametrize("name", ["diffusion_loss", "pia", "pian", "secmi_stat", "secmi_nn"])
def test_a_gan_given_to_a_diffusion_attack_is_a_clear_error(records, name):
    gan = NoisyCopyGenerator(records[:5])
    with pytest.raises(MiaGenError, match="attacks diffusion models.*NoisyCopyGenerator.*GAN"):
        build_attack(name)(context(gan, records[:3]))
    with pytest.raises(MiaGenError, match="needs a diffusion model.*model=ddpm"):
        build_attack(name)(context(None, records[:3]))
    with pytest.raises(MiaGenError, match="attacks diffusion models"):
        denoiser_of(context(gan, records[:3]), name)


def test_secmi_nn_without_a_labelled_subset_says_so(records):
    model = MixtureDenoiser(records[:5], 0.1)
    with pytest.raises(MiaGenError, match="secmi_nn .*needs a labelled subset.*secmi_stat"):
        build_attack("secmi_nn")(context(model, records[:6]))
    with pytest.raises(MiaGenError, match="both members"):
        build_attack("secmi_nn")(context(model, records[:6], labelled_subset=(np.array([0, 1]), np.array([1, 1]))))
    with pytest.raises(MiaGenError, match=r"distinct and in \[0, 6\)"):
        build_attack("secmi_nn")(context(model, records[:6], labelled_subset=(np.array([0, 9]), np.array([1, 0]))))


def test_dropout_is_switched_off(records):
    model = UNetDenoiser()
    assert model.training
    first = build_attack("pia")(context(model, records[:4])).scores
    assert not model.training and not model.unet.training
    np.testing.assert_array_equal(build_attack("pia")(context(model, records[:4])).scores, first)


def test_the_pipeline_denoiser_is_attacked_like_the_toy(unet, records):
    """mia_gen.models.denoiser.Denoiser around the same UNet gives the same scores (to float rounding: it calls the
    network on batches of `rows_per_call` rows, the toy on the attack's 4, and CPU kernels round by batch shape)."""
    from mia_gen.models.denoiser import Denoiser

    wrapped = Denoiser(unet.unet, ddpm_alphas_cumprod(), SHAPE)
    for name in ("pia", "secmi_stat"):
        np.testing.assert_allclose(build_attack(name)(context(wrapped, records[:4])).scores,
                                   build_attack(name)(context(unet, records[:4])).scores, rtol=1e-4)


def test_images_of_the_wrong_shape_are_a_clear_error(records):
    model = MixtureDenoiser(records[:5], 0.1)
    with pytest.raises(MiaGenError, match=r"shape \(1, 4, 4\).*data.resolution"):
        build_attack("pia")(context(model, torch.zeros(3, 1, 4, 4)))


@pytest.mark.parametrize("name", ["diffusion_loss", "secmi_stat", "secmi_nn", "pia", "pian"])
def test_config_file_lists_every_parameter_with_its_default(name):
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "configs" / "attack" / f"{name}.yaml"
    params = OmegaConf.to_container(OmegaConf.load(path)[name], resolve=True)
    attack = build_attack(name, params)
    assert params.pop("_target_") == attack.config["_target_"]
    assert params == type(attack).defaults


@pytest.mark.slow
def test_a_tiny_ddpm_trained_on_members_leaks():
    """DESIGN.md sizing: 64 digit members, 16 px, UNet (32, 64), 800 steps at lr 1e-3, EMA weights (~8 min),
    trained by a plain loop here (not models/ddpm_trainer.py), GroupNorm with 8 groups.

    With diffusers' default of 32 groups (a per-channel instance norm on 32 channels) this model's
    eps(x0, 0) came out far smaller than a Gaussian's, most of all for members, and PIA's signal was
    inverted (measured: pia 0.18, pian 0.79). With 8 groups PIA works as published; PIAN, whose
    rescaling of eps0 is meant for that small-eps0 case, is then reported, not asserted.
    """
    from diffusers import UNet2DModel

    from mia_gen.datasets import load_dataset

    digits = load_dataset({"name": "digits", "resolution": 16, "channels": 1})
    order = np.random.default_rng(0).permutation(len(digits))
    members, non_members = digits.get(order[:64]), digits.get(order[64:128])
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    ema = UNet2DModel.from_config(unet.config)
    ema.load_state_dict(unet.state_dict())
    alphas = ddpm_alphas_cumprod()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(800):
        t = torch.randint(0, T, (64,), generator=generator)
        eps = torch.randn(members.shape, generator=generator)
        a = alphas[t].float().view(-1, 1, 1, 1)
        loss = ((unet(a.sqrt() * members + (1 - a).sqrt() * eps, t).sample - eps) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), unet.parameters()):
                target.lerp_(source, 1 - 0.99)

    class Trained(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.alphas_cumprod, self.num_train_timesteps = ema, alphas, T
            self.sample_shape = (1, 16, 16)

        def epsilon(self, x_t, t):
            return self.unet(x_t, t).sample

    queries = torch.cat([members, non_members])
    labels = np.r_[np.ones(64), np.zeros(64)].astype(int)
    subset = (np.r_[np.arange(13), np.arange(64, 77)], np.r_[np.ones(13), np.zeros(13)].astype(int))
    aucs = {}
    # SecMI-NNs as in experiment=ddpm_digits: the reference's ResNet-18 recipe cannot learn from 26 records
    params = {"secmi_nn": {"classifier": "small_cnn", "nn_epochs": 50, "nn_batch_size": 64}}
    for name in ("diffusion_loss", "pia", "pian", "secmi_stat", "secmi_nn"):
        output = build_attack(name, params.get(name))(context(Trained(), queries, labelled_subset=subset))
        keep = np.setdiff1d(np.arange(128), output.info.get("trained_on", []))
        aucs[name] = roc_auc_score(labels[keep], output.scores[keep])
    print("AUC", aucs)
    assert aucs["diffusion_loss"] >= 0.9 and aucs["pia"] >= 0.8, aucs
    # SecMI-NNs learn from 26 records and are evaluated on 102 (AUC's standard error ~0.05); measured 0.74 at
    # the reference's t_sec=100 (the step 90 -> 100 -> 90)
    assert aucs["secmi_nn"] >= 0.7, aucs
    # SecMI-stat's t-error separates members here, but its direction at timestep 100 depends on the small
    # model (measured at 90 -> 100 -> 90, the default: 0.74 with this loop, 0.23 with models/ddpm_trainer.py;
    # at 100 -> 110 -> 100: 0.77 and 0.21; see the README)
    assert abs(aucs["secmi_stat"] - 0.5) >= 0.2, aucs
