"""Feature maps that attacks compare records in: raw pixels, or PCA fitted on reference records."""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.errors import MiaGenError


def flatten(x: torch.Tensor) -> torch.Tensor:
    """Raw features: `(N, ...)` -> `(N, D)` float32."""
    return x.reshape(len(x), -1).float()


def spanned_dimensions(records: torch.Tensor, tolerance: float = 1e-8) -> int:
    """How many directions the centred records `(R, ...)` span: singular values above `tolerance` x the largest."""
    data = flatten(records).double().cpu()
    singular = torch.linalg.svdvals(data - data.mean(0))
    return int((singular > tolerance * singular.max()).sum()) if singular.numel() and singular.max() > 0 else 0


class PCAFeatures:
    """Projection onto the top principal components of the reference records.

    Fitted on reference data only (never on the members or non-members being scored), so the
    feature space itself cannot leak membership.
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        self.mean = mean.float()  # (D,)
        self.components = components.float()  # (d, D)

    @classmethod
    def fit(cls, reference: torch.Tensor, n_components: int, seed: int = 0) -> "PCAFeatures":
        """reference (`torch.Tensor` of shape `(R, ...)`): records to fit on."""
        from sklearn.decomposition import PCA

        data = flatten(reference).double().cpu().numpy()
        limit = min(data.shape[0] - 1, data.shape[1])
        if not 1 <= n_components <= limit:
            raise MiaGenError(
                f"PCA with {n_components} components needs at least {n_components + 1} reference "
                f"records of dimension >= {n_components}; there are {data.shape[0]} records of "
                f"dimension {data.shape[1]}. Lower the attack's `n_components` (at most {limit}) "
                "or raise `split.n_reference`."
            )
        pca = PCA(n_components=n_components, svd_solver="full", random_state=seed).fit(data)
        return cls(torch.from_numpy(pca.mean_), torch.from_numpy(pca.components_))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (`torch.Tensor` of shape `(N, ...)`) -> `(N, d)` float32 on x's device."""
        flat = flatten(x)
        return (flat - self.mean.to(flat.device)) @ self.components.to(flat.device).T


def build_features(space: str, reference: torch.Tensor | None, n_components: int, seed: int):
    """`space` is "pixels" (raw values) or "pca" (fitted on `reference`)."""
    if space == "pixels":
        return flatten
    if space == "pca":
        if reference is None or len(reference) == 0:
            raise MiaGenError(
                "PCA features are fitted on reference data, but this run has none; set "
                "`split.n_reference` > 0 or use the attack's `features=pixels`."
            )
        return PCAFeatures.fit(reference, n_components, seed)
    raise MiaGenError(f"unknown feature space '{space}'; use 'pixels' or 'pca'.")


def feature_matrix(source, feature_fn, chunk_size: int = 8192) -> torch.Tensor:
    """Features of every record of a tensor or a `SampleStore`, computed chunk by chunk.

    Memory grows with N x d (the feature size), never with N x D (the record size).
    """
    if isinstance(source, torch.Tensor):
        chunks = (source[i : i + chunk_size] for i in range(0, len(source), chunk_size))
    else:
        chunks = (chunk for _, chunk, _ in source.iter_chunks(chunk_size=chunk_size))
    return torch.cat([feature_fn(chunk).float() for chunk in chunks])


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
