"""GAN-Leaks full black-box attack (Chen et al., CCS'20, Sec. 5.1).

A member tends to lie closer to the generator's samples than a non-member: the score is minus the
distance from each query to its nearest generated samples, in L2 on pixels or in LPIPS (exact, as a
squared L2 distance between LPIPS embeddings, so the search is one nearest-neighbour pass).
"""

from __future__ import annotations

import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.errors import MiaGenError
from mia_gen.features import as_numpy
from mia_gen.neighbours import nearest_neighbours


@register_attack
class SampleDistance(Attack):
    name = "sample_distance"
    access = Access.SAMPLES
    defaults = {
        "distance": "l2",  # l2 | lpips
        "k": 1,  # neighbours searched
        "aggregate": "min",  # min: the first neighbour's distance (GAN-Leaks) | mean: mean over k
        "backend": "auto",  # auto | faiss | torch
        "chunk_size": 16384,  # generated samples per search block
        "lpips_net": "alex",  # alex | vgg | squeeze
        "lpips_resize": 64,  # LPIPS backbones need >= 32 px inputs; small images are upsampled
        "allow_random_backbone": False,  # tests only: LPIPS code path with an untrained backbone
    }

    def feature_fn(self, device: torch.device):
        if self.distance == "l2":
            return None
        if self.distance == "lpips":
            from mia_gen.lpips_embedding import LPIPSEmbedding

            embedding = LPIPSEmbedding(
                net=self.lpips_net, resize=self.lpips_resize,
                allow_random_backbone=self.allow_random_backbone, device=device,
            )
            return lambda x: embedding(x.to(device))
        raise MiaGenError(f"sample_distance: unknown distance '{self.distance}'; use 'l2' or 'lpips'.")

    def score(self, context: AttackContext) -> AttackOutput:
        if self.aggregate not in ("min", "mean"):
            raise MiaGenError(f"sample_distance: unknown aggregate '{self.aggregate}'; use 'min' or 'mean'.")
        if not 1 <= int(self.k) <= len(context.samples):
            raise MiaGenError(
                f"sample_distance: k={self.k} neighbours asked for, but the store holds "
                f"{len(context.samples)} samples; use 1 <= k <= {len(context.samples)}."
            )
        with torch.no_grad():
            sq_distances, indices = nearest_neighbours(
                context.queries, context.samples, k=int(self.k), backend=self.backend,
                chunk_size=int(self.chunk_size), feature_fn=self.feature_fn(context.device),
                device=context.device,
            )
        # LPIPS is itself the squared embedding distance; L2 is its square root.
        distances = sq_distances.clamp_min(0).double()
        if self.distance == "l2":
            distances = distances.sqrt()
        per_query = distances[:, 0] if self.aggregate == "min" else distances.mean(dim=1)
        return AttackOutput(scores=as_numpy(-per_query), neighbour_indices=as_numpy(indices))
