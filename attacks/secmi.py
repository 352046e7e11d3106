"""SecMI, step-wise error comparing membership inference (Duan et al., ICML'23).

Deterministic DDIM inversion carries x0 along 0 -> k -> 2k -> ... (x0 enters as the state at
timestep 0, as in the reference code) up to the timestep measured, t_m; one DDIM step out to
t_m + k and one back give x~_{t_m}. Members are reconstructed better. The t-error is
||x~_{t_m} - x_{t_m}||^2 summed over pixels (paper Eq. 9; the reference's `naive_statistic_attack`).
x0 is `denoiser.to_x0(record)`: the image, or a latent model's VAE latent (then the maps are latent maps).

Which timestep `t_sec` names (`timestep_convention`):
- `reference` (default): `t_sec` is the reference script's `--t_sec`. Its inversion visits
  range(0, t_sec, k), so it stops at t_m = t_sec - k and measures t_sec - k -> t_sec -> t_sec - k:
  at t_sec=100, k=10 the step 90 -> 100 -> 90, as the published numbers were computed.
- `measured`: `t_sec` is t_m itself, t_sec -> t_sec + k -> t_sec (mia-gen before version 2).
`sweep_timesteps` follow the same convention. Every formula is unclipped (DESIGN.md pitfall).

- `secmi_stat`: score = -t_error.
- `secmi_nn`: a classifier learns member / non-member from the t-error maps |x~ - x| (per pixel,
  C channels) of an explicit labelled subset (`context.labelled_subset`); it scores every record and
  says which positions it trained on (`info["trained_on"]`), so that evaluation drops them.
  `classifier=resnet18` is the reference's (`nns_attack`): a CIFAR-style ResNet-18 on the raw maps,
  SGD (momentum 0.9, weight decay 5e-4), squared error of its output to the 0/1 label, 15 epochs of
  batches of 128 at lr 1e-3. `classifier=small_cnn` is mia-gen's earlier 3-layer CNN (Adam, binary
  cross-entropy, maps standardised by the training maps' mean and std).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.attacks.timesteps import (
    check_images, check_positive_int, check_timesteps, chunks, conditions_of, ddim_step, denoiser_of,
    epsilon_batched, full_t, repeat_conditions, sample_dims, sweep_list, sweep_scores, x0_of,
)
from mia_gen.errors import MiaGenError
from mia_gen.fixed_batches import in_fixed_chunks
from mia_gen.statistic import Statistic


TIMESTEP_CONVENTIONS = ("reference", "measured")
SCORING_ROWS = 16  # t-error maps per classifier call when scoring (a fixed shape: mia_gen/fixed_batches.py)


class SecMI(Attack):
    """Shared by both variants: t-error maps at t_sec (and at each sweep timestep)."""

    access = Access.WHITE_BOX
    # 2: t_sec in the reference code's convention by default; secmi_nn's ResNet-18. 3: every network call
    # (denoiser, classifier) of one fixed shape (batch-invariant on any CPU)
    version = 3
    defaults = {
        "t_sec": 100,  # the reference's --t_sec: measures t_sec - k -> t_sec -> t_sec - k (see timestep_convention)
        "k": 10,  # DDIM interval, for the inversion and for the step out and back
        "timestep_convention": "reference",  # reference | measured: which timestep t_sec names
        "sweep_timesteps": None,  # null | list of multiples of k: also score at each t (info["sweep"])
        "batch_size": 256,  # model inputs per call
    }

    def measured_timestep(self, t: int) -> int:
        """t_m, the timestep whose state is compared, for a configured t (t_sec or a sweep timestep)."""
        return int(t) - int(self.k) if self.timestep_convention == "reference" else int(t)

    def checked_timesteps(self, T: int) -> tuple[int, list[int]]:
        k = check_positive_int(self.k, "k (the DDIM interval)", self.name)
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise MiaGenError(
                f"{self.name}: timestep_convention must be one of {', '.join(TIMESTEP_CONVENTIONS)}, got "
                f"{self.timestep_convention!r}; `reference` reads t_sec as the reference code does "
                "(t_sec=100 measures 90 -> 100 -> 90), `measured` as the timestep measured (100 -> 110 -> 100)."
            )
        (t_sec,) = check_timesteps([self.t_sec], T, self.name, "t_sec")
        sweep = sweep_list(self.sweep_timesteps, T, self.name)
        for t in [t_sec, *sweep]:
            if t % k:
                raise MiaGenError(
                    f"{self.name}: the DDIM inversion visits 0, k, 2k, ... (k={k}), so t={t} is never "
                    f"reached; choose t_sec and sweep_timesteps among multiples of {k}, or change k."
                )
            if self.measured_timestep(t) < 0:
                raise MiaGenError(
                    f"{self.name}: with timestep_convention=reference, t={t} measures the step t - k -> t -> "
                    f"t - k (k={k}); choose t >= {k}, or timestep_convention=measured."
                )
            if self.measured_timestep(t) + k >= T:
                raise MiaGenError(
                    f"{self.name}: t={t} plus the interval k={k} leaves the model's [0, {T}) timesteps; "
                    f"choose t <= {T - 1 - k}."
                )
        return t_sec, sweep

    def t_error_maps(self, context: AttackContext, timesteps: list[int]) -> torch.Tensor:
        """|x~_t - x_t| per pixel of x0's space (a latent model's latents) at each measured timestep t
        (t -> t + k -> t), `(Q, len(timesteps), C, H, W)` float32 on the CPU; `timesteps` are measured
        timesteps, ascending multiples of k."""
        denoiser = denoiser_of(context, self.name)
        check_images(context.queries, denoiser, self.name)
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        abar, k, device, n_t = denoiser.alphas_cumprod, int(self.k), context.device, len(timesteps)
        records_x0 = x0_of(context.queries, denoiser, device)  # a latent model's VAE latents
        conditions = conditions_of(context, self.name)
        out = torch.empty(len(records_x0), n_t, *records_x0.shape[1:])
        for part in chunks(len(records_x0), max(1, batch_size // n_t)):
            x = records_x0[part]
            n = len(x)
            condition = None if conditions is None else conditions[part]
            condition_jobs = repeat_conditions(condition, n_t)
            states = {0: x}  # kept only at the timesteps measured
            for t in range(0, max(timesteps), k):  # deterministic inversion, one record batch
                eps = epsilon_batched(denoiser, x, full_t(t, n, device), batch_size, device, condition)
                x = ddim_step(x, eps, full_t(t, n, device), full_t(t + k, n, device), abar)
                if t + k in timesteps:
                    states[t + k] = x
            # jobs ordered (record, t): one step out to t + k and back to t
            x_t = torch.stack([states[t] for t in timesteps], dim=1).flatten(0, 1)
            t_jobs = torch.tensor(timesteps, device=device).repeat(n)
            eps = epsilon_batched(denoiser, x_t, t_jobs, batch_size, device, condition_jobs)
            x_out = ddim_step(x_t, eps, t_jobs, t_jobs + k, abar)
            eps_out = epsilon_batched(denoiser, x_out, t_jobs + k, batch_size, device, condition_jobs)
            x_back = ddim_step(x_out, eps_out, t_jobs + k, t_jobs, abar)
            out[part] = (x_back - x_t).abs().view(n, n_t, *x.shape[1:]).float().cpu()
        return out

    def calls_info(self, measured: list[int], t_sec_measured: int) -> dict:
        k = int(self.k)
        return {"t_measured": t_sec_measured,
                "model_calls_per_record": t_sec_measured // k + 2,
                "model_calls_made_per_record": max(measured) // k + 2 * len(measured)}

    def score_maps(self, maps: torch.Tensor, context: AttackContext) -> tuple[np.ndarray, dict]:
        """Scores `(Q,)` from t-error maps `(Q, C, H, W)` at one timestep, and extra info."""
        raise NotImplementedError

    def score(self, context: AttackContext) -> AttackOutput:
        denoiser = denoiser_of(context, self.name)
        t_sec, sweep = self.checked_timesteps(int(denoiser.num_train_timesteps))
        self.check_inputs(context)
        timesteps = sorted({t_sec} | set(sweep))  # as configured; measured_timestep keeps their order
        measured = [self.measured_timestep(t) for t in timesteps]
        maps = self.t_error_maps(context, measured)
        column = {t: i for i, t in enumerate(timesteps)}
        scores, info = self.score_maps(maps[:, column[t_sec]], context)
        info.update(self.calls_info(measured, self.measured_timestep(t_sec)))
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

    def statistic(self, context: AttackContext) -> Statistic:
        return Statistic("SecMI t-error (squared error summed over x0's dimensions)", True, "sum",
                         sample_dims(context, self.name))

    def score_maps(self, maps, context):
        return (-t_error(maps)).numpy(), {}


class SmallCNN(nn.Module):
    """mia-gen's earlier classifier, a 3-layer CNN: t-error maps `(N, C, H, W)` -> logits `(N,)`.

    Recipe: maps standardised by the training maps' mean and std, Adam, binary cross-entropy.
    """

    standardise_inputs = True
    width = 32  # channels of the first layer

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, self.width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(self.width, 2 * self.width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * self.width, 2 * self.width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * self.width, 1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).squeeze(1)

    @staticmethod
    def optimizer(parameters, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=lr)

    loss = staticmethod(nn.functional.binary_cross_entropy_with_logits)


class ResNet18(nn.Module):
    """The reference's classifier (`resnet.ResNet18(num_channels=C, num_classes=1)` in its `nns_attack`):
    t-error maps `(N, C, H, W)` -> one output `(N,)`, higher = member.

    torchvision's ResNet-18 (`weights=None`: nothing is downloaded) in its CIFAR form, as the
    reference builds it: a 3x3 stride-1 first conv without bias, no max-pool, one output, every layer
    in PyTorch's default initialisation. Its global average pool is adaptive: the reference's
    `avg_pool2d(out, 4)` equals it on 32-px maps and fails on smaller ones.
    Recipe (the reference's): the raw maps, SGD with momentum 0.9 and weight decay 5e-4, squared error
    of the output to the 0/1 label.
    """

    standardise_inputs = False

    def __init__(self, channels: int):
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(weights=None, num_classes=1)
        self.net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()
        for module in self.net.modules():  # torchvision re-initialises convs (Kaiming, fan_out); the reference does not
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).squeeze(1)

    @staticmethod
    def optimizer(parameters, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=5e-4)

    loss = staticmethod(nn.functional.mse_loss)


CLASSIFIERS = {"resnet18": ResNet18, "small_cnn": SmallCNN}


def training_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`order` cut into batches of `batch_size`; a last batch of one record joins the one before
    (BatchNorm cannot normalise a single record in training mode)."""
    parts = [order[part] for part in chunks(len(order), batch_size)]
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


@register_attack
class SecMINN(SecMI):
    name = "secmi_nn"
    needs_labelled_subset = True
    defaults = {
        **SecMI.defaults,
        "classifier": "resnet18",  # resnet18 (the reference's, with its recipe) | small_cnn (mia-gen's earlier)
        "nn_epochs": 15,  # passes over the labelled subset (reference: 15)
        "nn_lr": 1e-3,  # learning rate (reference: 1e-3, SGD for resnet18; Adam for small_cnn)
        "nn_batch_size": 128,  # reference: 128
    }

    def check_inputs(self, context: AttackContext) -> None:
        self.labelled_subset(context)
        if self.classifier not in tuple(CLASSIFIERS):
            raise MiaGenError(f"attack '{self.name}': classifier must be one of {', '.join(CLASSIFIERS)}, "
                              f"got {self.classifier!r} (resnet18 is the reference's).")
        for key in ("nn_epochs", "nn_batch_size"):
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
        inputs = maps
        if CLASSIFIERS[self.classifier].standardise_inputs:
            # one scalar shift and scale, from the training maps only: t-errors are tiny numbers
            train = maps[positions]
            shift, scale = float(train.mean()), float(train.std()) or 1.0
            inputs = (maps - shift) / scale
        inputs = inputs.to(context.device)
        classifier = self.fit(inputs[torch.as_tensor(positions, device=context.device)],
                              torch.as_tensor(labels, dtype=torch.float32, device=context.device),
                              int(context.seed))
        with torch.no_grad():  # eval mode, calls of one shape: a record's logit does not depend on its batch
            logits = in_fixed_chunks(classifier, inputs, SCORING_ROWS)
        return logits.double().cpu().numpy(), {"trained_on": positions.tolist()}

    def fit(self, inputs: torch.Tensor, targets: torch.Tensor, seed: int) -> nn.Module:
        """Train the classifier with its recipe on maps `(L, C, H, W)` and 0/1 targets `(L,)`, seeded.

        The model of the last epoch is kept. The reference means to keep the epoch most accurate on the
        records it then evaluates (fitting on the test set), but never updates its best accuracy, so it
        too keeps the last epoch (with any correct prediction).
        """
        cls = CLASSIFIERS[self.classifier]
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(seed)
            classifier = cls(inputs.shape[1]).to(inputs.device)
        order_rng = torch.Generator().manual_seed(seed)
        optimizer = cls.optimizer(classifier.parameters(), float(self.nn_lr))
        classifier.train()
        for _ in range(int(self.nn_epochs)):
            order = torch.randperm(len(inputs), generator=order_rng).to(inputs.device)
            for batch in training_batches(order, int(self.nn_batch_size)):
                loss = cls.loss(classifier(inputs[batch]), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return classifier.eval()
