"""GSA, the gradient substitution attack (Pang et al., "White-box Membership Inference Attacks against
Diffusion Models", PoPETs'25): per-layer gradient norms of the denoising loss, classified by boosted
trees trained on a zoo of shadow models.

1. Features (attacks/gsa_features.py): for every query record, under each shadow model and under the
   target, one gradient-norm feature per parameter tensor (GSA1: the norm of the gradient of the loss
   averaged over k timesteps; GSA2: the per-timestep norms averaged). By default k = 15 timesteps spread
   as GSA's code does: t_i = round((i + 1) T / k), clipped to T - 1 (100, 200, ..., 1400, 1499 for T = 1500).
   The loss is summed over pixels where GSA's code averages it: a constant factor on every feature, to
   which the trees are invariant (and the per-model standardisation removes it).
2. Standardisation ("per_model", as GSA's code with `sklearn.preprocessing.scale`): each model's features
   by their own mean and std over its records, no labels used; it removes the scale that differs from
   one model to another.
3. A classifier trained on every shadow's rows (features, IN = 1 / OUT = 0 of that shadow, the zoo's
   matrix), applied to the target's features: the score is its probability of IN.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import scale

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.attacks.gsa_features import BACKENDS, VARIANTS, fit_gsa_classifier, gsa_features, gsa_scores
from mia_gen.attacks.timesteps import check_images, check_positive_int, check_timesteps, conditions_of, denoiser_of
from mia_gen.errors import MiaGenError

STANDARDIZE = ("per_model", "none")


def spread_timesteps(n: int, num_train_timesteps: int) -> list[int]:
    """GSA's timesteps: t_i = round((i + 1) T / n) (halves up), clipped to T - 1, for i = 0..n-1."""
    T = int(num_train_timesteps)
    return [min((2 * (i + 1) * T + n) // (2 * n), T - 1) for i in range(n)]


@register_attack
class GSA(Attack):
    name = "gsa"
    access = Access.WHITE_BOX
    needs_shadow_models = True
    defaults = {
        "variant": "gsa1",  # gsa1: norm of the timestep-averaged loss's gradient | gsa2: mean of per-timestep norms
        "n_timesteps": 15,  # k timesteps spread over [0, T) (spread_timesteps)
        "timesteps": None,  # null | explicit list of timesteps, overriding n_timesteps
        "classifier": "sklearn",  # sklearn: HistGradientBoostingClassifier | xgboost (GSA's; extra [gsa])
        "n_estimators": 200,  # boosting rounds (GSA's code: 200)
        "standardize": "per_model",  # per_model: each model's features scaled by their own mean / std | none
        "batch_size": 16,  # records per vmapped gradient (memory: batch_size x the number of parameters)
    }

    def _timesteps(self, num_train_timesteps: int) -> list[int]:
        if self.timesteps is not None:
            return check_timesteps(self.timesteps, num_train_timesteps, self.name)
        n = check_positive_int(self.n_timesteps, "n_timesteps", self.name)
        if n > num_train_timesteps:
            raise MiaGenError(f"attack '{self.name}': n_timesteps={n} exceeds the model's {num_train_timesteps} "
                              "training timesteps; choose n_timesteps <= T (GSA's code: 15).")
        return spread_timesteps(n, num_train_timesteps)

    def _check_settings(self) -> None:
        for key, allowed in (("variant", VARIANTS), ("classifier", BACKENDS), ("standardize", STANDARDIZE)):
            if getattr(self, key) not in allowed:
                raise MiaGenError(f"attack '{self.name}': {key} must be one of {list(allowed)}, "
                                  f"got {getattr(self, key)!r}.")
        check_positive_int(self.n_estimators, "n_estimators", self.name)
        check_positive_int(self.batch_size, "batch_size", self.name)

    def features(self, context: AttackContext, timesteps: list[int], whose: str) -> np.ndarray:
        """GSA features `(Q, P)` of the queries under the context's model (target or shadow), with its own
        conditions and seed; scaled by their own mean / std unless standardize is "none"."""
        try:
            denoiser = denoiser_of(context, self.name)
        except MiaGenError as error:
            raise MiaGenError(f"{whose}: {error}") from None
        check_images(context.queries, denoiser, self.name)
        features, _ = gsa_features(denoiser, context.queries, context.record_ids, context.seed, timesteps,
                                   self.variant, int(self.batch_size), context.device,
                                   conditions_of(context, self.name))
        if not np.isfinite(features).all():
            raise MiaGenError(f"attack '{self.name}': the {whose}'s gradient norms contain NaN or infinite values "
                              "(a diverged model?); check that model's training.")
        return scale(features) if self.standardize == "per_model" else features

    def score(self, context: AttackContext) -> AttackOutput:
        self._check_settings()
        shadows = list(context.shadow_models or [])  # at least 2: Attack.check_context
        n_queries = len(context.queries)
        membership = np.asarray(context.shadow_membership) if context.shadow_membership is not None else None
        if membership is None or membership.shape != (len(shadows), n_queries) or membership.dtype != bool:
            raise MiaGenError(
                f"attack '{self.name}': shadow_membership must be a bool (K, Q) = ({len(shadows)}, {n_queries}) "
                f"IN/OUT matrix of the zoo, got "
                f"{None if membership is None else (membership.dtype, membership.shape)}.")
        if membership.all() or not membership.any():
            raise MiaGenError(
                f"attack '{self.name}': the shadow zoo has no {'OUT' if membership.all() else 'IN'} record among "
                "the queries, so the classifier has nothing to tell apart; each shadow must be trained on a "
                "random half of a population that holds the queries (the zoo's default).")
        for k, shadow in enumerate(shadows):
            if len(shadow.queries) != n_queries or not np.array_equal(shadow.record_ids, context.record_ids):
                raise MiaGenError(f"attack '{self.name}': shadow {k} sees other records than the target "
                                  "(its record_ids differ); a shadow's context must hold the same queries.")
        timesteps = self._timesteps(int(denoiser_of(context, self.name).num_train_timesteps))
        shadow_features = np.concatenate([self.features(shadow, timesteps, f"shadow model {k}")
                                          for k, shadow in enumerate(shadows)])
        labels = membership.reshape(-1)  # rows ordered (shadow, query), as the features are stacked
        classifier = fit_gsa_classifier(shadow_features, labels, self.classifier, context.seed,
                                        int(self.n_estimators))
        scores = gsa_scores(classifier, self.features(context, timesteps, "target model"))
        info = {
            "n_shadows": len(shadows),
            "shadow_indices": list(context.shadow_indices) if context.shadow_indices is not None else None,
            "n_timesteps": len(timesteps),
            "timesteps": timesteps,
            "variant": self.variant,
            "classifier": self.classifier,
            "n_features": int(shadow_features.shape[1]),
            # diagnostic: the classifier on its own training rows (an upper bound, not a test AUC)
            "shadow_train_auc": float(roc_auc_score(labels, gsa_scores(classifier, shadow_features))),
        }
        return AttackOutput(scores=scores, info=info)
