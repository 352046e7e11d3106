"""GAN-Leaks full black-box attack (Chen et al., CCS'20, Sec. 5.1).

A member tends to lie closer to the generator's samples than a non-member: the score is minus the
distance from each query to its nearest generated samples, in L2 on pixels or in LPIPS (exact, as a
squared L2 distance between LPIPS embeddings, so the search is one nearest-neighbour pass).

A store drawn from captions (a text-to-image model sampled n times per caption, the extraction setting of
Carlini et al., 2023; `sampling.per_caption`) is searched per caption: each query only among the samples
of its own caption.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.errors import MiaGenError
from mia_gen.features import as_numpy
from mia_gen.neighbours import nearest_neighbours
from mia_gen.statistic import Statistic


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

    def statistic(self, context: AttackContext) -> Statistic:
        if self.distance == "lpips":  # LPIPS averages over positions already
            return Statistic("LPIPS distance to the nearest generated sample(s)", True, "mean", 1)
        return Statistic("L2 distance to the nearest generated sample(s)", True, "norm",
                         int(np.prod(context.queries.shape[1:])), p=2.0)

    def score(self, context: AttackContext) -> AttackOutput:
        if self.aggregate not in ("min", "mean"):
            raise MiaGenError(f"sample_distance: unknown aggregate '{self.aggregate}'; use 'min' or 'mean'.")
        feature_fn = self.feature_fn(context.device)
        if getattr(context.samples, "captions", None) is not None:
            sq_distances, indices = self._per_caption(context, feature_fn)
        else:
            sq_distances, indices = self._search(context.queries, context.samples, len(context.samples),
                                                 "the store holds", context, feature_fn)
        # LPIPS is itself the squared embedding distance; L2 is its square root.
        distances = sq_distances.clamp_min(0).double()
        if self.distance == "l2":
            distances = distances.sqrt()
        per_query = distances[:, 0] if self.aggregate == "min" else distances.mean(dim=1)
        return AttackOutput(scores=as_numpy(-per_query), neighbour_indices=as_numpy(indices))

    def _search(self, queries, samples, n_samples: int, where: str, context: AttackContext, feature_fn):
        """(squared distances, indices into `samples`), both `(Q, k)`, of each query's k nearest samples."""
        if not 1 <= int(self.k) <= n_samples:
            raise MiaGenError(
                f"sample_distance: k={self.k} neighbours asked for, but {where} {n_samples} samples; "
                f"use 1 <= k <= {n_samples}."
            )
        with torch.no_grad():
            return nearest_neighbours(
                queries, samples, k=int(self.k), backend=self.backend, chunk_size=int(self.chunk_size),
                feature_fn=feature_fn, device=context.device,
            )

    def _per_caption(self, context: AttackContext, feature_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """`_search` of each query among the samples drawn from its own caption; indices into the whole store."""
        store = context.samples
        if context.captions is None or len(context.captions) != len(context.queries):
            raise MiaGenError(
                "sample_distance: the sample store was drawn from captions (sampling.per_caption), so each record "
                "is compared with the samples of its own caption, but the records have no captions; give them "
                "(data.captions=true for the digits, a metadata.jsonl beside an image folder), or sample the "
                "model unconditionally (sampling.per_caption=null)."
            )
        query_captions = np.asarray(context.captions, dtype=object)
        missing = sorted(set(context.captions) - set(store.captions))
        if missing:
            raise MiaGenError(
                f"sample_distance: {len(missing)} record caption(s) have no samples in the store (e.g. "
                f"{missing[0]!r}); the store was drawn from other captions. Sample it from these records' captions "
                "(the pipeline does with sampling.per_caption=n), or score the records its captions belong to."
            )
        caption_index = store.caption_index()
        sq_distances = torch.empty(len(query_captions), int(self.k), dtype=torch.float64)
        indices = torch.empty(len(query_captions), int(self.k), dtype=torch.int64)
        for i, caption in enumerate(store.captions):
            positions = np.flatnonzero(query_captions == caption)
            if positions.size == 0:
                continue
            rows = np.flatnonzero(caption_index == i)
            d, idx = self._search(context.queries[torch.as_tensor(positions)], store.get(rows), len(rows),
                                  f"the store holds for the caption {caption!r}", context, feature_fn)
            sq_distances[positions] = d.double().cpu()
            indices[positions] = torch.as_tensor(rows)[idx.cpu()]
        return sq_distances, indices
