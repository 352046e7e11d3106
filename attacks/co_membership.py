"""Co-membership inference (Liu et al., "Performing Co-Membership Attacks Against Deep Generative
Models", ICDM'19): an attacker network is refined on a group's n targets jointly, and the group is
decided by the mean distance of its targets to their reconstructions through the refined network.

1. An encoder E (the attacker network) is trained to invert G on generated pairs: minimise
   ||E(G(z)) - z||^2 over fresh z ~ p(z) (the attacker needs only G; no real record is used).
2. Per group of n targets (`AttackContext.groups`: drawn by the pipeline, all members or all
   non-members, disjoint within a size, unlabelled here), a copy of E is fine-tuned by Adam for `refine_steps` steps to
   minimise the group's mean reconstruction loss (the `latent_inversion` objective: L2 +
   lambda_lpips * LPIPS + lambda_z * (||z||^2 - dim)^2 of G(E(x_i))). The n targets share one
   network, so they are inverted together: what G memorised, one network can map back at once.
3. The group is decided on the jointly refined reconstruction, as Liu et al. decide it: its score is
   minus the mean of the n distances between x_i and G(E_group(x_i)) (`info["group_scores"]`, one per
   group, keyed by n). With `per_record_search=true` each target's latent is instead optimised alone
   from E_group(x_i) first (the GAN-Leaks search, version 2's default); that makes the reconstruction
   individual again, so it is an explicit option, not the paper's decision.

The per-record scores (`scores`) are the inversion started at the pre-trained E(x), each record
alone; `evaluate` averages them over the same groups as the baseline the joint attack is compared to.
With `per_record_search=true` and `refine_steps=0` a group's score is exactly that average; with
n = 1 the refinement is a per-record inversion over the encoder's weights.
Groups are batched: each group gets its own copy of E (`torch.func.vmap`), and Adam acts element by
element, so a group's score does not depend on which groups share its batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen.attacks.latent_inversion import (ReconstructionObjective, best_over_restarts, check_weights,
                                              generator_with_latents, invert, lpips_for)
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


# Each group fine-tunes its own copy of the encoder: at most this many copied parameters at once
# (x4 with the gradients and Adam's two moments: 256 MB of float32).
PARAMETERS_PER_CHUNK = 2**24


def refine_jointly(encoder: LatentEncoder, objective: ReconstructionObjective, group_size: int, steps: int,
                   lr: float, groups_per_chunk: int) -> torch.Tensor:
    """Liu et al.'s joint step: the targets of `objective` `(G * n, C, H, W)` form G consecutive groups of
    n = `group_size`; per group, a copy of `encoder` is fine-tuned by Adam for `steps` steps on the group's
    mean reconstruction loss. Returns the refined encodings `(G * n, latent_dim)` (E itself is unchanged)."""
    targets = objective.targets
    n_groups = len(targets) // group_size
    encode = torch.func.vmap(lambda params, x: torch.func.functional_call(encoder, params, (x,)))
    refined = []
    for start in range(0, n_groups, groups_per_chunk):
        g = min(groups_per_chunk, n_groups - start)
        index = torch.arange(start * group_size, (start + g) * group_size, device=targets.device)
        x = targets[index].reshape(g, group_size, *targets.shape[1:])
        params = {name: p.detach().expand(g, *p.shape).clone().requires_grad_(True)
                  for name, p in encoder.named_parameters()}
        optimiser = torch.optim.Adam(list(params.values()), lr=lr)  # element-wise: the groups stay independent
        for _ in range(steps):
            z = encode(params, x).reshape(g * group_size, -1)
            loss = objective(z, index).reshape(g, group_size).mean(1).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            refined.append(encode(params, x).reshape(g * group_size, -1))
    return torch.cat(refined)


@register_attack
class CoMembership(Attack):
    name = "co_membership"
    access = Access.WHITE_BOX
    # 3: a group is decided on its jointly refined reconstruction (the per-record search is the option
    #    per_record_search); 2: refined jointly, then searched per record; 1: averaged per-record scores
    version = 3
    defaults = {
        "group_sizes": [1, 2, 4, 8, 16],  # n: targets decided together
        "n_groups": 200,  # at most this many disjoint groups of members (and of non-members) per n
        "encoder_steps": 1500,  # encoder training steps on generated (z, G(z)) pairs
        "encoder_batch_size": 128,
        "encoder_lr": 1.0e-3,
        "refine_steps": 50,  # Adam steps fine-tuning the encoder on a group's n targets jointly
        "refine_lr": 1.0e-4,
        "per_record_search": False,  # true: search each target's latent from the refined E(x) before deciding
        "optimizer": "lbfgs",  # latent optimisation from E(x): lbfgs | adam
        "iterations": 50,
        "lr": 0.05,  # Adam's step size for the latent optimisation
        "lambda_lpips": 0.2,
        "lambda_z": 0.001,
        "lpips_net": "vgg",
        "lpips_resize": 64,
        "allow_random_backbone": False,  # tests only
        "batch_size": 1024,  # latents optimised together; also bounds the targets of a refinement chunk
    }

    def group_size_list(self) -> list[int]:
        sizes = list(self.group_sizes) if isinstance(self.group_sizes, (list, tuple)) else [self.group_sizes]
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise MiaGenError(f"{self.name}: group_sizes must be positive integers, got {self.group_sizes!r}.")
        return sorted(set(sizes))

    def group_draw(self) -> tuple[list[int], int]:
        return self.group_size_list(), check_positive_int(self.n_groups, "n_groups", self.name)

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

    def checked_groups(self, context: AttackContext) -> dict[int, np.ndarray]:
        sizes = self.group_size_list()
        groups = context.groups
        if groups is None or sorted(int(n) for n in groups) != sizes:
            raise MiaGenError(
                f"{self.name} decides the groups the pipeline draws for group_sizes={sizes} "
                f"(AttackContext.groups), but got {None if groups is None else sorted(groups)}; build the "
                "context with `Pipeline.context_for` or `mia_gen.groups.draw_groups`."
            )
        n_queries = len(context.queries)
        checked = {}
        for n in sizes:
            rows = np.asarray(groups[n], dtype=np.int64)
            if rows.ndim != 2 or rows.shape[1] != n or len(rows) == 0 or rows.min() < 0 or rows.max() >= n_queries:
                raise MiaGenError(f"{self.name}: groups of n={n} must be a non-empty (G, {n}) array of positions "
                                  f"into the {n_queries} queries; got shape {rows.shape}.")
            checked[n] = rows
        return checked

    def score(self, context: AttackContext) -> AttackOutput:
        check_weights(self)
        generator = generator_with_latents(context, self.name)
        groups = self.checked_groups(context)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        refine_steps = int(self.refine_steps)
        if isinstance(self.refine_steps, bool) or refine_steps != self.refine_steps or refine_steps < 0:
            raise MiaGenError(f"{self.name}: refine_steps must be an integer >= 0, got {self.refine_steps!r}.")
        if not isinstance(self.per_record_search, bool):
            raise MiaGenError(f"{self.name}: per_record_search must be true or false, got {self.per_record_search!r}.")
        encoder, encoder_loss = self.encoder(generator, context)
        queries = context.queries.float().to(context.device)
        with torch.no_grad():
            z0 = torch.cat([encoder(queries[s : s + batch_size]) for s in range(0, len(queries), batch_size)])
        lpips = lpips_for(self, context.device)
        objective = ReconstructionObjective(generator, queries, self.lambda_lpips, self.lambda_z, lpips, context.device)
        distance, _, evaluations = invert(objective, z0, self.optimizer, self.iterations, self.lr, batch_size)

        n_parameters = sum(p.numel() for p in encoder.parameters())
        group_scores = {}
        for n, rows in groups.items():
            members_of = ReconstructionObjective(generator, queries[torch.as_tensor(rows.reshape(-1))],
                                                 self.lambda_lpips, self.lambda_z, lpips, context.device)
            per_chunk = max(1, min(batch_size // n, PARAMETERS_PER_CHUNK // n_parameters))
            z = refine_jointly(encoder, members_of, n, refine_steps, float(self.refine_lr), per_chunk)
            if self.per_record_search:
                group_distance, _, _ = invert(members_of, z, self.optimizer, self.iterations, self.lr, batch_size)
            else:
                group_distance, _ = best_over_restarts(members_of, z, len(z), batch_size)
            group_scores[str(n)] = (-group_distance.double().reshape(len(rows), n).mean(1)).cpu().tolist()
        info = {"encoder_latent_mse": encoder_loss, "loss_evaluations_per_start": evaluations,
                "mean_distance": float(distance.mean()),
                "groups": {str(n): rows.tolist() for n, rows in groups.items()}, "group_scores": group_scores}
        return AttackOutput(scores=(-distance.double()).cpu().numpy().astype(np.float64), info=info)
