"""DiffusionSampler: DDIM / DDPM against closed forms and diffusers' scheduler, determinism, errors."""

import pytest
import torch
from diffusers import DDIMScheduler

from mia_gen.errors import MiaGenError
from mia_gen.sample_store import write_samples
from mia_gen.models.denoiser import Denoiser
from mia_gen.models.diffusion_sampling import DiffusionSampler, ddim_timesteps

T = 1000
ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
SHAPE = (1, 4, 4)
X0 = torch.linspace(-0.9, 0.9, 16).view(SHAPE)  # the single training point


class PointMassEps(torch.nn.Module):
    """The exact epsilon of data concentrated on X0: (x_t - sqrt(a_t) X0) / sqrt(1 - a_t); records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        a = ALPHAS[t].view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * X0) / (1 - a).sqrt()


class LinearEps(torch.nn.Module):
    def forward(self, x, t):
        return 0.5 * x + 1e-4 * t.view(-1, 1, 1, 1)


def point_mass_sampler(sampler="ddim", steps=10, eta=None, rows=16):
    """rows: the Denoiser's rows per network call; the tests that read `network.calls` as the whole batch at one
    step draw exactly that many samples."""
    network = PointMassEps()
    return DiffusionSampler(Denoiser(network, ALPHAS, SHAPE, micro_batch=rows), sampler, steps, eta), network


def test_timesteps_follow_diffusers_leading_spacing():
    scheduler = DDIMScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(50)
    assert ddim_timesteps(T, 50) == scheduler.timesteps.tolist()


def test_ddim_point_mass_closed_form():
    """With the exact epsilon of a point mass, DDIM keeps eps constant: x_t = sqrt(a_t) X0 + sqrt(1-a_t) eps_T."""
    sampler, network = point_mass_sampler("ddim", steps=10, rows=5)
    z = sampler.sample_latent(5, torch.Generator().manual_seed(0))
    out = sampler(z)
    assert torch.allclose(out, X0.expand(5, *SHAPE), atol=1e-5)
    x_T, t_first = z.view(5, *SHAPE).double(), sampler.timesteps[0]
    eps_T = (x_T - ALPHAS[t_first].sqrt() * X0) / (1 - ALPHAS[t_first]).sqrt()
    assert [int(t[0]) for _, t in network.calls] == sampler.timesteps
    for x, t in network.calls:
        a = ALPHAS[int(t[0])]
        assert torch.allclose(x.double(), a.sqrt() * X0 + (1 - a).sqrt() * eps_T, atol=1e-4)


def test_ddim_matches_diffusers_without_clipping():
    steps, n = 20, 3
    sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), "ddim", steps)
    z = sampler.sample_latent(n, torch.Generator().manual_seed(1))
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, clip_sample=False,
                              set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    x = z.view(n, *SHAPE)
    for t in scheduler.timesteps:
        x = scheduler.step(LinearEps()(x, t.expand(n)), t, x, eta=0.0).prev_sample
    assert torch.allclose(sampler(z), x.clamp(-1, 1), atol=1e-5)


def test_ddpm_point_mass_marginals_and_end_point():
    """Ancestral sampling keeps x_t ~ N(sqrt(a_t) X0, (1 - a_t) I) when the epsilon is exact, and ends at X0."""
    sampler, network = point_mass_sampler("ddpm", steps=10, rows=4000)
    z = sampler.sample_latent(4000, torch.Generator().manual_seed(2))
    out = sampler(z)
    assert torch.allclose(out, X0.expand(4000, *SHAPE), atol=1e-4)
    for x, t in network.calls[1:]:
        a = ALPHAS[int(t[0])].item()
        mean = x.mean(0) / a**0.5
        assert torch.allclose(mean, X0, atol=4 * ((1 - a) / a / 4000) ** 0.5 + 1e-3)
        assert abs(x.var(0).mean().item() - (1 - a)) < 0.05 * (1 - a) + 1e-4


def test_ddpm_sample_depends_on_its_z_only():
    sampler, _ = point_mass_sampler("ddpm", steps=5)
    sampler.denoiser.network = LinearEps()
    z = sampler.sample_latent(6, torch.Generator().manual_seed(3))
    whole = sampler(z)
    assert torch.equal(whole, torch.cat([sampler(z[:2]), sampler(z[2:])]))
    assert torch.equal(sampler(z.flip(0)), whole.flip(0))
    deterministic = DiffusionSampler(sampler.denoiser, "ddim", 5)(z)
    assert not torch.allclose(whole, deterministic)  # the extra noise is really there


def test_store_of_diffusion_samples_is_deterministic(tmp_path):
    sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), "ddpm", steps=4)

    def sample_fn(n, rng):
        z = sampler.sample_latent(n, rng)
        return sampler(z), z  # 3 shards, samples + latents each

    stores = [write_samples(tmp_path / name, sample_fn, 10, shard_size=4, seed=0, storage_dtype="float32",
                            progress=False) for name in ("a", "b")]
    assert sampler.latent_dim == 16
    shards = [sorted(store.path.glob("shard_*.npy")) for store in stores]
    assert len(shards[0]) == 6 and [p.name for p in shards[0]] == [p.name for p in shards[1]]
    for a, b in zip(*shards):
        assert a.read_bytes() == b.read_bytes()


def test_output_is_clamped_images():
    sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), "ddim", steps=3)
    out = sampler(sampler.sample_latent(4, torch.Generator().manual_seed(0)) * 10)
    assert out.shape == (4, *SHAPE) and out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sampler": "euler"}, "use one of"),
        ({"steps": 0}, r"integer in \[1, 1000\]"),
        ({"steps": 1001}, r"integer in \[1, 1000\]"),
        ({"sampler": "ddpm", "eta": 0.5}, "use sampler=ddim"),
        ({"eta": 1.5}, r"eta must lie in \[0, 1\]"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(MiaGenError, match=message):
        DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), **kwargs)


def test_wrong_latent_shape():
    sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), "ddim", steps=2)
    with pytest.raises(MiaGenError, match=r"\(N, 16\)"):
        sampler(torch.zeros(2, 15))


def test_sampler_exposes_the_denoiser_interface():
    denoiser = Denoiser(LinearEps(), ALPHAS, SHAPE)
    sampler = DiffusionSampler(denoiser, "ddim", steps=2)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler.epsilon(x, torch.tensor([3, 4])), 0.5 * x + 1e-4 * torch.tensor([3.0, 4.0]).view(-1, 1, 1, 1))
    assert sampler.alphas_cumprod is denoiser.alphas_cumprod and sampler.num_train_timesteps == T


def test_unconditional_samples_are_bitwise_the_loop_before_conditions_existed():
    """The unconditional pixel path keeps its exact float32 arithmetic (stores sampled before stay valid)."""
    for name in ("ddim", "ddpm"):
        sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), name, steps=4)
        z = sampler.sample_latent(3, torch.Generator().manual_seed(5))
        import hashlib  # each row's noise generator: seeded by the first 8 bytes of the sha256 of the row

        x = z.view(-1, *SHAPE)
        rngs = [torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(row.numpy().tobytes()).digest()[:8],
                                                             "little")) for row in z]
        for i, t in enumerate(sampler.timesteps):
            a_t = ALPHAS[t]
            a_prev = ALPHAS[sampler.timesteps[i + 1]] if i + 1 < 4 else torch.tensor(1.0, dtype=torch.float64)
            eps = LinearEps()(x, torch.full((3,), t, dtype=torch.int64))
            x0 = (x - (1 - a_t).sqrt().item() * eps) / a_t.sqrt().item()
            sigma = sampler.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt().item()
            x = a_prev.sqrt().item() * x0 + max(1 - a_prev.item() - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.stack([torch.randn(SHAPE, generator=g) for g in rngs])
        assert torch.equal(sampler(z), x.clamp(-1, 1)) and torch.equal(sampler(z, None), sampler(z))


def test_a_condition_for_an_unconditional_model_is_refused():
    sampler = DiffusionSampler(Denoiser(LinearEps(), ALPHAS, SHAPE), "ddim", steps=2)
    with pytest.raises(MiaGenError, match="unconditional"):
        sampler(torch.zeros(2, 16), torch.tensor([0, 1]))
