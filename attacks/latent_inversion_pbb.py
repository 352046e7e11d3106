"""GAN-Leaks partial black-box attack (Chen et al., CCS'20, Sec. 5.2): latent search with G(z) only.

The same objective and score as `latent_inversion` (L2 + lambda_lpips * LPIPS, a latent-norm
regulariser during the search), minimised without gradients: the generator is only ever called
forward, under `torch.no_grad`. Searches:

- `es` (default): a batched evolution strategy, (mu/mu_w, lambda) with cumulative step-size
  adaptation, all queries moving at once (`mia_gen.latent_search.evolution_strategy`), each start
  drawing its candidates from its own stream, a function of (seed, record id, restart), so a
  record's score does not depend on the records searched with it nor on `batch_size`;
- `powell`: scipy's Powell per query, GAN-Leaks' original optimiser (slow; for comparison).

The number of generator queries per record is reported in the result's info.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen.attacks.latent_inversion import (
    ReconstructionObjective, best_over_restarts, check_weights, generator_with_latents, initial_latents, lpips_for,
)
from mia_gen import latent_search
from mia_gen.errors import MiaGenError
from mia_gen.record_rng import LATENT_SEARCH, record_generator


@register_attack
class LatentInversionPBB(Attack):
    name = "latent_inversion_pbb"
    access = Access.QUERY
    version = 2  # 2: per-record search noise and random starts (were one stream for the batch)
    defaults = {
        "search": "es",  # es | powell
        "generations": 150,  # ES generations (each: `population` queries per start)
        "population": 16,  # ES candidates per generation and start
        "sigma": 0.5,  # ES initial step size in latent units
        "max_iterations": 10,  # Powell's maxiter (GAN-Leaks: 10)
        "init": "nn",  # zero | random | nn (latents of the nearest generated samples)
        "restarts": 1,
        "lambda_lpips": 0.2,
        "lambda_z": 0.001,
        "lpips_net": "vgg",
        "lpips_resize": 64,
        "allow_random_backbone": False,  # tests only
        "batch_size": 256,  # starts searched together (x population generator inputs per call)
    }

    @property
    def uses_samples(self) -> bool:
        return self.init == "nn"

    def score(self, context: AttackContext) -> AttackOutput:
        check_weights(self)
        if self.search not in ("es", "powell"):
            raise MiaGenError(f"{self.name}: unknown search '{self.search}'; use 'es' or 'powell'.")
        generator = generator_with_latents(context, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        z0 = initial_latents(self, context, generator).to(context.device)
        z0 = z0.reshape(-1, z0.shape[-1])
        n_queries = len(context.queries)
        objective = ReconstructionObjective(generator, context.queries, self.lambda_lpips, self.lambda_z,
                                            lpips_for(self, context.device), context.device)
        index = torch.arange(len(z0), device=z0.device) % n_queries
        record_ids = np.asarray(context.record_ids).tolist()
        # start i is restart i // Q of query i % Q (restart-major, as `initial_latents`)
        streams = [record_generator(context.seed, record_ids[i % n_queries], LATENT_SEARCH, i // n_queries)
                   for i in range(len(z0))] if self.search == "es" else []
        found, queries = [], 0
        for s in range(0, len(z0), batch_size):
            part = index[s : s + batch_size]
            if self.search == "es":
                result = latent_search.evolution_strategy(
                    lambda z, rows, part=part: objective(z, part[rows]), z0[s : s + batch_size],
                    self.generations, self.population, self.sigma, generators=streams[s : s + batch_size])
            else:
                result = latent_search.powell(lambda z, rows, part=part: objective(z, part[rows]),
                                              z0[s : s + batch_size], self.max_iterations)
            found.append(result.z)
            queries = max(queries, result.evaluations)
        distance, _ = best_over_restarts(objective, torch.cat(found), n_queries, batch_size)
        info = {"generator_queries_per_start": queries, "starts_per_record": len(z0) // n_queries,
                "mean_distance": float(distance.mean())}
        return AttackOutput(scores=(-distance.double()).cpu().numpy().astype(np.float64), info=info)
