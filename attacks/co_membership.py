"""Co-membership inference (Liu et al., "Performing Co-Membership Attacks Against Deep Generative
Models", ICDM'19): encoder-initialised latent inversion, decided for groups of n targets.

1. An encoder E is trained to invert G on generated pairs: minimise ||E(G(z)) - z||^2 over fresh
   z ~ p(z) (the attacker needs only G; no real record is used).
2. Each target starts from z0 = E(x) and is refined by the `latent_inversion` objective (L2 +
   lambda_lpips * LPIPS + lambda_z * (||z||^2 - dim)^2); its score is minus the reconstruction distance.
3. A group of n targets is decided jointly, by the mean of its members' scores: the question is
   "were all n of these records in the training set?" Averaging over the group sharpens the
   signal as n grows. The evaluate stage (which alone sees labels) draws `n_groups` groups of
   n members and of n non-members from the split for each n in `group_sizes` and reports
   the AUC against n (`results.json: group_auc`, `group_auc.png`).

With n = 1 this is single-target inversion started at E(x).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from attacks.latent_inversion import ReconstructionObjective, check_weights, generator_with_latents, invert, lpips_for
from mia_gen.errors import MiaGenError


class LatentEncoder(nn.Module):
    """Images `(N, C, H, W)` -> latents `(N, latent_dim)`: stride-2 convolutions down to 4x4, then a linear map."""

    def __init__(self, channels: int, resolution: int, latent_dim: int, width: int = 64):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise MiaGenError(f"the co-membership encoder needs a power-of-two resolution >= 4, got {resolution}.")
        layers, c_in, size = [], channels, resolution
        c_out = width
        while size > 4:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in, c_out, size = c_out, min(c_out * 2, 8 * width), size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * size * size, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train_encoder(generator: nn.Module, image_shape: tuple[int, ...], steps: int, batch_size: int, lr: float,
                  seed: int, device: torch.device) -> tuple[LatentEncoder, float]:
    """Fit E to invert G on fresh generated pairs; returns `(E in eval mode, final mean squared latent error)`."""
    channels, resolution = image_shape[0], image_shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LatentEncoder(channels, resolution, generator.latent_dim).to(device)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        z = generator.sample_latent(batch_size, rng).to(device)
        with torch.no_grad():
            x = generator(z)
        loss = (encoder(x) - z).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return encoder.eval().requires_grad_(False), float(loss.detach())


@register_attack
class CoMembership(Attack):
    name = "co_membership"
    access = Access.WHITE_BOX
    defaults = {
        "group_sizes": [1, 2, 4, 8, 16],  # n: targets decided together
        "n_groups": 200,  # groups of members and of non-members drawn per n at evaluation
        "encoder_steps": 1500,  # encoder training steps on generated (z, G(z)) pairs
        "encoder_batch_size": 128,
        "encoder_lr": 1.0e-3,
        "optimizer": "lbfgs",  # refinement from E(x): lbfgs | adam
        "iterations": 50,
        "lr": 0.05,  # Adam's step size
        "lambda_lpips": 0.2,
        "lambda_z": 0.001,
        "lpips_net": "vgg",
        "lpips_resize": 64,
        "allow_random_backbone": False,  # tests only
        "batch_size": 1024,
    }

    def group_size_list(self) -> list[int]:
        sizes = list(self.group_sizes) if isinstance(self.group_sizes, (list, tuple)) else [self.group_sizes]
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise MiaGenError(f"{self.name}: group_sizes must be positive integers, got {self.group_sizes!r}.")
        return sorted(set(sizes))

    def check_split_sizes(self, n_members: int, n_non_members: int) -> None:
        largest = max(self.group_size_list())
        if largest > min(n_members, n_non_members):
            raise MiaGenError(
                f"{self.name}: a group of n={largest} needs at least {largest} members and {largest} non-members, "
                f"but the split has {n_members} and {n_non_members}; lower attack.{self.name}.group_sizes or "
                "enlarge the split."
            )

    def encoder(self, generator: nn.Module, context: AttackContext) -> tuple[LatentEncoder, float]:
        steps = check_positive_int(self.encoder_steps, "encoder_steps", self.name)
        batch_size = check_positive_int(self.encoder_batch_size, "encoder_batch_size", self.name)
        return train_encoder(generator, tuple(context.queries.shape[1:]), steps, batch_size,
                             float(self.encoder_lr), int(context.seed), context.device)

    def score(self, context: AttackContext) -> AttackOutput:
        check_weights(self)
        sizes = self.group_size_list()
        check_positive_int(self.n_groups, "n_groups", self.name)
        generator = generator_with_latents(context, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        encoder, encoder_loss = self.encoder(generator, context)
        with torch.no_grad():
            queries = context.queries.float().to(context.device)
            z0 = torch.cat([encoder(queries[s : s + batch_size]) for s in range(0, len(queries), batch_size)])
        objective = ReconstructionObjective(generator, context.queries, self.lambda_lpips, self.lambda_z,
                                            lpips_for(self, context.device), context.device)
        distance, _, evaluations = invert(objective, z0, self.optimizer, self.iterations, self.lr, batch_size)
        info = {"group_sizes": sizes, "n_groups": int(self.n_groups), "encoder_latent_mse": encoder_loss,
                "loss_evaluations_per_start": evaluations, "mean_distance": float(distance.mean())}
        return AttackOutput(scores=(-distance.double()).cpu().numpy().astype(np.float64), info=info)
