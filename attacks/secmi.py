"""SecMI, step-wise error comparing membership inference (Duan et al., ICML'23).

Deterministic DDIM inversion carries x0 along 0 -> k -> 2k -> ... -> t_sec (x0 enters as the state
at timestep 0, as in the reference code); one DDIM step out to t_sec + k and one back give x~_{t_sec}.
Members are reconstructed better. The t-error is ||x~_{t_sec} - x_{t_sec}||^2 summed over pixels
(paper Eq. 9; the reference's `naive_statistic_attack`).

- `secmi_stat`: score = -t_error.
- `secmi_nn`: a small CNN learns member / non-member from the t-error maps |x~ - x| (per pixel) of
  an explicit labelled subset (`context.labelled_subset`); it scores every record and says which
  positions it trained on (`info["trained_on"]`), so that evaluation drops them.

Note: the reference script's `t_sec=100` stops its inversion at range(0, t_sec, k)[-1] = 90 and
measures the step 90 -> 100 -> 90; here t_sec is the timestep measured (the paper's definition), so
`t_sec: 90` reproduces the reference's numbers. Every formula is unclipped (DESIGN.md pitfall).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from attacks.timesteps import (
    check_images, check_positive_int, check_timesteps, chunks, ddim_step, denoiser_of,
    epsilon_batched, full_t, sweep_list, sweep_scores,
)
from mia_gen.errors import MiaGenError


class SecMI(Attack):
    """Shared by both variants: t-error maps at t_sec (and at each sweep timestep)."""

    access = Access.WHITE_BOX
    defaults = {
        "t_sec": 100,  # the timestep whose reconstruction error is measured
        "k": 10,  # DDIM interval, for the inversion and for the step out and back
        "sweep_timesteps": None,  # null | list of multiples of k: also score at each t (info["sweep"])
        "batch_size": 256,  # model inputs per call
    }

    def checked_timesteps(self, T: int) -> tuple[int, list[int]]:
        k = check_positive_int(self.k, "k (the DDIM interval)", self.name)
        (t_sec,) = check_timesteps([self.t_sec], T, self.name, "t_sec")
        sweep = sweep_list(self.sweep_timesteps, T, self.name)
        for t in [t_sec, *sweep]:
            if t % k:
                raise MiaGenError(
                    f"{self.name}: the DDIM inversion visits 0, k, 2k, ... (k={k}), so t={t} is never "
                    f"reached; choose t_sec and sweep_timesteps among multiples of {k}, or change k."
                )
            if t + k >= T:
                raise MiaGenError(
                    f"{self.name}: t={t} plus the interval k={k} leaves the model's [0, {T}) timesteps; "
                    f"choose t <= {T - 1 - k}."
                )
        return t_sec, sweep

    def t_error_maps(self, context: AttackContext, timesteps: list[int]) -> torch.Tensor:
        """|x~_t - x_t| per pixel, `(Q, len(timesteps), C, H, W)` float32 on the CPU."""
        denoiser = denoiser_of(context, self.name)
        check_images(context.queries, denoiser, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        abar, k, device, n_t = denoiser.alphas_cumprod, int(self.k), context.device, len(timesteps)
        queries = context.queries
        out = torch.empty(len(queries), n_t, *queries.shape[1:])
        for part in chunks(len(queries), max(1, batch_size // n_t)):
            x = queries[part].float().to(device)
            n = len(x)
            states = {0: x}  # kept only at the timesteps measured
            for t in range(0, max(timesteps), k):  # deterministic inversion, one record batch
                eps = epsilon_batched(denoiser, x, full_t(t, n, device), batch_size, device)
                x = ddim_step(x, eps, full_t(t, n, device), full_t(t + k, n, device), abar)
                if t + k in timesteps:
                    states[t + k] = x
            # jobs ordered (record, t): one step out to t + k and back to t
            x_t = torch.stack([states[t] for t in timesteps], dim=1).flatten(0, 1)
            t_jobs = torch.tensor(timesteps, device=device).repeat(n)
            eps = epsilon_batched(denoiser, x_t, t_jobs, batch_size, device)
            x_out = ddim_step(x_t, eps, t_jobs, t_jobs + k, abar)
            eps_out = epsilon_batched(denoiser, x_out, t_jobs + k, batch_size, device)
            x_back = ddim_step(x_out, eps_out, t_jobs + k, t_jobs, abar)
            out[part] = (x_back - x_t).abs().view(n, n_t, *x.shape[1:]).float().cpu()
        return out

    def calls_info(self, t_sec: int, timesteps: list[int]) -> dict:
        k = int(self.k)
        return {"model_calls_per_record": t_sec // k + 2,
                "model_calls_made_per_record": max(timesteps) // k + 2 * len(timesteps)}

    def score_maps(self, maps: torch.Tensor, context: AttackContext) -> tuple[np.ndarray, dict]:
        """Scores `(Q,)` from t-error maps `(Q, C, H, W)` at one timestep, and extra info."""
        raise NotImplementedError

    def score(self, context: AttackContext) -> AttackOutput:
        denoiser = denoiser_of(context, self.name)
        t_sec, sweep = self.checked_timesteps(int(denoiser.num_train_timesteps))
        self.check_inputs(context)
        timesteps = sorted({t_sec} | set(sweep))
        maps = self.t_error_maps(context, timesteps)
        column = {t: i for i, t in enumerate(timesteps)}
        scores, info = self.score_maps(maps[:, column[t_sec]], context)
        info.update(self.calls_info(t_sec, timesteps))
        if sweep:
            info["sweep"] = sweep_scores(sweep, lambda t: self.score_maps(maps[:, column[t]], context)[0])
        return AttackOutput(scores=scores, info=info)

    def check_inputs(self, context: AttackContext) -> None:
        """Fail before the costly inversion; `secmi_nn` checks its labelled subset here."""


def t_error(maps: torch.Tensor) -> torch.Tensor:
    """||x~_t - x_t||^2 summed over pixels, `(Q,)` float64, from the maps |x~_t - x_t| `(Q, C, H, W)`."""
    return (maps.double() ** 2).flatten(1).sum(dim=1)


@register_attack
class SecMIStat(SecMI):
    name = "secmi_stat"

    def score_maps(self, maps, context):
        return (-t_error(maps)).numpy(), {}


class TErrorClassifier(nn.Module):
    """A small CNN: t-error maps `(N, C, H, W)` -> membership logits `(N,)`."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).squeeze(1)


@register_attack
class SecMINN(SecMI):
    name = "secmi_nn"
    needs_labelled_subset = True
    defaults = {
        **SecMI.defaults,
        "nn_width": 32,  # channels of the classifier's first layer
        "nn_epochs": 50,  # passes over the labelled subset
        "nn_lr": 1e-3,  # Adam learning rate
        "nn_batch_size": 64,
    }

    def check_inputs(self, context: AttackContext) -> None:
        self.labelled_subset(context)
        for key in ("nn_width", "nn_epochs", "nn_batch_size"):
            check_positive_int(getattr(self, key), key, self.name)
        if isinstance(self.nn_lr, bool) or not isinstance(self.nn_lr, (int, float)) or not self.nn_lr > 0:
            raise MiaGenError(f"attack '{self.name}': nn_lr must be a number > 0, got {self.nn_lr!r}.")

    def labelled_subset(self, context: AttackContext) -> tuple[np.ndarray, np.ndarray]:
        """(positions into the queries, 0/1 labels), both int64 `(L,)`, checked."""
        subset = getattr(context, "labelled_subset", None)
        if subset is None:
            raise MiaGenError(
                "secmi_nn trains a classifier and needs a labelled subset of the records "
                "(`context.labelled_subset` = (positions, labels)), which the pipeline draws for it; "
                "give it one (e.g. a fraction of the split held out for training), or use `secmi_stat`, "
                "which needs no labels."
            )
        positions, labels = (np.asarray(part) for part in subset)
        n = len(context.queries)
        if (positions.ndim != 1 or positions.shape != labels.shape or len(positions) == 0
                or not np.issubdtype(positions.dtype, np.integer)):
            raise MiaGenError("secmi_nn: labelled_subset must be two equal-length 1-d arrays "
                              "(integer record positions, 0/1 labels).")
        if positions.min() < 0 or positions.max() >= n or len(np.unique(positions)) != len(positions):
            raise MiaGenError(f"secmi_nn: labelled_subset positions must be distinct and in [0, {n}) "
                              "(positions into the queries).")
        if not set(np.unique(labels).tolist()) == {0, 1}:
            raise MiaGenError("secmi_nn: labelled_subset needs both members (1) and non-members (0) "
                              "to learn from; enlarge the labelled fraction.")
        return positions.astype(np.int64), labels.astype(np.int64)

    def score_maps(self, maps, context):
        positions, labels = self.labelled_subset(context)
        train = maps[positions]
        # one scalar shift and scale, from the training maps only: t-errors are tiny numbers
        shift, scale = float(train.mean()), float(train.std()) or 1.0
        inputs = ((maps - shift) / scale).to(context.device)
        classifier = self.fit(inputs[torch.as_tensor(positions, device=context.device)],
                              torch.as_tensor(labels, dtype=torch.float32, device=context.device),
                              int(context.seed))
        with torch.no_grad():
            logits = torch.cat([classifier(inputs[part]) for part in chunks(len(inputs), 1024)])
        return logits.double().cpu().numpy(), {"trained_on": positions.tolist()}

    def fit(self, inputs: torch.Tensor, targets: torch.Tensor, seed: int) -> TErrorClassifier:
        """Train a classifier (Adam, binary cross-entropy) on maps `(L, C, H, W)` and 0/1 targets `(L,)`."""
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(seed)
            classifier = TErrorClassifier(inputs.shape[1], int(self.nn_width)).to(inputs.device)
        order_rng = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=float(self.nn_lr))
        loss_fn = nn.BCEWithLogitsLoss()
        classifier.train()
        for _ in range(int(self.nn_epochs)):
            order = torch.randperm(len(inputs), generator=order_rng).to(inputs.device)
            for part in chunks(len(order), int(self.nn_batch_size)):
                loss = loss_fn(classifier(inputs[order[part]]), targets[order[part]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return classifier.eval()
