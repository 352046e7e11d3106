"""RMIA (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML'24) on any attack's
per-record statistic, with the zoo's shadow models as reference models and the split's reference records
as the population z.

A record x scores the fraction of population records z it dominates: LR(x, z) = [Pr(x|theta) / Pr(x)] /
[Pr(z|theta) / Pr(z)] >= gamma, where Pr(.|theta) is the target model's and Pr(.) the reference models'
average. For a generative model, Pr(x|theta) = exp(-s / temperature) with s the statistic (the wrapped
attack's score negated: a loss or a distance). Online, Pr(x) averages all shadows; offline only those
that did not train on x, with the paper's linear correction `offline_a` (`attacks/shadow_stats.py`).

`temperature=auto` (the default) is the statistic's per-dimension scale, read from its type
(`Attack.statistic`, `mia_gen.statistic`): the number of dimensions a summed loss adds up, dims^(1/p) for an
L_p norm. With temperature 1 (version 1) a denoising loss summed over 256 pixels (~40) gave Pr(x | theta) ~
e^-40, so the offline correction 0.5 ((1 + a) Pr_OUT + (1 - a)) was the same constant for every record and
RMIA ranked records exactly as the loss does; such a setting is now refused (`shadow_stats.rmia`).
"""

from __future__ import annotations

import numpy as np

from mia_gen.attacks.base import AttackContext, AttackOutput, WrapperAttack, register_attack
from mia_gen.attacks.lira import MODES, shadow_info
from mia_gen.attacks.shadow_stats import rmia
from mia_gen.errors import MiaGenError


@register_attack
class RMIA(WrapperAttack):
    name = "rmia"
    version = 2  # 2: temperature=auto (the statistic's per-dimension scale) by default; was 1
    defaults = {
        "attack": "diffusion_loss",  # the attack whose (negated) score is the statistic s
        "params": None,  # its parameters (its own defaults where not given)
        "mode": "online",  # online: Pr(x) over all shadows | offline: over the OUT shadows, corrected by offline_a
        "offline_a": None,  # offline only, in [0, 1]: required (the paper chooses it by attacking one reference
        #                     model with the others; mia-gen never picks it on the evaluated records)
        "gamma": 1.0,  # the pairwise likelihood-ratio threshold
        "temperature": "auto",  # Pr(x | theta) = exp(-s / temperature); auto: the statistic's per-dimension scale
    }
    needs_shadow_models = True
    needs_population = True

    def __init__(self, **params):
        super().__init__(**params)
        if self.mode not in MODES:
            raise MiaGenError(f"attack '{self.name}': mode must be one of {list(MODES)}, got {self.mode!r}.")
        if self.mode == "offline" and (self.offline_a is None or isinstance(self.offline_a, bool)
                                       or not 0.0 <= float(self.offline_a) <= 1.0):
            raise MiaGenError(
                f"attack '{self.name}': mode=offline needs offline_a in [0, 1] (the paper's a), got {self.offline_a!r}; "
                "choose it without the evaluated records (the paper attacks one reference model with the others), "
                "or use mode=online.")
        if self.temperature != "auto" and (isinstance(self.temperature, bool)
                                           or not isinstance(self.temperature, (int, float))
                                           or not float(self.temperature) > 0):
            raise MiaGenError(f"attack '{self.name}': temperature must be auto (the statistic's per-dimension "
                              f"scale) or a positive number, got {self.temperature!r}.")
        self.require_per_record_statistic("compares per-record statistics across models")

    def score(self, context: AttackContext) -> AttackOutput:
        def statistic(view: AttackContext) -> np.ndarray:
            return -self.inner(view).scores

        target, target_z = statistic(context), statistic(context.population)
        shadows = np.stack([statistic(view) for view in context.shadow_models])
        shadows_z = np.stack([statistic(view.population) for view in context.shadow_models])
        temperature = self.resolved_temperature(context)
        fit = rmia(target, shadows, target_z, shadows_z, membership=context.shadow_membership,
                   offline_a=None if self.mode == "online" else float(self.offline_a), gamma=float(self.gamma),
                   log_probability=lambda s: -s / temperature)
        info = shadow_info(fit, context, self.attack, -target)
        info.update(mode=self.mode, n_population=len(target_z), temperature=temperature)
        return AttackOutput(scores=fit.scores, info=info)

    def resolved_temperature(self, context: AttackContext) -> float:
        """The temperature as a number: the wrapped statistic's per-dimension scale for `auto`."""
        if self.temperature == "auto":
            return self.inner_statistic(context, "temperature=auto").scale
        return float(self.temperature)
