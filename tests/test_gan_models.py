"""GAN architectures (DCGAN, WGAN-GP), their losses and their safetensors + JSON checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from hydra.utils import instantiate

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.models import dcgan, wgan_gp
from mia_gen.models.checkpoint import load_module, save_module
from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator
from mia_gen.models.wgan_gp import WGANGPCritic, WGANGPGenerator

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
PAIRS = [(DCGANGenerator, DCGANDiscriminator), (WGANGPGenerator, WGANGPCritic)]


@pytest.mark.parametrize("gen_cls,disc_cls", PAIRS)
@pytest.mark.parametrize("resolution", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_ranges(gen_cls, disc_cls, resolution, channels):
    torch.manual_seed(0)
    g = gen_cls(latent_dim=8, resolution=resolution, channels=channels, base_channels=4).eval()
    d = disc_cls(resolution=resolution, channels=channels, base_channels=4).eval()
    z = g.sample_latent(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 8) and z.dtype == torch.float32 and z.device.type == "cpu"
    with torch.no_grad():
        x = g(z * 50)  # large codes saturate the tanh: the range must still hold
        scores = d(x)
    assert x.shape == (3, channels, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert (g.latent_dim, g.resolution, g.channels) == (8, resolution, channels)
    assert (d.resolution, d.channels) == (resolution, channels)


def test_sample_latent_is_standard_normal_and_seeded():
    g = DCGANGenerator(latent_dim=16, base_channels=4)
    z = g.sample_latent(20000, torch.Generator().manual_seed(1))
    assert torch.equal(z, g.sample_latent(20000, torch.Generator().manual_seed(1)))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_wgan_critic_has_no_batchnorm_and_is_per_sample():
    critic = WGANGPCritic(resolution=32, channels=3, base_channels=4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    # Without batch statistics, each sample's score does not depend on the rest of the batch.
    torch.testing.assert_close(critic(x)[:2], critic(x[:2]))


def test_config_carries_target_and_kwargs():
    g = WGANGPGenerator(latent_dim=12, resolution=32, channels=3, base_channels=8)
    assert g.config == {
        "_target_": "mia_gen.models.wgan_gp.WGANGPGenerator", "latent_dim": 12, "resolution": 32, "channels": 3, "base_channels": 8,
    }
    d = DCGANDiscriminator(resolution=64, channels=1, base_channels=4)
    assert d.config == {"_target_": "mia_gen.models.dcgan.DCGANDiscriminator", "resolution": 64, "channels": 1, "base_channels": 4}


@pytest.mark.parametrize("name", ["dcgan", "wgan_gp"])
def test_yaml_configs_instantiate(name):
    cfg = OmegaConf.merge(
        {"data": {"resolution": 32, "channels": 3}, "seed": 7}, {"model": OmegaConf.load(CONFIG_DIR / f"{name}.yaml")}
    )
    g, d = instantiate(cfg.model.generator), instantiate(cfg.model.discriminator)
    assert (g.resolution, g.channels, d.resolution, d.channels) == (32, 3, 32, 3)
    assert g.config == OmegaConf.to_container(cfg.model.generator, resolve=True)
    training = cfg.model.training
    assert training.loss == name and training.seed == 7 and isinstance(training.lr_g, float)
    if name == "wgan_gp":  # Gulrajani et al., 2017, Algorithm 1 defaults
        assert (training.lr_g, list(training.betas), training.n_critic, training.gp_weight) == (1e-4, [0.0, 0.9], 5, 10.0)


@pytest.mark.parametrize("gen_cls,disc_cls", PAIRS)
def test_save_load_round_trip(tmp_path, gen_cls, disc_cls):
    torch.manual_seed(0)
    g = gen_cls(latent_dim=8, resolution=16, channels=3, base_channels=4)
    d = disc_cls(resolution=16, channels=3, base_channels=4)
    g(g.sample_latent(16))  # move BatchNorm running statistics away from their initial values
    save_module(g, tmp_path, "generator")
    save_module(d, tmp_path, "discriminator")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "discriminator.json", "discriminator.safetensors", "generator.json", "generator.safetensors",
    ]
    assert json.loads((tmp_path / "generator.json").read_text()) == g.config
    g2, d2 = load_module(tmp_path, "generator"), load_module(tmp_path, "discriminator")
    assert type(g2) is gen_cls and type(d2) is disc_cls and not g2.training
    z = g.sample_latent(4, torch.Generator().manual_seed(3))
    g.eval(), d.eval()
    with torch.no_grad():
        assert torch.equal(g(z), g2(z))
        assert torch.equal(d(g(z)), d2(g(z)))


def test_dcgan_losses_match_hand_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    sigmoid = torch.sigmoid
    expected_d = -(torch.log(sigmoid(real)).mean() + torch.log(1 - sigmoid(fake)).mean())
    torch.testing.assert_close(dcgan.discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(dcgan.generator_loss(fake), -torch.log(sigmoid(fake)).mean())


def test_gradient_penalty_of_linear_critic_is_hand_computed():
    # D(x) = <w, x> has gradient w everywhere, so the penalty is (||w|| - 1)^2 whatever eps is.
    w = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def critic(x):
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    gp = wgan_gp.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    torch.testing.assert_close(wgan_gp.critic_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])), torch.tensor(-1.5))
    torch.testing.assert_close(wgan_gp.generator_loss(torch.tensor([1.0, 3.0])), torch.tensor(-2.0))


def test_gradient_penalty_matches_finite_differences():
    """The autograd gradient norm of a real critic at x_hat, against central finite differences."""
    torch.manual_seed(0)
    critic = WGANGPCritic(resolution=16, channels=1, base_channels=2).double()
    real, fake = torch.rand(2, 1, 16, 16).double() * 2 - 1, torch.rand(2, 1, 16, 16).double() * 2 - 1
    gp = wgan_gp.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(5))
    eps = torch.rand(2, 1, 1, 1, generator=torch.Generator().manual_seed(5)).double()
    x_hat = eps * real + (1 - eps) * fake
    basis = torch.eye(256, dtype=torch.float64).view(256, 1, 16, 16) * 1e-6  # one pixel nudged per row
    with torch.no_grad():  # central differences; the critic has no batch statistics, so rows are independent
        norms = [((critic(x + basis) - critic(x - basis)) / 2e-6).norm() for x in x_hat]
    torch.testing.assert_close(gp, ((torch.stack(norms) - 1) ** 2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [DCGANGenerator, WGANGPGenerator, DCGANDiscriminator, WGANGPCritic])
def test_bad_resolution_and_channels_name_allowed_values(cls):
    with pytest.raises(MiaGenError, match=r"allowed values are \[16, 32, 64\].*data.resolution"):
        cls(resolution=28)
    with pytest.raises(MiaGenError, match=r"allowed values are \[16, 32, 64\]"):
        cls(resolution=16.0)
    with pytest.raises(MiaGenError, match=r"allowed values are \[1, 3\].*data.channels"):
        cls(channels=4)
    with pytest.raises(MiaGenError, match="base_channels must be a positive integer"):
        cls(base_channels=0)


def test_wrong_input_shapes_say_what_to_change():
    g = DCGANGenerator(latent_dim=8, base_channels=4)
    with pytest.raises(MiaGenError, match=r"\(N, 8\).*sample_latent"):
        g(torch.randn(2, 9))
    d = DCGANDiscriminator(resolution=16, channels=1, base_channels=4)
    with pytest.raises(MiaGenError, match="data.channels / data.resolution"):
        d(torch.zeros(2, 3, 16, 16))


def test_missing_checkpoint_says_train_first(tmp_path):
    with pytest.raises(MissingAssetError, match=r"generator\.json.*mia-gen-train.*model\.checkpoint="):
        load_module(tmp_path, "generator")
    save_module(DCGANGenerator(base_channels=4), tmp_path, "generator")
    (tmp_path / "generator.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"generator\.safetensors"):
        load_module(tmp_path, "generator")


@pytest.mark.parametrize("target", ["os.system", "torch.nn.Linear", "mia_gen.models.dcgan.nn.Linear", "mia_gen.models.dcgan.F"])
def test_target_outside_models_package_is_refused(tmp_path, target):
    save_module(DCGANGenerator(base_channels=4), tmp_path, "generator")
    config = json.loads((tmp_path / "generator.json").read_text())
    (tmp_path / "generator.json").write_text(json.dumps({**config, "_target_": target}))
    with pytest.raises(MiaGenError, match="models"):
        load_module(tmp_path, "generator")


def test_weights_of_another_model_are_reported_as_corrupt(tmp_path):
    save_module(DCGANGenerator(base_channels=4), tmp_path, "generator")
    save_module(DCGANGenerator(base_channels=8), tmp_path / "other", "generator")
    (tmp_path / "other" / "generator.safetensors").replace(tmp_path / "generator.safetensors")
    with pytest.raises(MiaGenError, match="retrain"):
        load_module(tmp_path, "generator")


def test_module_without_config_cannot_be_saved(tmp_path):
    with pytest.raises(MiaGenError, match="config"):
        save_module(torch.nn.Linear(2, 2), tmp_path, "linear")
    assert not any(tmp_path.iterdir())


def test_no_temporary_files_are_left(tmp_path):
    save_module(DCGANGenerator(base_channels=4), tmp_path, "generator")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.json", "generator.safetensors"]
