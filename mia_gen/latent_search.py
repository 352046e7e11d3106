"""Minimise many independent per-target objectives over latent codes at once.

Every optimiser here takes `loss_fn(z, rows) -> (M,)`: the losses of latent codes `z` `(M, d)`
against the targets at positions `rows` `(M,)` (int64, in [0, N)). It moves all N latents together: one generator call per step serves every target. Each target
keeps its own optimiser state (L-BFGS history and step length, Adam moments, ES mean, step size
and noise stream), so the result for a target does not depend on which other targets share the
batch: a batched run equals a loop over targets (up to float rounding of batched kernels).

- `lbfgs`: L-BFGS (Nocedal & Wright, Alg. 7.4/7.5) with a per-target Armijo backtracking line search;
- `adam`: Adam (elementwise, hence per-target by construction);
- `evolution_strategy`: gradient-free (mu/mu_w, lambda)-ES with cumulative step-size adaptation
  (Hansen, "The CMA Evolution Strategy: A Tutorial", isotropic case), for query-only access;
- `powell`: scipy's Powell per target (GAN-Leaks' partial black-box optimiser), a slow reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from mia_gen.errors import MiaGenError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SearchResult:
    """z (`(N, d)`): the best latent found per target; loss (`(N,)`): its objective; evaluations: loss_fn rows per target."""

    z: torch.Tensor
    loss: torch.Tensor
    evaluations: int


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MiaGenError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _loss_and_grad(loss_fn: LossFn, z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z, rows)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad.detach()


def lbfgs(loss_fn: LossFn, z0: torch.Tensor, iterations: int, history: int = 10, max_line_search: int = 20,
          c1: float = 1e-4, tolerance_grad: float = 1e-7) -> SearchResult:
    """Per-target L-BFGS from `z0` `(N, d)` for `iterations` steps (each step: a line search of
    1..`max_line_search` loss-and-gradient calls; a backtracking round only evaluates the targets
    still searching). A target whose gradient is below `tolerance_grad` (max-abs) or whose line
    search fails stops moving. `evaluations` counts line-search rounds."""
    iterations = _check_positive_int(iterations, "iterations")
    history = _check_positive_int(history, "history")
    n, d = z0.shape
    z = z0.detach().clone()
    every = torch.arange(n, device=z.device)
    loss, grad = _loss_and_grad(loss_fn, z, every)
    evaluations = 1
    s_hist = z.new_zeros(history, n, d)
    y_hist = z.new_zeros(history, n, d)
    rho = z.new_zeros(history, n)  # 0 marks an empty or rejected pair: the two loops skip it
    gamma = torch.ones(n, dtype=z.dtype, device=z.device)
    active = grad.abs().amax(dim=1) > tolerance_grad
    first = torch.ones(n, dtype=torch.bool, device=z.device)
    for it in range(iterations):
        if not active.any():
            break
        # two-loop recursion, newest pair first (slot (it - 1 - j) mod history)
        q = grad.clone()
        alphas = []
        order = [(it - 1 - j) % history for j in range(history)]
        for slot in order:
            alpha = rho[slot] * (s_hist[slot] * q).sum(1)
            q -= alpha[:, None] * y_hist[slot]
            alphas.append(alpha)
        r = gamma[:, None] * q
        for slot, alpha in zip(reversed(order), reversed(alphas)):
            beta = rho[slot] * (y_hist[slot] * r).sum(1)
            r += s_hist[slot] * (alpha - beta)[:, None]
        direction = -r
        # first step of a target: a scaled steepest-descent step (as torch.optim.LBFGS)
        steepest = -grad * torch.clamp(1.0 / grad.abs().sum(1), max=1.0)[:, None]
        direction = torch.where(first[:, None], steepest, direction)
        slope = (grad * direction).sum(1)
        not_descent = slope >= 0
        direction = torch.where(not_descent[:, None], -grad, direction)
        slope = torch.where(not_descent, -(grad * grad).sum(1), slope)

        step = torch.ones(n, dtype=z.dtype, device=z.device)
        pending = active.clone()
        new_z, new_loss, new_grad = z.clone(), loss.clone(), grad.clone()
        for _ in range(max_line_search):
            rows = pending.nonzero().squeeze(1)
            trial = z[rows] + step[rows, None] * direction[rows]
            trial_loss, trial_grad = _loss_and_grad(loss_fn, trial, rows)
            evaluations += 1
            ok = torch.isfinite(trial_loss) & (trial_loss <= loss[rows] + c1 * step[rows] * slope[rows])
            accepted = rows[ok]
            new_z[accepted], new_loss[accepted], new_grad[accepted] = trial[ok], trial_loss[ok], trial_grad[ok]
            pending[accepted] = False
            if not pending.any():
                break
            step = torch.where(pending, step * 0.5, step)
        moved = active & ~pending
        s = new_z - z
        y = new_grad - grad
        sy = (s * y).sum(1)
        keep = moved & (sy > 1e-10)
        slot = it % history
        s_hist[slot] = torch.where(keep[:, None], s, 0.0)
        y_hist[slot] = torch.where(keep[:, None], y, 0.0)
        rho[slot] = torch.where(keep, 1.0 / sy.clamp_min(1e-10), 0.0)
        gamma = torch.where(keep, sy / (y * y).sum(1).clamp_min(1e-20), gamma)
        first &= ~moved
        z, loss, grad = new_z, new_loss, new_grad
        active = moved & (grad.abs().amax(dim=1) > tolerance_grad)
    return SearchResult(z=z, loss=loss, evaluations=evaluations)


def adam(loss_fn: LossFn, z0: torch.Tensor, iterations: int, lr: float = 0.05) -> SearchResult:
    """Adam from `z0` for `iterations` steps; returns the best iterate per target (the loss is not monotone)."""
    iterations = _check_positive_int(iterations, "iterations")
    z = torch.nn.Parameter(z0.detach().clone())
    optimiser = torch.optim.Adam([z], lr=float(lr))
    best_z, best_loss = z.detach().clone(), torch.full((len(z),), math.inf, dtype=z.dtype, device=z.device)
    every = torch.arange(len(z), device=z.device)
    for _ in range(iterations + 1):
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(z, every)
            loss.sum().backward()
        better = loss.detach() < best_loss
        best_loss = torch.where(better, loss.detach(), best_loss)
        best_z = torch.where(better[:, None], z.detach(), best_z)
        optimiser.step()
    return SearchResult(z=best_z, loss=best_loss, evaluations=iterations + 1)


def evolution_strategy(loss_fn: LossFn, z0: torch.Tensor, generations: int, population: int = 16,
                       sigma: float = 0.5, *, generators: Sequence[torch.Generator]) -> SearchResult:
    """Gradient-free search: per target, a (mu/mu_w, lambda)-ES with cumulative step-size adaptation.

    `generators`: one CPU `torch.Generator` per row of `z0` `(N, d)`; target i's candidates are drawn
    from `generators[i]` alone, so its search does not depend on the other targets. `loss_fn` is called
    on `N * population` candidates per generation (target-major) and only ever sees latent codes, under
    `torch.no_grad`: nothing but G(z) is needed. Returns the best candidate seen per target.
    """
    if len(generators) != len(z0):
        raise MiaGenError(f"evolution_strategy: one noise generator per target is needed, got {len(generators)} "
                          f"for {len(z0)} targets.")
    generations = _check_positive_int(generations, "generations")
    population = _check_positive_int(population, "population")
    if population < 2:
        raise MiaGenError("evolution_strategy: population must be at least 2.")
    if not float(sigma) > 0:
        raise MiaGenError(f"evolution_strategy: sigma must be > 0, got {sigma!r}.")
    n, d = z0.shape
    mu = population // 2
    weights = torch.log(torch.tensor(mu + 0.5)) - torch.log(torch.arange(1, mu + 1, dtype=torch.float64))
    weights = (weights / weights.sum()).to(z0.dtype).to(z0.device)
    mu_eff = float(1.0 / (weights**2).sum())
    c_sigma = (mu_eff + 2) / (d + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (d + 1)) - 1) + c_sigma
    chi_d = math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d * d))
    mean = z0.detach().clone()
    step = torch.full((n,), float(sigma), dtype=z0.dtype, device=z0.device)
    path = torch.zeros_like(mean)
    every = torch.arange(n, device=z0.device)
    with torch.no_grad():
        best_loss = loss_fn(mean, every)
    best_z = mean.clone()
    evaluations = 1
    for _ in range(generations):
        noise = torch.stack([torch.randn(population, d, generator=g, dtype=z0.dtype) for g in generators])
        noise = noise.to(z0.device)
        candidates = mean[:, None] + step[:, None, None] * noise
        with torch.no_grad():
            losses = loss_fn(candidates.reshape(n * population, d),
                             every.repeat_interleave(population)).reshape(n, population)
        evaluations += population
        losses = torch.nan_to_num(losses, nan=math.inf)
        ranked = losses.argsort(dim=1)[:, :mu]
        selected = torch.gather(noise, 1, ranked[:, :, None].expand(-1, -1, d))
        y_w = (weights[None, :, None] * selected).sum(1)
        mean = mean + step[:, None] * y_w
        path = (1 - c_sigma) * path + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * y_w
        step = step * torch.exp((c_sigma / d_sigma) * (path.norm(dim=1) / chi_d - 1))
        top_loss, top = losses.min(dim=1)
        better = top_loss < best_loss
        best_loss = torch.where(better, top_loss, best_loss)
        best_z = torch.where(better[:, None], candidates[torch.arange(n), top], best_z)
    return SearchResult(z=best_z, loss=best_loss, evaluations=evaluations)


def powell(loss_fn: LossFn, z0: torch.Tensor, max_iterations: int = 10) -> SearchResult:
    """scipy's Powell per target (GAN-Leaks pbb), one target at a time, no gradients."""
    from scipy.optimize import minimize

    max_iterations = _check_positive_int(max_iterations, "max_iterations")
    zs, losses, evaluations = [], [], 0
    for i, row in enumerate(z0.detach()):
        def objective(v: np.ndarray, i: int = i, row: torch.Tensor = row) -> float:
            with torch.no_grad():
                z = torch.as_tensor(v, dtype=row.dtype, device=row.device)[None]
                return float(loss_fn(z, torch.tensor([i], device=row.device))[0])

        found = minimize(objective, row.cpu().double().numpy(), method="Powell",
                         options={"maxiter": max_iterations})
        zs.append(torch.as_tensor(found.x, dtype=row.dtype))
        losses.append(float(found.fun))
        evaluations = max(evaluations, int(found.nfev))
    return SearchResult(z=torch.stack(zs).to(z0.device), loss=torch.tensor(losses, dtype=z0.dtype),
                        evaluations=evaluations)
