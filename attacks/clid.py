"""CLiD (Zhai et al., NeurIPS'24): conditional likelihood discrepancy of a text-to-image diffusion model.

A model fine-tuned on (image, caption) pairs fits a member's denoising loss under its own caption far
better than under a weakened caption. Per record, with x0 its latent (`Denoiser.to_x0`) and one noise draw
eps_i per timestep t_i, i < n (`record_noise`, a function of (seed, record id)):

    L(c) = mean over the n timesteps and all elements of (eps_theta(x_t_i, t_i, emb(c)) - eps_i)^2,
    x_t_i = sqrt(abar_t_i) x0 + sqrt(1 - abar_t_i) eps_i,

L = L(caption) and d_w = L(w) - L for each weakened caption w with the same noises and timesteps:
the caption's first, middle and last third by characters, and the empty caption (paper Sec. 4, the
reference code's "clip" variant; its importance variant, which cuts the most important words, needs a
per-word importance file for every caption and is not built). Timesteps: t_i = t_center - (t_step n) // 2 + t_step i (reference:
T // 2, 10, 3 -> 485, 495, 505). Aggregation (the reference's cal_clid_th.py): features (L, -mean_w d_w),
each scaled by a `RobustScaler` (median, interquartile range), s = (1 - alpha) L' + alpha (-mean d)',
lower s = member; the score is -s. alpha in {0, 0.1, ..., 1} is chosen by the best AUC (ties: the smallest
alpha) on

- `alpha=shadow`, the paper's threat model: shadow models' rows (the zoo's K shadows, each fine-tuned as the
  target on its half of the records, IN / OUT known to the attacker), the scaler fitted on them too and applied
  to the target's features. The reference code (`cal_clid_th.py`) fits them on one shadow model's split; it is
  not in `zhaisf/CLiD`@16b3f57 (README and poster only), so this follows the paper's and the issue's description;
- `alpha=labelled_subset` (default): the labelled calibration subset of the target's own records, then left out
  of the evaluation: a stronger threat model (the attacker knows some of the target's members), no shadows;
- a given alpha in [0, 1], with the scaler fitted on all queries without labels.

Differences from the reference code: x0 is the VAE posterior mean, not a sample (DESIGN.md: a record
has one x0); the noises are drawn per record from (seed, record id), not from a global stream; by default the
scaler and alpha come from the labelled subset of the same queries (`alpha=shadow`: from K >= 2 shadows pooled,
where the reference has one); the score is the continuous -s (the framework's metrics sweep all thresholds)
instead of the reference's thresholded decision.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, is_integer, register_attack
from mia_gen.attacks.timesteps import (
    check_positive_int, chunks, conditions_of, denoiser_of, epsilon_batched, forward_noise, record_noise, x0_of,
)
from mia_gen.errors import MiaGenError

ALPHAS = tuple(i / 10 for i in range(11))  # the reference's grid for the weight of the discrepancy
CALIBRATIONS = ("labelled_subset", "shadow")  # where the scaler and alpha are fitted (module docstring)


def clid_timesteps(num_train_timesteps: int, n_timesteps: int, t_step: int, t_center: int | None = None) -> list[int]:
    """The n timesteps t_center - (t_step n) // 2 + t_step i (t_center default T // 2), unchecked."""
    center = num_train_timesteps // 2 if t_center is None else int(t_center)
    start = center - (int(t_step) * int(n_timesteps)) // 2
    return [start + int(t_step) * i for i in range(int(n_timesteps))]


def weakened_captions(caption: str, include_null: bool = True) -> list[str]:
    """The caption's first, middle and last third by characters (the reference's cut points int(n / 3),
    int(2 n / 3)), then "" (the unconditional branch) when `include_null`."""
    n = len(caption)
    first, second = n // 3, (2 * n) // 3
    return [caption[:first], caption[first:second], caption[second:]] + ([""] if include_null else [])


def robust_scaled(features: np.ndarray, fit_on: np.ndarray) -> tuple[np.ndarray, dict]:
    """`features` `(Q, 2)` scaled by sklearn's `RobustScaler` fitted on the rows `fit_on`; and its center / scale."""
    from sklearn.preprocessing import RobustScaler

    scaler = RobustScaler().fit(features[fit_on])
    return scaler.transform(features), {"center": scaler.center_.tolist(), "scale": scaler.scale_.tolist()}


def clid_statistic(scaled: np.ndarray, alpha: float) -> np.ndarray:
    """s = (1 - alpha) L' + alpha (-mean d)' from the scaled features `(Q, 2)`; lower = member."""
    return (1.0 - alpha) * scaled[:, 0] + alpha * scaled[:, 1]


def best_alpha(scaled: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """The alpha of `ALPHAS` whose score -s has the best AUC on these labelled rows (ties: the smallest);
    and every alpha's AUC."""
    from sklearn.metrics import roc_auc_score

    aucs = [float(roc_auc_score(labels, -clid_statistic(scaled, alpha))) for alpha in ALPHAS]
    return ALPHAS[int(np.argmax(aucs))], aucs  # argmax: the first of equal maxima


@register_attack
class CLiD(Attack):
    name = "clid"
    access = Access.WHITE_BOX
    version = 2  # 2: the denoiser is called on batches of one fixed shape (batch-invariant on any CPU)
    defaults = {
        "n_timesteps": 3,  # timesteps per record (reference: 3)
        "t_step": 10,  # spacing of the timesteps (reference: 10)
        "t_center": None,  # null = T // 2; the timesteps are centred on it
        "include_null": True,  # also weaken to the empty caption (the unconditional branch)
        "alpha": "labelled_subset",  # weight of the discrepancy: chosen on labelled_subset | shadow (the zoo), or in [0, 1]
        "batch_size": 64,  # model inputs per call
    }

    def __init__(self, **params):
        super().__init__(**params)
        for key in ("n_timesteps", "t_step", "batch_size"):
            check_positive_int(getattr(self, key), key, self.name)
        if self.t_center is not None and not is_integer(self.t_center):
            raise MiaGenError(f"attack 'clid': t_center must be an integer timestep or null (T // 2), "
                              f"got {self.t_center!r}.")
        if not isinstance(self.include_null, bool):
            raise MiaGenError(f"attack 'clid': include_null must be true or false, got {self.include_null!r}.")
        if self.alpha not in CALIBRATIONS and (isinstance(self.alpha, bool) or not isinstance(
                self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0):
            raise MiaGenError(
                f"attack 'clid': alpha must be 'shadow' (chosen on shadow models' IN / OUT rows, the paper's threat "
                f"model), 'labelled_subset' (on a labelled part of the target's records) or a number in [0, 1], got "
                f"{self.alpha!r}."
            )

    @property
    def needs_labelled_subset(self) -> bool:
        return self.alpha == "labelled_subset"

    @property
    def needs_shadow_models(self) -> bool:
        return self.alpha == "shadow"

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        """The checked timesteps of this attack for a model with T = `num_train_timesteps`."""
        timesteps = clid_timesteps(num_train_timesteps, self.n_timesteps, self.t_step, self.t_center)
        if timesteps[0] < 0 or timesteps[-1] >= num_train_timesteps:
            raise MiaGenError(
                f"attack 'clid': the timesteps {timesteps[0]}..{timesteps[-1]} (n_timesteps={self.n_timesteps}, "
                f"t_step={self.t_step}, t_center={self.t_center}) leave the model's [0, {num_train_timesteps}); "
                "choose fewer or closer timesteps, or another t_center."
            )
        return timesteps

    def check_inputs(self, context: AttackContext) -> tuple[torch.nn.Module, list[str]]:
        """The text-conditioned denoiser and the queries' captions, or a `MiaGenError` saying what is missing."""
        denoiser = denoiser_of(context, self.name)
        kind = getattr(denoiser, "condition_kind", "none")
        if kind != "text":
            raise MiaGenError(
                f"attack 'clid' compares a record's loss under its caption and weakened captions: it needs a "
                f"text-to-image model (e.g. a Stable Diffusion pipeline directory), but this model's condition is "
                f"{kind!r}. Use `model=diffusers model.checkpoint=<text-to-image pipeline>`, or other attacks."
            )
        captions = context.captions
        if captions is None or len(captions) != len(context.queries) or not all(isinstance(c, str) for c in captions):
            got = "none" if captions is None else f"{len(captions)} for {len(context.queries)} records"
            raise MiaGenError(
                f"attack 'clid' needs captioned records (one caption per query), got {got}: give each record's "
                "caption (data.captions=true for the digits; a metadata.jsonl with file_name and text beside an "
                "image folder)."
            )
        return denoiser, list(captions)

    def labelled_subset(self, context: AttackContext) -> tuple[np.ndarray, np.ndarray]:
        """(positions into the queries, 0/1 labels), int64 `(K,)` each, checked."""
        if context.labelled_subset is None:
            raise MiaGenError(
                "attack 'clid' with alpha=labelled_subset chooses its weight on a labelled subset of the records "
                "(`context.labelled_subset` = (positions, labels)), which the pipeline draws "
                "(evaluation.labelled_fraction); give one, or set attack.clid.alpha to a number in [0, 1]."
            )
        positions, labels = (np.asarray(part) for part in context.labelled_subset)
        n = len(context.queries)
        if positions.ndim != 1 or positions.shape != labels.shape or not np.issubdtype(positions.dtype, np.integer) \
                or len(np.unique(positions)) != len(positions) or (len(positions) and not (
                    0 <= positions.min() and positions.max() < n)):
            raise MiaGenError(f"attack 'clid': labelled_subset must be distinct integer positions in [0, {n}) and "
                              "their 0/1 labels, two equal-length 1-d arrays.")
        if set(np.unique(labels).tolist()) != {0, 1}:
            raise MiaGenError("attack 'clid': the labelled subset needs both members (1) and non-members (0) to "
                              "choose alpha; raise evaluation.labelled_fraction.")
        return positions.astype(np.int64), labels.astype(np.int64)

    def features(self, context: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Per record: L `(Q,)` and the discrepancies d_w = L(w) - L `(Q, W)`, float64 (W = 3 or 4 weakenings)."""
        denoiser, captions = self.check_inputs(context)
        timesteps = self.timesteps(int(denoiser.num_train_timesteps))
        batch_size = int(self.batch_size)
        full = conditions_of(context, self.name)
        device, n_t = context.device, len(timesteps)
        n_variants = 1 + len(weakened_captions("", self.include_null))  # the caption, then its weakenings
        losses = torch.empty(len(captions), n_variants, dtype=torch.float64)
        records_x0 = x0_of(context.queries, denoiser, device)  # once for all records (to_x0 is batch-invariant)
        for part in chunks(len(captions), max(1, batch_size // (n_t * n_variants))):
            x0 = records_x0[part]
            n, shape = len(x0), x0.shape[1:]
            noise = record_noise(context.record_ids[part], context.seed, n_t, shape).to(x0.device)  # (n, n_t, ...)
            t = torch.tensor(timesteps, device=x0.device).repeat(n)
            x_t = forward_noise(x0.repeat_interleave(n_t, dim=0), t, noise.reshape(-1, *shape),
                                denoiser.alphas_cumprod).view(n, 1, n_t, *shape)
            conditions = self.caption_conditions(denoiser, captions[part], None if full is None else full[part])
            jobs = (n, n_variants, n_t)  # record-major, then caption variant, then timestep
            predicted = epsilon_batched(
                denoiser, x_t.expand(*jobs, *shape).reshape(-1, *shape),
                t.view(n, 1, n_t).expand(jobs).reshape(-1), batch_size, device,
                conditions[:, :, None].expand(*jobs, *conditions.shape[2:]).reshape(-1, *conditions.shape[2:]))
            error = predicted.double().view(*jobs, *shape) - noise.double().view(n, 1, n_t, *shape)
            losses[part] = (error ** 2).flatten(2).mean(dim=2).cpu()  # F.mse_loss: over elements and timesteps
        return losses[:, 0], losses[:, 1:] - losses[:, :1]

    def caption_conditions(self, denoiser, captions: list[str], full: torch.Tensor | None) -> torch.Tensor:
        """`(n, 1 + W, L, D)`: each record's caption embedding (`full`, or embedded here), then its weakenings'."""
        weakened = [w for caption in captions for w in weakened_captions(caption, self.include_null)]
        distinct = list(dict.fromkeys(weakened if full is not None else captions + weakened))
        embedded = denoiser.text_conditions(distinct)
        row = {caption: i for i, caption in enumerate(distinct)}
        if full is None:
            full = embedded[[row[c] for c in captions]]
        weak = embedded[[row[w] for w in weakened]].view(len(captions), -1, *embedded.shape[1:])
        return torch.cat([full.to(weak.device, weak.dtype)[:, None], weak], dim=1)

    def feature_rows(self, context: AttackContext) -> tuple[np.ndarray, torch.Tensor]:
        """The features (L, -mean_w d_w) `(Q, 2)` of the context's records under its model, and the discrepancies."""
        loss, discrepancy = self.features(context)
        return torch.stack([loss, -discrepancy.mean(dim=1)], dim=1).numpy(), discrepancy

    def shadow_rows(self, context: AttackContext) -> tuple[np.ndarray, np.ndarray]:
        """Every shadow's feature rows and IN (1) / OUT (0) labels, pooled (shadow by shadow)."""
        membership = np.asarray(context.shadow_membership)
        if membership.shape != (len(context.shadow_models), len(context.queries)) or membership.dtype != bool:
            raise MiaGenError(f"attack 'clid': shadow_membership must be a bool (K, Q) IN/OUT matrix of the zoo, got "
                              f"{membership.dtype} {membership.shape}.")
        if membership.all() or not membership.any():
            raise MiaGenError("attack 'clid': alpha=shadow needs shadows' IN and OUT rows among the records; the "
                              "zoo has only one kind.")
        for k, view in enumerate(context.shadow_models):
            try:
                self.check_inputs(view)
            except MiaGenError as error:
                raise MiaGenError(f"shadow model {k}: {error}") from None
        rows = np.concatenate([self.feature_rows(view)[0] for view in context.shadow_models])
        return rows, membership.reshape(-1).astype(int)

    def score(self, context: AttackContext) -> AttackOutput:
        self.check_inputs(context)  # before the labelled subset: a model CLiD cannot attack is the first thing to say
        subset = self.labelled_subset(context) if self.needs_labelled_subset else None
        features, discrepancy = self.feature_rows(context)
        info = {"timesteps": self.timesteps(int(context.denoiser.num_train_timesteps)),
                "weakened_example": weakened_captions(context.captions[0], self.include_null),
                "loss": features[:, 0].tolist(), "mean_discrepancy": discrepancy.mean(dim=1).tolist()}
        if self.alpha == "shadow":  # the paper's threat model: fitted on shadow models' IN / OUT rows
            rows, labels = self.shadow_rows(context)
            both, info["scaler"] = robust_scaled(np.vstack([rows, features]), np.arange(len(rows)))  # fit: shadows
            alpha, info["alpha_aucs"] = best_alpha(both[: len(rows)], labels)
            scaled = both[len(rows):]
            info.update(alpha=alpha, calibration="shadow", n_shadows=len(context.shadow_models),
                        shadow_indices=list(context.shadow_indices or []))
            return AttackOutput(scores=-clid_statistic(scaled, alpha), info=info)
        if subset is None:
            alpha = float(self.alpha)
            scaled, info["scaler"] = robust_scaled(features, np.arange(len(features)))
        else:
            positions, labels = subset
            scaled, info["scaler"] = robust_scaled(features, positions)
            alpha, info["alpha_aucs"] = best_alpha(scaled[positions], labels)
            info["trained_on"] = positions.tolist()
        info["alpha"] = alpha
        return AttackOutput(scores=-clid_statistic(scaled, alpha), info=info)
