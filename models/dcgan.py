"""DCGAN (Radford et al., 2016): transposed-conv generator, strided-conv discriminator, BCE loss.

Sizes: the generator projects `z` to a 4x4 map with `base_channels * 2**(k-1)` channels and
doubles the resolution k times (k = 2, 3, 4 for 16, 32, 64 px), halving the channels each time;
the discriminator mirrors it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mia_gen.models.gan import BASE_FEATURE_SIZE, Discriminator, Generator, num_scale_stages


def _dcgan_init(module: nn.Module) -> None:
    """Weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02) (Radford et al., 2016, sec. 4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(Generator):
    """`forward(z)`: z `(N, latent_dim)` -> images `(N, channels, resolution, resolution)` in [-1, 1] (tanh)."""

    def __init__(self, latent_dim: int = 32, resolution: int = 16, channels: int = 1, base_channels: int = 64) -> None:
        super().__init__(latent_dim=latent_dim, resolution=resolution, channels=channels, base_channels=base_channels)
        stages = num_scale_stages(resolution)
        widths = [base_channels * 2 ** (stages - 1 - i) for i in range(stages)]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], BASE_FEATURE_SIZE, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_latent(z)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(Discriminator):
    """`forward(x)`: images `(N, channels, resolution, resolution)` in [-1, 1] -> logits `(N,)`, higher = "real".

    Subclasses change only the normalisation layer (`_norm`).
    """

    def __init__(self, resolution: int = 16, channels: int = 1, base_channels: int = 64) -> None:
        super().__init__(resolution=resolution, channels=channels, base_channels=base_channels)
        stages = num_scale_stages(resolution)
        widths = [base_channels * 2**i for i in range(stages)]
        # No normalisation on the first layer (Radford et al., 2016, sec. 3).
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=self.inplace_activations)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), self._norm(c_out), nn.LeakyReLU(0.2, inplace=self.inplace_activations)]
        layers += [nn.Conv2d(widths[-1], 1, BASE_FEATURE_SIZE, 1, 0)]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    inplace_activations = True

    def _norm(self, num_channels: int) -> nn.Module:
        return nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        return self.net(x).view(x.shape[0])


class DCGANDiscriminatorGroupNorm(DCGANDiscriminator):
    """The DCGAN discriminator with GroupNorm (8 groups or fewer) instead of BatchNorm: each sample is
    normalised on its own, so it has per-sample gradients, as DP-SGD needs (as in Opacus' DP-GAN).
    Its activations are not in place: Opacus' backward hooks forbid modifying their outputs."""

    inplace_activations = False

    def _norm(self, num_channels: int) -> nn.Module:
        return nn.GroupNorm(min(8, num_channels), num_channels)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE of the discriminator: -log D(x) - log(1 - D(G(z))), logits `(N,)` -> scalar."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(G(z)) (Goodfellow et al., 2014, sec. 3), logits `(N,)` -> scalar."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
