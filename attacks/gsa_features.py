"""GSA's features and classifier (Pang et al., "White-box Membership Inference Attacks against Diffusion
Models", PoPETs'25): per-layer gradient norms of the denoising loss, and a boosted-tree classifier
trained on shadow models' IN / OUT records.

For a record x0 and timesteps t_1..t_k with noises eps_1..eps_k (a function of (seed, record id),
`mia_gen.record_rng`), the per-timestep loss is the one of the loss attack (attacks/diffusion_loss.py),

    L_i(theta) = || eps_i - eps_theta(sqrt(abar_{t_i}) x0 + sqrt(1 - abar_{t_i}) eps_i, t_i) ||^2   (summed over pixels)

and a "layer" is one parameter tensor of the network (`named_parameters()`, as GSA's code iterates over
the model's parameters), so a record has one feature per parameter tensor:

- GSA1: f_l = || d/dW_l (1/k) sum_i L_i ||_2: the loss averaged over the timesteps, one gradient;
- GSA2: f_l = (1/k) sum_i || d/dW_l L_i ||_2: one gradient per timestep, the per-layer norms averaged.
  (Averaging the gradients instead would give GSA1 again: the gradient is linear.)

Per-record gradients are batched with `torch.func` (`vmap` of `grad` over `functional_call`), one
backward pass for a whole batch instead of one per record (GSA's code runs one per record).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mia_gen.attacks.timesteps import chunks, forward_noise, record_noise, x0_of
from mia_gen.errors import MiaGenError
from mia_gen.extras import require
from mia_gen.fixed_batches import pad_rows
from mia_gen.models.denoiser import Denoiser

VARIANTS = ("gsa1", "gsa2")
BACKENDS = ("sklearn", "xgboost")

# loss_fn(params, x0, t, noise) -> scalar: the loss of ONE record x0 `(C, H, W)` at timesteps t `(k,)`
# int64 with noises `(k, C, H, W)`, averaged over the k timesteps; params {name: tensor}.
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Epsilon(nn.Module):
    """`denoiser.epsilon` as a module's forward, so `functional_call` can swap the denoiser's parameters."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        args = (x_t, t) if condition is None else (x_t, t, condition)
        if isinstance(self.denoiser, Denoiser):
            return self.denoiser.epsilon(*args, grad=True)  # its default runs under no_grad
        return self.denoiser.epsilon(*args)


def denoising_loss_fn(denoiser: nn.Module, condition: torch.Tensor | None = None) -> LossFn:
    """The GSA loss of any model with the Denoiser interface (`epsilon`, `alphas_cumprod`):
    loss_fn(params, x0, t, noise) = (1/k) sum_i L_i, with params keyed as `denoiser.named_parameters()`.

    condition: ONE record's condition (e.g. a 0-d class id) shared by every record the loss is applied to,
    or None for an unconditional model. It is a constant, not vmapped: the Denoiser checks its value.
    """
    wrapper = _Epsilon(denoiser)

    def loss_fn(params: dict[str, torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        x0_jobs = x0.unsqueeze(0).expand(len(t), *x0.shape)
        x_t = forward_noise(x0_jobs, t, noise, denoiser.alphas_cumprod)
        args = (x_t, t) if condition is None else (x_t, t, condition.expand(len(t), *condition.shape))
        predicted = torch.func.functional_call(wrapper, {f"denoiser.{k}": v for k, v in params.items()}, args)
        return ((predicted - noise) ** 2).flatten(1).sum(dim=1).mean()

    return loss_fn


def gradient_norms(loss_fn: LossFn, params: dict[str, torch.Tensor], x0: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor, variant: str = "gsa1", batch_size: int = 16) -> torch.Tensor:
    """Per-record, per-parameter-tensor gradient norms (GSA1 or GSA2, module docstring).

    Args:
        loss_fn: see `LossFn` (e.g. `denoising_loss_fn(denoiser)`).
        params: {name: tensor}, the parameters to differentiate (one feature each, in this order).
        x0: `(N, C, H, W)` records (in [-1, 1] for images).
        timesteps: `(k,)` int64, the same for every record.
        noise: `(N, k, C, H, W)`, record n's noise at timestep i.
        variant: "gsa1" or "gsa2".
        batch_size: records per vmapped gradient (memory: batch_size x number of parameters).

    Returns:
        `(N, len(params))` float64 on CPU.
    """
    if variant not in VARIANTS:
        raise MiaGenError(f"GSA variant must be one of {list(VARIANTS)}, got {variant!r}.")
    if timesteps.dim() != 1 or len(timesteps) == 0 or noise.shape[:2] != (len(x0), len(timesteps)) \
            or noise.shape[2:] != x0.shape[1:]:
        raise MiaGenError(f"GSA: timesteps must be (k,) and noise (N, k, *record shape); got timesteps "
                          f"{tuple(timesteps.shape)}, noise {tuple(noise.shape)} for records {tuple(x0.shape)}.")
    params = {name: value.detach() for name, value in params.items()}
    per_record = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, None, 0))

    def norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([grads[name].flatten(1).double().norm(dim=1) for name in params], dim=1)

    out = torch.empty(len(x0), len(params), dtype=torch.float64)
    for part in chunks(len(x0), batch_size):
        # every vmapped call holds exactly batch_size records (the last chunk padded, its padding dropped):
        # kernels round by shape, and a record's features must not depend on which records share its call
        n = part.stop - part.start
        x, eps = pad_rows(x0[part], batch_size), pad_rows(noise[part], batch_size)
        if variant == "gsa1":
            out[part] = norms(per_record(params, x, timesteps, eps))[:n].cpu()
        else:
            out[part] = torch.stack([norms(per_record(params, x, timesteps[i:i + 1], eps[:, i:i + 1]))[:n].cpu()
                                     for i in range(len(timesteps))]).mean(dim=0)
    return out


def gsa_features(denoiser: nn.Module, x0: torch.Tensor, record_ids: np.ndarray, seed: int,
                 timesteps: Sequence[int], variant: str = "gsa1", batch_size: int = 16,
                 device: torch.device | str = "cpu",
                 conditions: torch.Tensor | None = None) -> tuple[np.ndarray, list[str]]:
    """GSA features of records under one diffusion model (the target or a shadow).

    Args:
        denoiser: a model with the Denoiser interface; used in eval mode.
        x0: `(N, C, H, W)` records in [-1, 1], mapped by `denoiser.to_x0` when it has one (a latent model's
            VAE latents; noise then in the latents' shape).
        record_ids: `(N,)` their dataset ids: record n's noise at timestep i is draw i of
            `record_noise([record_ids[n]], seed, k, ...)`, the same under every model (common random
            numbers between the target and its shadows).
        seed: the noise seed.
        timesteps: the k timesteps, the same for every record (e.g. evenly spaced over [0, T)).
        variant, batch_size: see `gradient_norms`.
        device: where the gradients are computed: the model's device.
        conditions: `(N, ...)` the records' conditions for a conditional model (class ids `(N,)` int64),
            None for an unconditional one. Records are batched per distinct condition (each record's
            gradient is its own: the grouping changes no feature).

    Returns:
        features `(N, P)` float64 and the P parameter names (the layers).
    """
    denoiser.eval()
    x0 = x0_of(x0, denoiser, device)  # a latent model's VAE latents
    timesteps_tensor = torch.as_tensor(list(timesteps), dtype=torch.int64)
    noise = record_noise(np.asarray(record_ids), seed, len(timesteps_tensor), tuple(x0.shape[1:]))
    params = dict(denoiser.named_parameters())
    x0, timesteps_tensor, noise = x0.float().to(device), timesteps_tensor.to(device), noise.to(device)
    if conditions is None:
        features = gradient_norms(denoising_loss_fn(denoiser), params, x0, timesteps_tensor, noise, variant,
                                  batch_size)
        return features.numpy(), list(params)
    conditions = torch.as_tensor(conditions)
    if conditions.dim() == 0 or len(conditions) != len(x0):
        raise MiaGenError(f"GSA: conditions must hold one condition per record ({len(x0)}), got shape "
                          f"{tuple(conditions.shape)}.")
    features = torch.empty(len(x0), len(params), dtype=torch.float64)
    values, group = torch.unique(conditions, dim=0, return_inverse=True)
    for g, value in enumerate(values):
        rows = torch.nonzero(group == g).flatten()
        features[rows] = gradient_norms(denoising_loss_fn(denoiser, value.to(device)), params, x0[rows.to(device)],
                                        timesteps_tensor, noise[rows.to(device)], variant, batch_size)
    return features.numpy(), list(params)


def fit_gsa_classifier(features: np.ndarray, labels: np.ndarray, backend: str = "sklearn", seed: int = 0,
                       n_estimators: int = 200) -> Any:
    """GSA's classifier: gradient-boosted trees on shadow models' features, label 1 = IN, 0 = OUT.

    backend "sklearn" (the default, always installed): `HistGradientBoostingClassifier`; "xgboost" (the
    paper's): `xgboost.XGBClassifier` (setup.cfg extra [gsa]). The backend is an explicit choice, never
    picked by what is installed, so a score does not change with the environment.

    Args:
        features: `(n, P)` float, e.g. stacked `gsa_features` of each shadow's records.
        labels: `(n,)` bool / {0, 1}, whether the record was in that shadow's training set.
        seed: the classifier's random_state.
        n_estimators: boosting rounds (trees per class): XGBoost's `n_estimators` (GSA's code: 200),
            `HistGradientBoostingClassifier(max_iter=...)` without early stopping.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),) or not np.isin(labels, (0, 1)).all():
        raise MiaGenError(f"GSA classifier: features must be (n, P) and labels (n,) of 0 / 1 (OUT / IN), got "
                          f"{features.shape} and {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise MiaGenError("GSA classifier: the shadow features need both IN (1) and OUT (0) records.")
    if not np.isfinite(features).all():
        raise MiaGenError("GSA classifier: the features contain NaN or infinite values (a diverged model?).")
    labels = labels.astype(np.int64)
    if backend == "sklearn":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=n_estimators, early_stopping=False,
                                              random_state=seed).fit(features, labels)
    if backend == "xgboost":
        xgboost = require("xgboost", feature="GSA's classifier=xgboost")
        return xgboost.XGBClassifier(n_estimators=n_estimators, random_state=seed).fit(features, labels)
    raise MiaGenError(f"GSA classifier backend must be one of {list(BACKENDS)}, got {backend!r}.")


def gsa_scores(classifier: Any, features: np.ndarray) -> np.ndarray:
    """Membership scores `(N,)` float64: the classifier's probability of IN for the target's features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise MiaGenError(f"GSA: features must be (N, P), got {features.shape}.")
    return np.asarray(classifier.predict_proba(features)[:, 1], dtype=np.float64)
