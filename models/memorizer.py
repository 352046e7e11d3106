"""A generator that memorises: it returns noisy copies of its training records.

The upper bound of leakage, used to check that an attack finds a leak when there is one
(and, trained on reference data only, that it finds none when there is none).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NoisyCopyGenerator(nn.Module):
    """G(z) = clip(records[i(z)] + noise_std * z[1:]) with i(z) = floor(Phi(z[0]) * n).

    records (`torch.Tensor` of shape `(n, ...)`): the training records, images in [-1, 1].
    With z ~ N(0, I), i(z) is uniform over the records and the noise is Gaussian, so the
    standard latent interface (`latent_dim`, `sample_latent`, `forward`) applies unchanged.
    """

    def __init__(self, records: torch.Tensor, noise_std: float = 0.05, clip: bool = True):
        super().__init__()
        self.register_buffer("records", records.detach().float().clone())
        self.noise_std = float(noise_std)
        self.clip = bool(clip)
        self.record_shape = tuple(records.shape[1:])
        self.latent_dim = 1 + math.prod(self.record_shape)
        self.config = {
            "_target_": f"{__name__}.{type(self).__qualname__}",
            "noise_std": self.noise_std,
            "clip": self.clip,
            "record_shape": list(self.record_shape),
            "n_records": len(records),
        }

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (`(N, latent_dim)`) -> records' noisy copies `(N, ...)`."""
        uniform = 0.5 * (1 + torch.erf(z[:, 0] / math.sqrt(2)))
        index = (uniform * len(self.records)).long().clamp(0, len(self.records) - 1)
        noise = z[:, 1:].reshape(len(z), *self.record_shape)
        out = self.records[index] + self.noise_std * noise
        return out.clamp(-1, 1) if self.clip else out
