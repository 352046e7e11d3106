"""PIA and PIAN, proximal initialisation attacks (Kong et al., ICLR'24).

eps0 = eps_theta(x0, 0) serves as the noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, and the
score is -||eps0 - eps_theta(x_t, t)||_p (paper Eq. 9; the reference code ranks by the p-th power,
the same order). Two model calls per record, no randomness. PIAN first rescales eps0 to a standard
Gaussian's mean absolute value, eps0 * sqrt(2 / pi) / mean|eps0| (paper Eq. 10, as its code does).
x0 is `denoiser.to_x0(record)`: the image, or a latent model's VAE latent.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.attacks.timesteps import (
    check_images, check_positive_int, check_timesteps, chunks, conditions_of, denoiser_of, epsilon_batched,
    forward_noise, full_t, repeat_conditions, sample_dims, sweep_list, sweep_scores, x0_of,
)
from mia_gen.errors import MiaGenError
from mia_gen.statistic import Statistic


def gaussian_scaled(eps: torch.Tensor) -> torch.Tensor:
    """Rescale each `(C, H, W)` eps to mean absolute value sqrt(2 / pi), that of N(0, 1) (PIAN Eq. 10)."""
    mean_abs = eps.abs().flatten(1).mean(dim=1).view(-1, *([1] * (eps.dim() - 1)))
    return eps / mean_abs * math.sqrt(2 / math.pi)


@register_attack
class PIA(Attack):
    name = "pia"
    access = Access.WHITE_BOX
    version = 2  # 2: the denoiser is called on batches of one fixed shape (batch-invariant on any CPU)
    normalize_eps0 = False
    defaults = {
        "t": 200,  # the attack timestep
        "p": 4,  # the norm of the score (p >= 1)
        "sweep_timesteps": None,  # null | list: also score at each t (info["sweep"])
        "batch_size": 256,  # model inputs per call
    }

    def statistic(self, context: AttackContext) -> Statistic:
        return Statistic(f"PIA distance (L{self.p} norm of eps0 - eps over x0's dimensions)", True, "norm",
                         sample_dims(context, self.name), p=float(self.p))

    def distances(self, context: AttackContext, timesteps: list[int]) -> torch.Tensor:
        """||eps0 - eps_theta(x_t, t)||_p for every record and timestep, `(Q, len(timesteps))` float64."""
        denoiser = denoiser_of(context, self.name)
        check_images(context.queries, denoiser, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not self.p >= 1:
            raise MiaGenError(f"{self.name}: p must be a number >= 1 (a norm), got {self.p!r}.")
        p = float(self.p)
        device, n_t = context.device, len(timesteps)
        records_x0 = x0_of(context.queries, denoiser, device)  # a latent model's VAE latents
        conditions = conditions_of(context, self.name)
        out = torch.empty(len(records_x0), n_t, dtype=torch.float64)
        for part in chunks(len(records_x0), max(1, batch_size // n_t)):
            x0 = records_x0[part]
            n = len(x0)
            condition = None if conditions is None else conditions[part]
            eps0 = epsilon_batched(denoiser, x0, full_t(0, n, device), batch_size, device, condition)
            if self.normalize_eps0:
                eps0 = gaussian_scaled(eps0)
            # jobs ordered (record, t)
            x0_jobs = x0.repeat_interleave(n_t, dim=0)
            eps0_jobs = eps0.repeat_interleave(n_t, dim=0)
            t_jobs = torch.tensor(timesteps, device=device).repeat(n)
            x_t = forward_noise(x0_jobs, t_jobs, eps0_jobs, denoiser.alphas_cumprod)
            eps_t = epsilon_batched(denoiser, x_t, t_jobs, batch_size, device, repeat_conditions(condition, n_t))
            distance = ((eps0_jobs.double() - eps_t.double()).abs() ** p).flatten(1).sum(dim=1) ** (1 / p)
            out[part] = distance.view(n, n_t).cpu()
        return out

    def score(self, context: AttackContext) -> AttackOutput:
        denoiser = denoiser_of(context, self.name)
        T = int(denoiser.num_train_timesteps)
        (t,) = check_timesteps([self.t], T, self.name, "t")
        sweep = sweep_list(self.sweep_timesteps, T, self.name)
        timesteps = sorted({t} | set(sweep))
        distances = self.distances(context, timesteps)
        column = {step: i for i, step in enumerate(timesteps)}
        info = {"model_calls_per_record": 2, "model_calls_made_per_record": 1 + len(timesteps)}
        if sweep:
            info["sweep"] = sweep_scores(sweep, lambda step: -distances[:, column[step]])
        return AttackOutput(scores=(-distances[:, column[t]]).numpy().astype(np.float64), info=info)


@register_attack
class PIAN(PIA):
    """PIA with eps0 rescaled to a standard Gaussian's scale before it is used as noise."""

    name = "pian"
    normalize_eps0 = True
