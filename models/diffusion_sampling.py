"""A diffusion model seen as a generator `G(z)`, so the sample store and query attacks work unchanged.

`z` is the initial Gaussian x_T, flattened: `latent_dim = C * H * W`. DDIM (Song et al., 2021,
eq. 12) is written from `alphas_cumprod` directly: diffusers' `DDIMScheduler.step` clips the
x0 prediction by default, which changes the samples. The `ddpm` sampler is the same update with
eta = 1 (the DDPM posterior variance, Ho et al., 2020); its extra per-step noise is drawn from a
CPU generator seeded by the bytes of each row of z, so a sample depends on its z only (not on the
batch it is drawn in, nor on earlier shards).

A conditional model samples under one condition per row (class ids or text embeddings, as
`Denoiser.epsilon` takes them). A latent model (Stable Diffusion, DiT) runs the reverse process on its
VAE latents and hands out the decoded images (`Denoiser.to_images`); a pixel model its clamped x0.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mia_gen.errors import MiaGenError
from mia_gen.models.denoiser import Denoiser

SAMPLERS = ("ddim", "ddpm")


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Decreasing timesteps `[(steps-1)*k, ..., k, 0]` with `k = T // steps` (diffusers' "leading" spacing)."""
    stride = num_train_timesteps // steps
    return [i * stride for i in reversed(range(steps))]


def _row_generators(z: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per row of z, seeded from a hash of the row's bytes."""
    rows = z.detach().to("cpu", torch.float32).contiguous().numpy()
    return [torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little"))
            for row in rows]


class DiffusionSampler(nn.Module):
    """Generator-like wrapper: `forward(z, condition)` runs the reverse process from x_T = z.

    Args:
        denoiser: the model (`mia_gen.models.denoiser.Denoiser`).
        sampler: "ddim" (deterministic for eta=0) or "ddpm" (ancestral, eta = 1).
        steps: number of denoising steps, 1 <= steps <= T.
        eta: DDIM stochasticity in [0, 1]; None = 0 for ddim, 1 for ddpm.
    """

    def __init__(self, denoiser: Denoiser, sampler: str = "ddim", steps: int = 50, eta: float | None = None) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise MiaGenError(f"model.sampler.name={sampler!r} is unknown; use one of {list(SAMPLERS)}.")
        T = denoiser.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise MiaGenError(f"model.sampler.steps must be an integer in [1, {T}], got {steps!r}.")
        if sampler == "ddpm" and eta not in (None, 1, 1.0):
            raise MiaGenError(f"the ddpm sampler has eta = 1 by definition, got eta={eta}; use sampler=ddim to set eta.")
        eta = (0.0 if sampler == "ddim" else 1.0) if eta is None else float(eta)
        if not 0.0 <= eta <= 1.0:
            raise MiaGenError(f"model.sampler.eta must lie in [0, 1], got {eta}.")
        self.denoiser = denoiser
        self.sampler, self.steps, self.eta = sampler, steps, eta
        self.sample_shape = denoiser.sample_shape  # of x_T: the image, or a latent model's VAE latent
        self.image_shape = denoiser.image_shape  # of what forward returns
        c, h, w = self.sample_shape
        self.channels, self.resolution, self.latent_dim = self.image_shape[0], self.image_shape[1], c * h * w
        self.timesteps = ddim_timesteps(T, steps)

    # White-box attacks handed this generator reach the model through the Denoiser interface.
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.denoiser.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.denoiser.num_train_timesteps

    def epsilon(self, x_t: torch.Tensor, t: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """`Denoiser.epsilon` of the wrapped model."""
        return self.denoiser.epsilon(x_t, t, grad=grad)

    @property
    def config(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta}

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), flattened: `(n, C*H*W)` float32 on CPU."""
        return torch.randn(n, self.latent_dim, generator=generator)

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Images `(N, *image_shape)` in [-1, 1] from z `(N, C*H*W)` (only the final image is clamped).

        condition: one per row of z, as `Denoiser.epsilon` takes it: class ids `(N,)` int64, text
            embeddings `(N, L, D)` (`denoiser.text_conditions(captions)`), or None (unconditional model).
        """
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise MiaGenError(f"z must have shape (N, {self.latent_dim}) (x_T flattened), got {tuple(z.shape)}.")
        device = self.denoiser.device
        if isinstance(condition, torch.Tensor):
            condition = condition.to(device)  # once, not at every step
        x = z.to(device, torch.float32).view(-1, *self.sample_shape)
        rngs = _row_generators(z) if self.eta > 0 else None
        alphas = self.denoiser.alphas_cumprod
        for i, t in enumerate(self.timesteps):
            a_t = alphas[t]
            a_prev = alphas[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else torch.tensor(1.0, dtype=torch.float64)
            eps = self.denoiser.epsilon(x, torch.full((x.shape[0],), t, dtype=torch.int64), condition)
            x0 = (x - (1 - a_t).sqrt().item() * eps) / a_t.sqrt().item()
            sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt().item()
            x = a_prev.sqrt().item() * x0 + max(1 - a_prev.item() - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                noise = torch.stack([torch.randn(self.sample_shape, generator=g) for g in rngs]).to(device)
                x = x + sigma * noise
        if self.denoiser.latent is not None:
            return self.denoiser.to_images(x)  # decoded by the VAE, clamped
        return x.clamp(-1, 1)
