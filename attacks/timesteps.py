"""Shared arithmetic of the white-box diffusion attacks: the model, its noise schedule, batching.

Every formula is written from `alphas_cumprod` (abar_t) directly, never through a diffusers
scheduler: `DDIMScheduler.step` clips its x0 prediction by default, which changes the t-error
(DESIGN.md, pitfalls). Coefficients are computed in float64 and cast to the images' dtype.

The diffusion model is any `torch.nn.Module` with the `Denoiser` interface:
    alphas_cumprod (`torch.Tensor` of shape `(T,)`, float64), num_train_timesteps (T),
    sample_shape ((C, H, W)), epsilon(x_t, t[, condition]) -> eps with x_t `(N, C, H, W)`, t int64 `(N,)`
    and, for a conditional model only, one condition per image (`AttackContext.conditions`, sliced
    and repeated exactly as the images are). Optionally `to_x0(images)` and `image_shape`: the attacks
    work on x0 = to_x0(queries) (a latent model's VAE latents), noise drawn in x0's shape.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from mia_gen.attacks.base import check_positive_int, is_integer  # noqa: F401  (used by the diffusion attacks)
from mia_gen.errors import MiaGenError
from mia_gen.record_rng import record_generator

DENOISER_ATTRIBUTES = ("epsilon", "alphas_cumprod", "num_train_timesteps")


def denoiser_of(context, attack_name: str) -> torch.nn.Module:
    """The diffusion model of a white-box attack's context, in eval mode (dropout weakens PIA).

    Raises `MiaGenError` when there is no model or it is not a diffusion model (e.g. a GAN).
    """
    model = context.denoiser
    if model is None:
        raise MiaGenError(
            f"attack '{attack_name}' needs a diffusion model's weights (white-box access), but this "
            "run has none (a GAN or a synthetic dataset?); use `model=ddpm` (trained here) or "
            "`model=diffusers model.checkpoint=<dir>`, or choose attacks for your model."
        )
    missing = [name for name in DENOISER_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise MiaGenError(
            f"attack '{attack_name}' attacks diffusion models, but the model given is a "
            f"{type(model).__name__} without {', '.join(missing)} (a GAN?). Use a diffusion model "
            "(`model=ddpm`), or choose attacks that apply to GANs (e.g. `attack=[sample_distance]`)."
        )
    model.eval()
    return model


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int, attack_name: str,
                    what: str = "timesteps") -> list[int]:
    """`timesteps` as a list of ints, each checked to lie in [0, T)."""
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence) or len(timesteps) == 0:
        raise MiaGenError(f"attack '{attack_name}': `{what}` must be a non-empty list of integers, "
                          f"e.g. [100], got {timesteps!r}.")
    out = []
    for t in timesteps:
        if not is_integer(t) or not 0 <= int(t) < num_train_timesteps:
            raise MiaGenError(
                f"attack '{attack_name}': {what} contains t={t!r}, outside the model's "
                f"[0, {num_train_timesteps}) training timesteps; choose integers 0 <= t < "
                f"{num_train_timesteps}."
            )
        out.append(int(t))
    return out


def coefficient(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor,
                fn) -> torch.Tensor:
    """fn(abar_t), shaped `(N, 1, ..., 1)` to broadcast against `like` (N, ...), in its dtype."""
    values = fn(alphas_cumprod.double()[t.cpu()])
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def forward_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM, Ho et al. Eq. 4); t int64 `(N,)`."""
    return (coefficient(alphas_cumprod, t, x0, torch.sqrt) * x0
            + coefficient(alphas_cumprod, t, x0, lambda a: torch.sqrt(1 - a)) * eps)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. Eq. 12, eta = 0) from t_from to t_to, either way.

    x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from), unclipped;
    x_to = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps. t_to > t_from inverts (noises), t_to <
    t_from denoises.
    """
    x0_hat = ((x - coefficient(alphas_cumprod, t_from, x, lambda a: torch.sqrt(1 - a)) * eps)
              / coefficient(alphas_cumprod, t_from, x, torch.sqrt))
    return (coefficient(alphas_cumprod, t_to, x, torch.sqrt) * x0_hat
            + coefficient(alphas_cumprod, t_to, x, lambda a: torch.sqrt(1 - a)) * eps)


def full_t(t: int, n: int, device) -> torch.Tensor:
    """The timestep t repeated for a batch of n, int64 `(n,)`."""
    return torch.full((n,), int(t), dtype=torch.long, device=device)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    size = max(int(size), 1)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def epsilon_batched(denoiser, x_t: torch.Tensor, t: torch.Tensor, batch_size: int,
                    device: torch.device, conditions: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta(x_t, t[, condition]) for `(M, C, H, W)` inputs, at most `batch_size` per model call, float32.

    conditions: `(M, ...)`, one per input (None: an unconditional model, called as epsilon(x_t, t)).
    """
    if conditions is None:
        parts = [denoiser.epsilon(x_t[part].to(device), t[part].to(device)).float()
                 for part in chunks(len(x_t), batch_size)]
    else:
        parts = [denoiser.epsilon(x_t[part].to(device), t[part].to(device), conditions[part].to(device)).float()
                 for part in chunks(len(x_t), batch_size)]
    return torch.cat(parts) if parts else x_t.new_zeros(x_t.shape)


def conditions_of(context, attack_name: str) -> torch.Tensor | None:
    """The queries' conditions (`AttackContext.conditions`) as a tensor `(Q, ...)`, or None; checked aligned."""
    conditions = getattr(context, "conditions", None)
    if conditions is None:
        return None
    conditions = torch.as_tensor(conditions)
    if conditions.dim() == 0 or len(conditions) != len(context.queries):
        raise MiaGenError(
            f"attack '{attack_name}': conditions must hold one condition per query record ({len(context.queries)}), "
            f"aligned with the queries, got shape {tuple(conditions.shape)}."
        )
    return conditions


def repeat_conditions(conditions: torch.Tensor | None, repeats: int) -> torch.Tensor | None:
    """Each record's condition repeated for its `repeats` consecutive jobs (jobs ordered record-major)."""
    return None if conditions is None else conditions.repeat_interleave(int(repeats), dim=0)


def record_noise(record_ids: np.ndarray, seed: int, n_draws: int, shape: Sequence[int]) -> torch.Tensor:
    """Gaussian noise `(len(record_ids), n_draws, *shape)`, float32, a function of (seed, record id).

    Each record's draws come from its own generator, so a record's score does not depend on
    which other records are scored with it, nor on the batch size.
    """
    out = torch.empty(len(record_ids), int(n_draws), *shape)
    for row, record_id in enumerate(np.asarray(record_ids).tolist()):
        out[row] = torch.randn(int(n_draws), *shape, generator=record_generator(seed, record_id))
    return out


def sweep_list(sweep_timesteps, num_train_timesteps: int, attack_name: str) -> list[int]:
    """The checked `sweep_timesteps` (empty when null)."""
    if sweep_timesteps is None:
        return []
    return check_timesteps(sweep_timesteps, num_train_timesteps, attack_name, "sweep_timesteps")


def sweep_scores(sweep: list[int], score_at) -> dict[str, list[float]]:
    """info["sweep"]: {"t": scores at t as a list}; string keys, so a JSON round trip changes nothing."""
    return {str(t): [float(v) for v in score_at(t)] for t in sweep}


def check_images(queries: torch.Tensor, denoiser, attack_name: str) -> None:
    """Query records must be `(Q, C, H, W)` images of the model's record shape (`image_shape`: a latent
    model's VAE input; else `sample_shape`)."""
    expected = tuple(getattr(denoiser, "image_shape", None) or getattr(denoiser, "sample_shape", ()) or ())
    if queries.dim() != 4 or (expected and tuple(queries.shape[1:]) != expected):
        raise MiaGenError(
            f"attack '{attack_name}': query records have shape {tuple(queries.shape[1:])} but the "
            f"diffusion model denoises images of shape {expected}; make `data.resolution` / "
            "`data.channels` match the model."
        )


def sample_dims(context, attack_name: str) -> int:
    """The number of dimensions of x0, what the network denoises (a statistic reduced over them)."""
    return int(np.prod(denoiser_of(context, attack_name).sample_shape))


def x0_of(queries: torch.Tensor, denoiser, device) -> torch.Tensor:
    """The records as x0, what the network denoises, float32 on `device`: `denoiser.to_x0(queries)` (the
    images themselves for a pixel model; a latent model's VAE posterior mean times scaling_factor), or the
    queries themselves for a model without `to_x0`."""
    to_x0 = getattr(denoiser, "to_x0", None)
    x0 = queries.float() if to_x0 is None else to_x0(queries.float())
    return x0.float().to(device)
