"""Monte Carlo attack (Hilprecht, Härterich & Bernau, PoPETs'19, Sec. 4).

The score estimates how much of the generator's mass lies within eps of a query:
f_eps(x) = 1/n * sum_i 1[d(x, g_i) <= eps] over n generated samples g_i (the paper's estimator,
variant `eps`). Two soft variants weight each sample inside the ball by its closeness:
`log` by -log(d/eps) and `frac` by (1 - d/eps); both are 0 at the ball's edge.
eps comes from the median heuristic, a percentile of distances, or a fixed value. The paper takes
both heuristics over the attacked records, which makes every record's score depend on the others
scored with it; here they are taken over generated samples instead (the store's first `eps_samples`,
each measured against the *other* samples): a draw of the generator stands in for a record, so eps
is on the scale of record-to-sample distances and a record's score depends on nothing but the record,
the samples and the settings. Distances are L2 on pixels or on PCA features fitted on reference records.
"""

from __future__ import annotations


import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen.errors import MiaGenError
from mia_gen.features import as_numpy, build_features
from mia_gen.neighbours import nearest_neighbours, pairwise_sq_distances_chunks

VARIANTS = ("eps", "log", "frac")


@register_attack
class MonteCarlo(Attack):
    name = "monte_carlo"
    access = Access.SAMPLES
    version = 2  # 2: the eps heuristics are taken over generated samples (were over the scored queries)
    defaults = {
        "variant": "eps",  # eps | log | frac
        "eps_method": "median",  # median | percentile | fixed
        "eps_samples": 1000,  # generated samples (the store's first) standing in for records when eps is chosen
        "eps_percentile": 0.1,  # percent of sample-to-other-sample distances below eps (percentile method)
        "eps_percentile_samples": 20000,  # samples those are compared with (percentile method; i.i.d. prefix)
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
        if self.eps_method not in ("median", "percentile"):
            raise MiaGenError(
                f"monte_carlo: unknown eps_method '{self.eps_method}'; use median, percentile or fixed."
            )
        store = context.samples
        if len(store) < 2:
            raise MiaGenError("monte_carlo: the eps heuristics compare generated samples with each other and need "
                              f"at least 2, the store holds {len(store)}; use eps_method=fixed.")
        # Generated samples are i.i.d. draws, so a prefix of the store is a uniform subsample.
        n_probes = min(check_positive_int(self.eps_samples, "eps_samples", self.name), len(store))
        probes = store.get(np.arange(n_probes))
        if self.eps_method == "median":
            # k=2: a probe's first neighbour is itself (distance 0); the second is its nearest other sample
            sq_distances, _ = nearest_neighbours(
                probes, store, k=2, backend=self.backend,
                chunk_size=int(self.chunk_size), feature_fn=feature_fn, device=context.device,
            )
            return float(np.median(as_numpy(sq_distances[:, 1].clamp_min(0).sqrt()).astype(np.float64)))
        if not 0 < float(self.eps_percentile) < 100:
            raise MiaGenError("monte_carlo: eps_percentile is a percentage in (0, 100), e.g. 0.1.")
        n = min(len(store), check_positive_int(self.eps_percentile_samples, "eps_percentile_samples", self.name))
        distances = []
        for start, block in pairwise_sq_distances_chunks(probes, store.get(np.arange(n)),
                                                         chunk_size=int(self.chunk_size),
                                                         feature_fn=feature_fn, device=context.device):
            # a probe and itself are no pair
            other = torch.arange(start, start + block.shape[1])[None, :] != torch.arange(n_probes)[:, None]
            distances.append(block.clamp_min(0).sqrt()[other.to(block.device)])
        return float(np.percentile(as_numpy(torch.cat(distances)).astype(np.float64), float(self.eps_percentile)))

    def score(self, context: AttackContext) -> AttackOutput:
        if self.variant not in VARIANTS:
            raise MiaGenError(f"monte_carlo: unknown variant '{self.variant}'; use one of {VARIANTS}.")
        feature_fn = build_features(self.features, context.reference, int(self.n_components), context.seed)
        with torch.no_grad():
            eps = self.choose_eps(context, feature_fn)
            if not eps > 0:
                raise MiaGenError(
                    f"monte_carlo: eps={eps} — most generated samples have an exact duplicate in the store, "
                    f"so the {self.eps_method} heuristic gives 0; use eps_method=fixed with a positive eps."
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


