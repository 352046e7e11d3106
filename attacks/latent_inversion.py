"""GAN-Leaks white-box attack (Chen et al., CCS'20, Sec. 5.3): reconstruct each query through G.

z* = argmin_z  L2(x, G(z)) + lambda_lpips * LPIPS(x, G(z)) + lambda_z * (||z||^2 - dim z)^2
score = -(L2 + lambda_lpips * LPIPS)(x, G(z*))   (the regulariser is not part of the score)

L2 is the mean squared pixel error (as GAN-Leaks' code), LPIPS v0.1 through its exact embedding
(`mia_gen.lpips_embedding`, so the targets' features are computed once). All queries, and all
restarts of each query, are optimised at once with per-target optimiser state
(`mia_gen.latent_search`); the best restart per query is kept. Initialisation: `zero`, `random`
(draws from the generator's latent prior, a function of (seed, record id): `mia_gen.record_rng`), or
`nn` (the latents of each query's nearest generated samples, read from the sample store, as
GAN-Leaks' "nn" start). A query's score never depends on the other queries or on `batch_size`.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen import latent_search
from mia_gen.errors import MiaGenError
from mia_gen.record_rng import LATENT_INIT, record_generator

INITS = ("zero", "random", "nn")


def generator_with_latents(context: AttackContext, attack: str) -> torch.nn.Module:
    """The context's generator, checked to expose the latent interface inversion needs."""
    generator = context.generator
    if generator is None:
        raise MiaGenError(
            f"attack '{attack}' inverts the generator but got none: it needs a model (not a synthetic "
            "dataset audit) and query or white-box access."
        )
    if not isinstance(getattr(generator, "latent_dim", None), int) or not callable(getattr(generator, "sample_latent", None)):
        raise MiaGenError(
            f"attack '{attack}': the generator {type(generator).__name__} has no latent interface "
            "(`latent_dim` and `sample_latent(n, generator)`), so there is no z to search over; use a "
            "sample-based attack (sample_distance, monte_carlo, domias) instead."
        )
    return generator


class ReconstructionObjective:
    """Per-target reconstruction loss of latent codes; row i of `z` is scored against `targets[index[i]]`.

    targets (`(Q, C, H, W)` in [-1, 1]). `lpips` is an `LPIPSEmbedding` (None when lambda_lpips = 0).
    """

    def __init__(self, generator: torch.nn.Module, targets: torch.Tensor, lambda_lpips: float,
                 lambda_z: float, lpips=None, device: torch.device | str = "cpu"):
        self.generator = generator
        self.device = torch.device(device)
        self.targets = targets.float().to(self.device)
        self.lambda_lpips, self.lambda_z = float(lambda_lpips), float(lambda_z)
        self.lpips = lpips
        self.target_features = None
        if self.lambda_lpips > 0:
            if lpips is None:
                raise MiaGenError("lambda_lpips > 0 needs an LPIPS embedding.")
            self.target_features = lpips(self.targets).to(self.device)

    def distance(self, x_hat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """L2 + lambda_lpips * LPIPS between reconstructions and their targets, `(N,)`."""
        target = self.targets[index]
        if x_hat.shape != target.shape:
            raise MiaGenError(
                f"the generator makes images of shape {tuple(x_hat.shape[1:])} but the queries have shape "
                f"{tuple(target.shape[1:])}; make data.resolution / data.channels match the model."
            )
        loss = (x_hat - target).square().flatten(1).mean(1)
        if self.lambda_lpips > 0:
            features = self.lpips.embed(x_hat.clamp(-1, 1))
            loss = loss + self.lambda_lpips * (features - self.target_features[index]).square().sum(1)
        return loss

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        """(||z||^2 - dim z)^2: keeps z on the shell where a Gaussian latent's mass lies."""
        return (z.square().sum(1) - z.shape[1]).square()

    def __call__(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.distance(self.generator(z), index) + self.lambda_z * self.prior(z)


def lpips_for(attack: Attack, device: torch.device):
    if float(attack.lambda_lpips) <= 0:
        return None
    from mia_gen.lpips_embedding import LPIPSEmbedding

    return LPIPSEmbedding(net=attack.lpips_net, resize=attack.lpips_resize,
                          allow_random_backbone=attack.allow_random_backbone, device=device)


def check_weights(attack: Attack) -> None:
    for key in ("lambda_lpips", "lambda_z"):
        value = getattr(attack, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise MiaGenError(f"{attack.name}: {key} must be a number >= 0, got {value!r}.")


def initial_latents(attack: Attack, context: AttackContext, generator: torch.nn.Module) -> torch.Tensor:
    """Starting points `(restarts, Q, latent_dim)` for the attack's `init` and `restarts`."""
    restarts = check_positive_int(attack.restarts, "restarts", attack.name)
    n, dim = len(context.queries), generator.latent_dim
    if attack.init == "zero":
        if restarts > 1:
            raise MiaGenError(
                f"{attack.name}: init=zero gives the same start every time, so restarts={restarts} would "
                "repeat one optimisation; use init=random or init=nn for restarts > 1."
            )
        return torch.zeros(1, n, dim)
    if attack.init == "random":  # each record's starts from its own stream: restart r is the same for any R > r
        starts = [generator.sample_latent(restarts, record_generator(context.seed, record_id, LATENT_INIT))
                  for record_id in np.asarray(context.record_ids).tolist()]
        return torch.stack(starts, dim=1).reshape(restarts, n, dim).float()
    if attack.init == "nn":
        from mia_gen.neighbours import nearest_neighbours

        store = context.samples
        if store is None:
            raise MiaGenError(f"{attack.name}: init=nn needs the sample store (its latents); run the sample stage.")
        if store.latent_dim != dim:
            raise MiaGenError(
                f"{attack.name}: the sample store's latents have dimension {store.latent_dim}, the generator's "
                f"{dim}; the store was not made by this generator (resample it)."
            )
        if restarts > len(store):
            raise MiaGenError(f"{attack.name}: restarts={restarts} nearest samples asked for, the store holds {len(store)}.")
        with torch.no_grad():
            _, indices = nearest_neighbours(context.queries, store, k=restarts, device=context.device)
        latents = store.get_latents(indices.T.reshape(-1).numpy())
        return latents.reshape(restarts, n, dim).float()
    raise MiaGenError(f"{attack.name}: unknown init '{attack.init}'; use one of {INITS}.")


def best_over_restarts(objective: ReconstructionObjective, z: torch.Tensor, n_queries: int,
                       batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For `z` `(restarts * Q, d)` (restart-major), the distance of each row and, per query, the best row's
    `(distance (Q,), z (Q, d))`."""
    index = torch.arange(len(z), device=z.device) % n_queries
    with torch.no_grad():
        distance = torch.cat([objective.distance(objective.generator(z[s : s + batch_size]), index[s : s + batch_size])
                              for s in range(0, len(z), batch_size)])
    per_restart = distance.reshape(-1, n_queries)
    best = per_restart.argmin(0)
    return per_restart[best, torch.arange(n_queries)], z.reshape(-1, n_queries, z.shape[1])[best, torch.arange(n_queries)]


def invert(objective: ReconstructionObjective, z0: torch.Tensor, optimizer: str, iterations: int,
           lr: float, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Optimise every row of `z0` `(R * Q, d)` (row i -> target i mod Q) in batches of `batch_size`
    rows; returns `(distance per query (Q,), best z per query (Q, d), loss evaluations per row)`."""
    n_queries = len(objective.targets)
    index = torch.arange(len(z0), device=z0.device) % n_queries
    found, evaluations = [], 0
    for s in range(0, len(z0), batch_size):
        part = index[s : s + batch_size]

        def loss_fn(z, rows, part=part):
            return objective(z, part[rows])

        if optimizer == "lbfgs":
            result = latent_search.lbfgs(loss_fn, z0[s : s + batch_size], iterations)
        elif optimizer == "adam":
            result = latent_search.adam(loss_fn, z0[s : s + batch_size], iterations, lr=lr)
        else:
            raise MiaGenError(f"unknown optimizer '{optimizer}'; use 'lbfgs' or 'adam'.")
        found.append(result.z)
        evaluations = max(evaluations, result.evaluations)
    distance, z = best_over_restarts(objective, torch.cat(found), n_queries, batch_size)
    return distance, z, evaluations


@register_attack
class LatentInversion(Attack):
    name = "latent_inversion"
    access = Access.WHITE_BOX
    version = 2  # 2: init=random draws each record's starts from its own stream (was one for the batch)
    defaults = {
        "optimizer": "lbfgs",  # lbfgs | adam
        "iterations": 100,  # optimiser steps (L-BFGS: each with a line search of >= 1 evaluations)
        "lr": 0.05,  # Adam's step size
        "init": "nn",  # zero | random | nn (latents of the nearest generated samples)
        "restarts": 1,  # starts per query (random draws / nearest samples); the best is kept
        "lambda_lpips": 0.2,  # GAN-Leaks: L2 + 0.2 LPIPS
        "lambda_z": 0.001,  # GAN-Leaks: 0.001 (||z||^2 - dim)^2
        "lpips_net": "vgg",  # GAN-Leaks uses LPIPS-VGG
        "lpips_resize": 64,  # LPIPS backbones need >= 32 px inputs; small images are upsampled
        "allow_random_backbone": False,  # tests only: LPIPS code path with an untrained backbone
        "batch_size": 1024,  # latents optimised together (queries x restarts)
    }

    @property
    def uses_samples(self) -> bool:
        return self.init == "nn"

    def score(self, context: AttackContext) -> AttackOutput:
        check_weights(self)
        if self.optimizer not in ("lbfgs", "adam"):
            raise MiaGenError(f"{self.name}: unknown optimizer '{self.optimizer}'; use 'lbfgs' or 'adam'.")
        generator = generator_with_latents(context, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        z0 = initial_latents(self, context, generator).to(context.device)
        objective = ReconstructionObjective(generator, context.queries, self.lambda_lpips, self.lambda_z,
                                            lpips_for(self, context.device), context.device)
        distance, _, evaluations = invert(objective, z0.reshape(-1, z0.shape[-1]), self.optimizer,
                                          self.iterations, self.lr, batch_size)
        info = {"loss_evaluations_per_start": evaluations, "starts_per_record": int(z0.shape[0]),
                "mean_distance": float(distance.mean())}
        return AttackOutput(scores=(-distance.double()).cpu().numpy().astype(np.float64), info=info)
