"""LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P'22) on any attack's
per-record statistic, with the zoo of shadow models (`AttackContext.shadow_models`).

The statistic of a record under a model is the wrapped attack's score negated (a loss or a distance:
the diffusion loss at fixed per-record noise, PIA's distance, SecMI's t-error, a GAN's reconstruction
or 1-NN distance). For each record, Gaussians are fitted to its statistic under the shadows that trained
on it (IN) and those that did not (OUT), and the target model's statistic is scored by their likelihood
ratio (online) or by its distance from the OUT fit (offline); `attacks/shadow_stats.py` holds the formulas
and how they follow the paper's code. Several queries per record (e.g. several timesteps or noise draws,
`queries`) are fitted separately and their per-query scores averaged, as the paper's code averages over
augmentations.

The pipeline trains (and caches) the shadows and hands over whatever part of the zoo is trained, with a
warning when it is incomplete; a record that cannot be fitted (never OUT, or never IN online) is reported
and left unscored, never scored from a degenerate Gaussian.

Per-record fits make a record's score independent of the records scored with it. Two settings pool over
the records scored together, as the paper's code does: `global_variance` (one variance for all of them)
and, with the reference estimator, the common number of IN / OUT shadows each record's fit uses (it only
differs from the record's own counts when the zoo is unbalanced: an odd or incomplete zoo). The pipeline
always scores all evaluated records in one call, so their scores are reproducible.
"""

from __future__ import annotations

import numpy as np

from mia_gen.attacks.base import AttackContext, AttackOutput, WrapperAttack, build_attack, register_attack
from mia_gen.attacks.shadow_stats import ShadowScores, lira_offline, lira_online
from mia_gen.errors import MiaGenError
from mia_gen.statistic import TRANSFORMS

MODES = ("online", "offline")


def shadow_statistics(attacks: list, context: AttackContext, transform: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The statistic of each query attack (lower = member: its scores negated, or with `transform` its declared
    statistic transformed, `mia_gen.statistic`) on the target `(N, Q)` and on every shadow `(K, N, Q)`."""
    def statistic(view: AttackContext) -> np.ndarray:
        if transform is None:
            return -np.stack([attack(view).scores for attack in attacks], axis=1)
        return np.stack([attack.statistic(view).transformed(transform).values(attack(view).scores)
                         for attack in attacks], axis=1)

    return statistic(context), np.stack([statistic(shadow) for shadow in context.shadow_models])


def shadow_info(fit: ShadowScores, context: AttackContext, base_attack: str, base_scores: np.ndarray) -> dict:
    """What every shadow attack reports: the shadows used, the unscored records and the base statistic."""
    info = {"n_shadows": len(context.shadow_models), "shadow_indices": list(context.shadow_indices or []),
            "base": {"attack": base_attack, "scores": base_scores.tolist()}}
    if not fit.scored.all():
        positions = np.flatnonzero(~fit.scored)
        info["unscored"] = {"positions": positions.tolist(), "reasons": fit.reasons[positions].tolist()}
    return info


@register_attack
class LiRA(WrapperAttack):
    name = "lira"
    defaults = {
        "attack": "diffusion_loss",  # the attack whose (negated) score is the per-record statistic
        "params": None,  # its parameters (its own defaults where not given)
        "queries": None,  # several queries per record: a list of parameter overrides, one per query, e.g.
        #                   [{timestep: 50}, {timestep: 100}, {timestep: 200}]; null = one query
        "mode": "online",  # online: IN and OUT fits | offline: OUT shadows only
        "global_variance": False,  # one variance for all records (the paper's choice for few shadows)
        "estimator": "reference",  # reference: the paper's code (median, np.std) | unbiased: mean, ddof=1
        "transform": None,  # null | log (a positive, skewed statistic: distances, losses) | logit (one in (0, 1))
    }
    needs_shadow_models = True

    @property
    def min_shadows(self) -> int:
        return 2 if self.global_variance else 4

    @property
    def min_shadows_why(self) -> str:
        return ("one IN and one OUT shadow per record" if self.global_variance else
                "per-record variances need two IN and two OUT shadows per record; global_variance=true needs 2")

    def __init__(self, **params):
        super().__init__(**params)
        if self.mode not in MODES:
            raise MiaGenError(f"attack '{self.name}': mode must be one of {list(MODES)}, got {self.mode!r}.")
        self.require_per_record_statistic("fits a per-record statistic over shadow models")
        if self.transform not in TRANSFORMS:
            raise MiaGenError(f"attack '{self.name}': transform must be null, log or logit, got {self.transform!r}.")
        queries = self.queries
        if queries is not None and (not isinstance(queries, (list, tuple)) or not queries
                                    or not all(isinstance(q, dict) for q in queries)):
            raise MiaGenError(
                f"attack '{self.name}': queries must be null or a non-empty list of parameter overrides of "
                f"'{self.attack}', e.g. [{{timestep: 50}}, {{timestep: 100}}]; got {queries!r}.")
        inner_params = self.config["params"]
        self.query_attacks = [build_attack(str(self.attack), {**inner_params, **dict(q)}) for q in queries] \
            if queries else [self.inner]
        self.config["queries"] = None if not queries else [
            {k: v for k, v in q.config.items() if k != "_target_"} for q in self.query_attacks]

    def score(self, context: AttackContext) -> AttackOutput:
        if self.transform is not None:
            self.inner_statistic(context, f"transform={self.transform}")
        target, shadows = shadow_statistics(self.query_attacks, context, self.transform)
        fit_kwargs = {"global_variance": bool(self.global_variance), "estimator": self.estimator}
        if self.mode == "online":
            fit = lira_online(target, shadows, context.shadow_membership, **fit_kwargs)
        else:
            fit = lira_offline(target, shadows, context.shadow_membership, **fit_kwargs)
        base = self.attack if len(self.query_attacks) == 1 else f"{self.attack} (mean of {len(self.query_attacks)} queries)"
        info = shadow_info(fit, context, base, -target.mean(axis=1))
        info.update(mode=self.mode, n_queries=len(self.query_attacks))
        return AttackOutput(scores=fit.scores, info=info)
