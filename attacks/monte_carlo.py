"""Monte Carlo attack (Hilprecht, Härterich & Bernau, PoPETs'19, Sec. 4).

The score estimates how much of the generator's mass lies within eps of a query:
f_eps(x) = 1/n * sum_i 1[d(x, g_i) <= eps] over n generated samples g_i (the paper's estimator,
variant `eps`). Two soft variants weight each sample inside the ball by its closeness:
`log` by -log(d/eps) and `frac` by (1 - d/eps); both are 0 at the ball's edge.
eps comes from the median heuristic (median over queries of the distance to their nearest sample),
a percentile of all query-sample distances, or a fixed value. Distances are L2 on pixels or on PCA
features fitted on reference records.
"""

from __future__ import annotations


import numpy as np
import torch

from attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.errors import MiaGenError
from mia_gen.features import as_numpy, build_features
from mia_gen.neighbours import nearest_neighbours, pairwise_sq_distances_chunks

VARIANTS = ("eps", "log", "frac")


@register_attack
class MonteCarlo(Attack):
    name = "monte_carlo"
    access = Access.SAMPLES
    defaults = {
        "variant": "eps",  # eps | log | frac
        "eps_method": "median",  # median | percentile | fixed
        "eps_percentile": 0.1,  # percent of query-sample distances below eps (percentile method)
        "eps_percentile_samples": 20000,  # samples used to estimate the percentile (i.i.d. prefix)
        "eps": None,  # the radius, for eps_method=fixed
        "features": "pixels",  # pixels | pca (fitted on reference data)
        "n_components": 40,
        "chunk_size": 8192,
        "backend": "auto",
    }

    @property
    def needs_reference_data(self) -> bool:
        return self.features == "pca"

    def choose_eps(self, context: AttackContext, feature_fn) -> float:
        if self.eps_method == "fixed":
            if self.eps is None or not float(self.eps) > 0:
                raise MiaGenError("monte_carlo: eps_method=fixed needs a positive `eps`.")
            return float(self.eps)
        if self.eps_method == "median":
            sq_distances, _ = nearest_neighbours(
                context.queries, context.samples, k=1, backend=self.backend,
                chunk_size=int(self.chunk_size), feature_fn=feature_fn, device=context.device,
            )
            return float(np.median(as_numpy(sq_distances[:, 0].clamp_min(0).sqrt()).astype(np.float64)))
        if self.eps_method == "percentile":
            if not 0 < float(self.eps_percentile) < 100:
                raise MiaGenError("monte_carlo: eps_percentile is a percentage in (0, 100), e.g. 0.1.")
            # Generated samples are i.i.d. draws, so a prefix of the store is a uniform subsample.
            n = min(len(context.samples), int(self.eps_percentile_samples))
            prefix = context.samples.get(np.arange(n))
            distances = torch.cat([
                block.clamp_min(0).sqrt().flatten()
                for _, block in pairwise_sq_distances_chunks(
                    context.queries, prefix, chunk_size=int(self.chunk_size),
                    feature_fn=feature_fn, device=context.device)
            ])
            return float(np.percentile(as_numpy(distances).astype(np.float64), float(self.eps_percentile)))
        raise MiaGenError(
            f"monte_carlo: unknown eps_method '{self.eps_method}'; use median, percentile or fixed."
        )

    def score(self, context: AttackContext) -> AttackOutput:
        if self.variant not in VARIANTS:
            raise MiaGenError(f"monte_carlo: unknown variant '{self.variant}'; use one of {VARIANTS}.")
        feature_fn = build_features(self.features, context.reference, int(self.n_components), context.seed)
        with torch.no_grad():
            eps = self.choose_eps(context, feature_fn)
            if not eps > 0:
                raise MiaGenError(
                    f"monte_carlo: eps={eps} — the queries coincide with generated samples, so the "
                    "median heuristic gives 0; use eps_method=percentile or a fixed eps."
                )
            totals = torch.zeros(len(context.queries), dtype=torch.float64)
            for _, block in pairwise_sq_distances_chunks(
                context.queries, context.samples, chunk_size=int(self.chunk_size),
                feature_fn=feature_fn, device=context.device,
            ):
                totals += self.ball_weights(block.double().clamp_min(0).sqrt().cpu(), eps).sum(dim=1)
        scores = totals / len(context.samples)
        return AttackOutput(scores=as_numpy(scores), info={"eps": eps})

    def ball_weights(self, distances: torch.Tensor, eps: float) -> torch.Tensor:
        """Each generated sample's contribution to a query's score, `(Q, n)` -> `(Q, n)`."""
        inside = distances <= eps
        if self.variant == "eps":
            return inside.double()
        if self.variant == "log":
            return torch.where(inside, -torch.log(distances.clamp_min(1e-12) / eps), 0.0)
        return torch.where(inside, 1.0 - distances / eps, 0.0)


