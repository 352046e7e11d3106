"""WGAN-GP (Gulrajani et al., 2017): Wasserstein critic trained with a gradient penalty.

The generator is the DCGAN generator (the paper's DCGAN-architecture experiments). The critic is
the DCGAN discriminator with BatchNorm replaced by layer normalisation, because the penalty is
taken per sample and batch statistics would couple the samples (paper, sec. 4, "No critic batch
normalization").
"""

import torch
from torch import nn

from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator


class WGANGPGenerator(DCGANGenerator):
    """`forward(z)`: z `(N, latent_dim)` -> images `(N, channels, resolution, resolution)` in [-1, 1] (tanh)."""


class WGANGPCritic(DCGANDiscriminator):
    """`forward(x)`: images `(N, channels, resolution, resolution)` in [-1, 1] -> critic values `(N,)`, higher = "real"."""

    def _norm(self, num_channels: int) -> nn.Module:
        # One group = layer norm over (C, H, W) of each sample, with a per-channel affine.
        return nn.GroupNorm(1, num_channels)


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Negative Wasserstein estimate E[D(G(z))] - E[D(x)] (paper, eq. 3 without the penalty), `(N,)` -> scalar."""
    return fake_scores.mean() - real_scores.mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))] (paper, Algorithm 1, line 11), `(N,)` -> scalar."""
    return -fake_scores.mean()


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator | None = None
) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1] per sample (paper, eq. 3).

    real, fake: `(N, C, H, W)` on the critic's device. `rng` is a CPU generator (eps is drawn on CPU so
    the run is the same on any device). Returns a scalar that keeps the graph (create_graph=True).
    """
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=rng).to(real.device, real.dtype)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
