"""The loss attack on diffusion models (Matsumoto et al.; Hu & Pang; the loss signal of Carlini et al.).

A model fits its members' denoising loss best: the score is minus
||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 (summed over pixels), averaged over
the chosen timesteps and `n_draws` noise draws per record. The draws are a function of (seed, record
id) and are shared by all timesteps (common random numbers, so a timestep sweep compares like with
like). x0 is `denoiser.to_x0(record)`: the image, or a latent model's VAE latent (noise in its shape).
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.attacks.timesteps import (
    check_images, check_positive_int, check_timesteps, chunks, conditions_of, denoiser_of, epsilon_batched,
    forward_noise, record_noise, repeat_conditions, sample_dims, sweep_list, sweep_scores, x0_of,
)
from mia_gen.statistic import Statistic


@register_attack
class DiffusionLoss(Attack):
    name = "diffusion_loss"
    access = Access.WHITE_BOX
    version = 2  # 2: the denoiser is called on batches of one fixed shape (batch-invariant on any CPU)
    defaults = {
        "timesteps": [100],  # the score averages the loss over these timesteps
        "n_draws": 4,  # noise draws per record and timestep
        "sweep_timesteps": None,  # null | list: also score at each t alone (info["sweep"])
        "batch_size": 256,  # model inputs per call
    }

    def losses(self, context: AttackContext, timesteps: list[int]) -> torch.Tensor:
        """Denoising losses `(Q, len(timesteps), n_draws)`, float64, batched over all three axes."""
        denoiser = denoiser_of(context, self.name)
        check_images(context.queries, denoiser, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        n_draws = check_positive_int(self.n_draws, "n_draws", self.name)
        device = context.device
        records_x0 = x0_of(context.queries, denoiser, device)  # a latent model's VAE latents; noise in their shape
        conditions = conditions_of(context, self.name)
        n_jobs = len(timesteps) * n_draws  # per record, ordered (t, draw)
        out = torch.empty(len(records_x0), len(timesteps), n_draws, dtype=torch.float64)
        for part in chunks(len(records_x0), max(1, batch_size // n_jobs)):
            x0 = records_x0[part]
            n = len(x0)
            noise = record_noise(context.record_ids[part], context.seed, n_draws, x0.shape[1:]).to(device)
            x0_jobs = x0[:, None].expand(n, n_jobs, *x0.shape[1:]).reshape(-1, *x0.shape[1:])
            eps_jobs = noise[:, None].expand(n, len(timesteps), *noise.shape[1:]).reshape(x0_jobs.shape)
            t_jobs = torch.tensor(timesteps, device=device).repeat_interleave(n_draws).repeat(n)
            x_t = forward_noise(x0_jobs, t_jobs, eps_jobs, denoiser.alphas_cumprod)
            condition_jobs = repeat_conditions(None if conditions is None else conditions[part], n_jobs)
            predicted = epsilon_batched(denoiser, x_t, t_jobs, batch_size, device, condition_jobs)
            loss = ((predicted.double() - eps_jobs.double()) ** 2).flatten(1).sum(dim=1)
            out[part] = loss.view(n, len(timesteps), n_draws).cpu()
        return out

    def statistic(self, context: AttackContext) -> Statistic:
        return Statistic("denoising loss (squared error summed over x0's dimensions)", True, "sum",
                         sample_dims(context, self.name))

    def score(self, context: AttackContext) -> AttackOutput:
        denoiser = denoiser_of(context, self.name)
        T = int(denoiser.num_train_timesteps)
        main = check_timesteps(self.timesteps, T, self.name)
        sweep = sweep_list(self.sweep_timesteps, T, self.name)
        timesteps = sorted(set(main) | set(sweep))
        losses = self.losses(context, timesteps).mean(dim=2)  # (Q, len(timesteps))
        column = {t: i for i, t in enumerate(timesteps)}
        scores = -losses[:, [column[t] for t in main]].mean(dim=1)
        info = {"model_calls_per_record": len(main) * int(self.n_draws),
                "model_calls_made_per_record": len(timesteps) * int(self.n_draws)}
        if sweep:
            info["sweep"] = sweep_scores(sweep, lambda t: -losses[:, column[t]])
        return AttackOutput(scores=scores.numpy().astype(np.float64), info=info)
