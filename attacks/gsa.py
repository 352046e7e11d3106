"""GSA, the gradient substitution attack (Pang et al., "White-box Membership Inference Attacks against
Diffusion Models", PoPETs'25): per-layer gradient norms of the denoising loss, classified by boosted
trees trained on a zoo of shadow models.

By default it runs as GSA's reference code does (`REFERENCE`: `DDPM/gen_l2_gradients_DDPM.py` for the
features, `test_attack_accuracy.py` for the classifier):

1. Features (attacks/gsa_features.py): for every query record, under each shadow model and under the
   target, one gradient-norm feature per parameter tensor (GSA1: the norm of the gradient of the loss
   averaged over k timesteps; GSA2: the per-timestep norms averaged), at k = 10 timesteps
   t = (i + 1) T / k - 1 (`reference_timesteps`: 99, 199, ..., 999 for T = 1000). The loss is summed over
   pixels where GSA's code averages it: a constant factor on every feature, which the scaling removes.
2. The shadows' rows pooled: every shadow's IN rows, then every shadow's OUT rows; the IN rows cut to the
   number of OUT rows (`balance=truncate`); all of them scaled together (`standardize=pooled`,
   `sklearn.preprocessing.scale`); the target's rows scaled by their own mean / std (no labels used).
3. The classifier (XGBoost's `XGBClassifier(n_estimators=200)` when the `[gsa]` extra is installed, else
   scikit-learn's gradient boosting; `info["classifier"]` says which ran, and the score's key holds it)
   trained on 70% of those rows (`train_fraction`, a seeded split; the reference's is unseeded), its
   probability of IN on the target's rows the score; `info["shadow_test_auc"]` on the held-out 30%.

mia-gen's version 1 remains as named settings: `spacing=rounded n_timesteps=15` (t = round((i + 1) T / k),
an older commit of GSA's code), `standardize=per_model` (each model's features by their own mean / std),
`balance=none`, `train_fraction=1`, `classifier=sklearn`.
"""

from __future__ import annotations

import importlib

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import scale

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, register_attack
from mia_gen.attacks.gsa_features import BACKENDS, VARIANTS, fit_gsa_classifier, gsa_features, gsa_scores
from mia_gen.attacks.timesteps import check_images, check_positive_int, check_timesteps, conditions_of, denoiser_of
from mia_gen.errors import MiaGenError

REFERENCE = ("py85252876/GSA@494ce8c1a304afbb97abae59b42c65b6c5d932c2 (2024-12-09): DDPM/gen_l2_gradients_DDPM.py, "
             "test_attack_accuracy.py")
STANDARDIZE = ("pooled", "per_model", "none")
SPACINGS = ("reference", "rounded")
BALANCES = ("truncate", "none")


def xgboost_installed() -> bool:
    """Whether the `[gsa]` extra's xgboost imports here."""
    try:
        importlib.import_module("xgboost")
    except ImportError:
        return False
    return True


def reference_timesteps(n: int, num_train_timesteps: int) -> list[int]:
    """GSA's code (`REFERENCE`): `[x - 1 for x in range(int(T / n), T + 1, int(T / n))]`, i.e. t = (i + 1) T / n - 1
    (n of them when n divides T; T // (T // n) otherwise, as there)."""
    T = int(num_train_timesteps)
    step = T // n
    if step < 1:
        raise MiaGenError(f"GSA: n_timesteps={n} exceeds the model's {T} timesteps.")
    return [x - 1 for x in range(step, T + 1, step)]


def spread_timesteps(n: int, num_train_timesteps: int) -> list[int]:
    """mia-gen's version 1 (an older commit of GSA's code): t_i = round((i + 1) T / n) (halves up), clipped to
    T - 1, for i = 0..n-1."""
    T = int(num_train_timesteps)
    return [min((2 * (i + 1) * T + n) // (2 * n), T - 1) for i in range(n)]


def pooled_rows(features: list[np.ndarray], membership: np.ndarray, balance: str) -> tuple[np.ndarray, np.ndarray]:
    """GSA's `preprocess` (`REFERENCE`) on the shadows: every shadow's IN rows, then every shadow's OUT rows;
    with balance="truncate" the IN rows cut to the number of OUT rows. Returns (rows, labels 1 = IN)."""
    members = np.concatenate([f[row] for f, row in zip(features, membership)])
    non_members = np.concatenate([f[~row] for f, row in zip(features, membership)])
    if balance == "truncate":
        members = members[: len(non_members)]
    return np.vstack([members, non_members]), np.r_[np.ones(len(members)), np.zeros(len(non_members))]


@register_attack
class GSA(Attack):
    name = "gsa"
    access = Access.WHITE_BOX
    version = 2  # 2: GSA's reference pipeline by default (10 timesteps, pooled scaling, truncation, 70% split)
    needs_shadow_models = True
    defaults = {
        "variant": "gsa1",  # gsa1: norm of the timestep-averaged loss's gradient | gsa2: mean of per-timestep norms
        "n_timesteps": 10,  # k timesteps (GSA's code: sampling_frequency 10)
        "spacing": "reference",  # reference: t = (i+1) T / k - 1 (GSA's code) | rounded: round((i+1) T / k) (version 1)
        "timesteps": None,  # null | explicit list of timesteps, overriding n_timesteps and spacing
        "classifier": "auto",  # auto: xgboost when installed (GSA's), else sklearn | sklearn | xgboost
        "n_estimators": 200,  # boosting rounds (GSA's code: 200)
        "standardize": "pooled",  # pooled: all shadows' rows scaled together (GSA's code) | per_model | none
        "balance": "truncate",  # truncate: IN rows cut to the number of OUT rows (GSA's code) | none
        "train_fraction": 0.7,  # share of the shadows' rows the classifier trains on (GSA's code: 0.7; seeded)
        "batch_size": 16,  # records per vmapped gradient (memory: batch_size x the number of parameters)
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.auto_classifier = self.classifier == "auto"
        if self.auto_classifier:  # resolved here, so the score's key holds the backend that runs
            self.classifier = "xgboost" if xgboost_installed() else "sklearn"
            self.config["classifier"] = self.classifier

    def _timesteps(self, num_train_timesteps: int) -> list[int]:
        if self.timesteps is not None:
            return check_timesteps(self.timesteps, num_train_timesteps, self.name)
        n = check_positive_int(self.n_timesteps, "n_timesteps", self.name)
        if n > num_train_timesteps:
            raise MiaGenError(f"attack '{self.name}': n_timesteps={n} exceeds the model's {num_train_timesteps} "
                              "training timesteps; choose n_timesteps <= T (GSA's code: 10).")
        spread = reference_timesteps if self.spacing == "reference" else spread_timesteps
        return spread(n, num_train_timesteps)

    def _check_settings(self) -> None:
        for key, allowed in (("variant", VARIANTS), ("classifier", BACKENDS), ("standardize", STANDARDIZE),
                             ("spacing", SPACINGS), ("balance", BALANCES)):
            if getattr(self, key) not in allowed:
                raise MiaGenError(f"attack '{self.name}': {key} must be one of {list(allowed)}, "
                                  f"got {getattr(self, key)!r}.")
        check_positive_int(self.n_estimators, "n_estimators", self.name)
        check_positive_int(self.batch_size, "batch_size", self.name)
        fraction = self.train_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
            raise MiaGenError(f"attack '{self.name}': train_fraction must lie in (0, 1] (GSA's code: 0.7), got "
                              f"{fraction!r}.")

    def features(self, context: AttackContext, timesteps: list[int], whose: str, scaled: bool = True) -> np.ndarray:
        """GSA features `(Q, P)` of the queries under the context's model (target or shadow), with its own
        conditions and seed; scaled by their own mean / std when `scaled` and standardize is not "none" (the
        shadows' rows under "pooled" are scaled together in `score`)."""
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
        return scale(features) if scaled and self.standardize != "none" else features

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
        pooled = self.standardize == "pooled"
        per_shadow = [self.features(shadow, timesteps, f"shadow model {k}", scaled=not pooled)
                      for k, shadow in enumerate(shadows)]
        rows, labels = pooled_rows(per_shadow, membership, self.balance)
        if pooled:
            rows = scale(rows)
        train, test, train_labels, test_labels = (rows, None, labels, None) if float(self.train_fraction) == 1 else \
            train_test_split(rows, labels, test_size=round(1.0 - float(self.train_fraction), 12),
                             random_state=int(context.seed))  # test_size as GSA's code gives it (0.3)
        classifier = fit_gsa_classifier(train, train_labels, self.classifier, context.seed, int(self.n_estimators))
        scores = gsa_scores(classifier, self.features(context, timesteps, "target model"))
        info = {
            "n_shadows": len(shadows),
            "shadow_indices": list(context.shadow_indices) if context.shadow_indices is not None else None,
            "n_timesteps": len(timesteps),
            "timesteps": timesteps,
            "variant": self.variant,
            "classifier": self.classifier,
            "reference": REFERENCE,
            "n_features": int(rows.shape[1]),
            "shadow_rows": {"train": len(train), "held_out": 0 if test is None else len(test)},
            # diagnostics: the classifier on its own training rows (an upper bound) and on the held-out rows
            "shadow_train_auc": float(roc_auc_score(train_labels, gsa_scores(classifier, train))),
            "shadow_test_auc": None if test is None or len(np.unique(test_labels)) < 2 else
            float(roc_auc_score(test_labels, gsa_scores(classifier, test))),
        }
        if self.auto_classifier and self.classifier == "sklearn":
            info["classifier_note"] = ("scikit-learn's HistGradientBoostingClassifier ran: GSA's code uses XGBoost "
                                       '(pip install "mia-gen[gsa]", then classifier=auto or xgboost)')
        return AttackOutput(scores=scores, info=info)
