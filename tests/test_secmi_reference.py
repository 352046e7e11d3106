"""Reference fidelity on a diffusers DDPM pipeline that mia-gen did not train (issue 10, criterion 5).

A tiny `UNet2DModel` + `DDPMScheduler` is trained a few steps by a plain loop here and saved with
`DDPMPipeline.save_pretrained`; mia-gen loads it as the CLI does (`model=diffusers
model.checkpoint=<dir>`). The default `secmi_stat`, `pia` and `pian` scores must equal plain
re-implementations of the reference code, written below from its formulas and fed the UNet and
`alphas_cumprod` that diffusers itself reads back from the directory:
- SecMI (Duan et al., `mia_evals/secmia.py`): `get_intermediate_results` inverts x0 with DDIM
  steps along range(0, t_sec, k) (first step from t_c=0), then one step out to the last of them
  + k and one back; `naive_statistic_attack` sums the squared difference over pixels. Coefficients
  in float32, as its `extract`; no clipping.
- PIA / PIAN (Kong et al., `DDPM/components.py`): eps0 = eps(x0, 0) (PIAN: / mean|eps0| *
  sqrt(2/pi)), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, distance sum |eps0 - eps(x_t, t)|^4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy.stats import spearmanr

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.experiments.pipeline import Pipeline

TINY_UNET = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, dropout=0.1,  # dropout: the attacks must run the model in eval mode
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def records():
    """24 RGB images in [-1, 1], 16 px; the first 12 are the ones the model is trained on."""
    return torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def pipeline_dir(records, tmp_path_factory):
    """A DDPM pipeline directory trained outside mia-gen: 10 Adam steps of the epsilon loss."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    members = records[:12]
    for _ in range(10):
        t = torch.randint(0, 1000, (len(members),), generator=generator)
        noise = torch.randn(members.shape, generator=generator)
        loss = ((unet(scheduler.add_noise(members, noise, t), t).sample - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("external") / "ddpm-pipeline"
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def read_back(pipeline_dir):
    """The UNet (eval mode) and float32 alphas_cumprod as diffusers reads the directory, without mia-gen."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline_dir)
    return pipe.unet.eval(), pipe.scheduler.alphas_cumprod.float()


@pytest.fixture(scope="module")
def cli_context(pipeline_dir, records, tmp_path_factory):
    """The attack context of `mia-gen model=diffusers model.checkpoint=<dir>`: the pipeline's denoiser."""
    cache = tmp_path_factory.mktemp("cache")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=diffusers", f"model.checkpoint={pipeline_dir}", "device=cpu",
                                           "logger=none", f"cache_dir={cache}"])
    denoiser = Pipeline(cfg, cache / "run").denoiser
    return AttackContext(queries=records, record_ids=np.arange(len(records)), denoiser=denoiser)


# ---- the reference code's loops, re-implemented plainly -------------------------------------------


def reference_eps(unet, x, t):
    with torch.no_grad():
        return unet(x, torch.full((len(x),), t, dtype=torch.long)).sample


def reference_ddim_step(unet, alphas, x, t_c, t_target):
    """SecMI's `ddim_singlestep`: one deterministic DDIM step from t_c to t_target, unclipped."""
    eps = reference_eps(unet, x, t_c)
    pred_x0 = (x - (1 - alphas[t_c]).sqrt() * eps) / alphas[t_c].sqrt()
    return alphas[t_target].sqrt() * pred_x0 + (1 - alphas[t_target]).sqrt() * eps


def reference_secmi(unet, alphas, x0, t_sec=100, k=10):
    """(maps |x_sec - x_sec_recon| `(N, C, H, W)`, t-errors `(N,)`) as the reference script computes them."""
    target_steps = list(range(0, t_sec, k))[1:]
    x_sec, t_c = x0, 0
    for t_target in target_steps:  # `ddim_multistep(model, FLAGS, x, t_c=0, target_steps=target_steps)`
        x_sec = reference_ddim_step(unet, alphas, x_sec, t_c, t_target)
        t_c = t_target
    t_last = target_steps[-1]
    recon = reference_ddim_step(unet, alphas, x_sec, t_last, t_last + k)
    recon = reference_ddim_step(unet, alphas, recon, t_last + k, t_last)
    return (x_sec - recon).abs(), ((x_sec - recon) ** 2).flatten(1).sum(dim=-1)


def reference_pia(unet, alphas, x0, t=200, lp=4, normalised=False):
    """PIA's distance sum |eps0 - eps(x_t, t)|^lp `(N,)` (smaller = member)."""
    eps0 = reference_eps(unet, x0, 0)
    if normalised:
        eps0 = eps0 / eps0.abs().mean(dim=(1, 2, 3), keepdim=True) * (2 / math.pi) ** 0.5
    x_t = alphas[t] ** 0.5 * x0 + (1 - alphas[t]) ** 0.5 * eps0
    return ((eps0 - reference_eps(unet, x_t, t)).abs() ** lp).flatten(1).sum(dim=-1)


def assert_same_ranking_and_values(scores, expected):
    assert spearmanr(scores, expected).statistic >= 0.999
    np.testing.assert_allclose(scores, expected, rtol=1e-4)  # float32 coefficients there, float64 here


# ---- the tests ------------------------------------------------------------------------------------


def test_default_secmi_stat_is_the_reference_t_error(cli_context, read_back, records):
    unet, alphas = read_back
    _, t_errors = reference_secmi(unet, alphas, records)
    output = build_attack("secmi_stat")(cli_context)
    assert output.info["t_measured"] == 90  # the reference's t_sec=100: 90 -> 100 -> 90
    assert_same_ranking_and_values(-output.scores, t_errors.double().numpy())
    # the other convention names the step measured: t_sec=90 there is the same attack
    measured = build_attack("secmi_stat", {"t_sec": 90, "timestep_convention": "measured"})(cli_context)
    np.testing.assert_allclose(measured.scores, output.scores, rtol=1e-6)
    # ... and t_sec=100 there is the reference's t_sec=110, not its default
    shifted = build_attack("secmi_stat", {"timestep_convention": "measured"})(cli_context)
    assert_same_ranking_and_values(-shifted.scores, reference_secmi(unet, alphas, records, t_sec=110)[1].numpy())
    assert not np.allclose(shifted.scores, output.scores, rtol=1e-3)


def test_secmi_nn_learns_from_the_reference_maps(cli_context, read_back, records):
    """The NNs attack's inputs are the reference's |x_sec - x_sec_recon| maps (C channels, unnormalised)."""
    unet, alphas = read_back
    maps, _ = reference_secmi(unet, alphas, records)
    attack = build_attack("secmi_nn")
    ours = attack.t_error_maps(cli_context, [attack.measured_timestep(attack.t_sec)])[:, 0]
    np.testing.assert_allclose(ours.numpy(), maps.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["pia", "pian"])
def test_default_pia_and_pian_are_the_reference_distance(cli_context, read_back, records, name):
    unet, alphas = read_back
    distance = reference_pia(unet, alphas, records, normalised=name == "pian").double().numpy()
    scores = build_attack(name)(cli_context).scores
    # mia-gen reports -||.||_4; the reference ranks by the 4th power: the same order
    assert_same_ranking_and_values(-scores, distance ** 0.25)


def test_resnet18_is_the_reference_cifar_resnet():
    """Duan et al.'s `resnet.ResNet18(num_channels=3, num_classes=1)`: 3x3 stride-1 first conv, no
    max-pool, 11,169,345 parameters (the CIFAR ResNet-18's 11,173,962 with one output instead of 10)."""
    from mia_gen.attacks.secmi import ResNet18

    net = ResNet18(3)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962 - 9 * 513
    conv1 = net.net.conv1
    assert (conv1.in_channels, conv1.kernel_size, conv1.stride, conv1.bias) == (3, (3, 3), (1, 1), None)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2,)
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2,)  # smaller maps too (the reference's fixed pool fails)


def test_secmi_nn_scores_are_seeded_and_do_not_depend_on_unlabelled_company(cli_context, records):
    """The classifier is a function of (labelled maps, seed); every record is scored in eval mode."""
    labelled = (np.array([0, 1, 2, 3, 12, 13, 14, 15]), np.array([1, 1, 1, 1, 0, 0, 0, 0]))
    attack = build_attack("secmi_nn", {"nn_epochs": 2})

    def scores(n, seed):
        context = AttackContext(queries=records[:n], record_ids=np.arange(n), denoiser=cli_context.denoiser,
                                labelled_subset=labelled, seed=seed)
        return attack(context).scores

    everyone = scores(24, seed=0)
    np.testing.assert_allclose(scores(16, seed=0), everyone[:16], rtol=1e-5, atol=1e-7)
    assert not np.allclose(scores(24, seed=1), everyone)


@pytest.mark.parametrize("overrides,classifier", [
    (["experiment=secmi_cifar10"], "resnet18"), (["experiment=pia_cifar10"], None),
    (["experiment=ddpm_digits"], "small_cnn"),  # the reference recipe cannot learn from 64 records (its config)
    (["experiment=defense_benchmark", "model=ddpm"], None),
])
def test_presets_run_secmi_as_the_reference_does(overrides, classifier):
    """The CIFAR-10 protocols and the digit tables run SecMI at the paper's a-priori setting, in the
    reference code's convention, and SecMI-NNs with its ResNet-18 on CIFAR-10: nothing tuned on evaluated
    records."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        attacks = compose("config", overrides=overrides).attack
    assert "secmi_stat" in attacks
    for name in ("secmi_stat", "secmi_nn"):
        if name in attacks:
            attack = build_attack(name, dict(attacks[name]))
            assert (attack.t_sec, attack.k, attack.timestep_convention, attack.sweep_timesteps) == (
                100, 10, "reference", None)
            assert getattr(attack, "classifier", None) == (classifier if name == "secmi_nn" else None)
    assert ("secmi_nn" in attacks) == (classifier is not None)
