"""The small base every attack stands on: its declared access, its config, and `score`.

An attack declares what it may see (`access`, `needs_reference_data`); the pipeline builds an
`AttackContext` holding only that. Labels never reach an attack: `evaluate` alone sees them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from mia_gen.errors import MiaGenError
from mia_gen.statistic import Statistic


class Access(str, enum.Enum):
    """Threat models from DESIGN.md, weakest first."""

    SAMPLES = "samples"  # full black-box: a store of generated samples only
    QUERY = "query"  # partial black-box: G(z) without gradients
    WHITE_BOX = "white_box"  # weights and gradients


@dataclass
class AttackContext:
    """Everything an attack may use, filled by the pipeline according to the attack's access.

    queries (`torch.Tensor` of shape `(Q, ...)`): the records to score (members and non-members,
        in record-id order, unlabelled); images in [-1, 1].
    record_ids (`np.ndarray` of shape `(Q,)`): dataset indices of the queries.
    samples: a `SampleStore` of generated samples, for attacks that use one (`Attack.uses_samples`).
    generator: the generator, only for `query` / `white_box` access.
    discriminator: the GAN's discriminator, only for `white_box` access.
    denoiser: a diffusion model's `mia_gen.models.denoiser.Denoiser`, only for `white_box` access.
    conditions: the queries' conditions for a conditional denoiser, aligned with `queries` (class ids
        `torch.Tensor` of shape `(Q,)` int64: the records' class labels, which the attacker holding a
        record knows, never the membership label); None for an unconditional model.
    captions (`list[str]`): the queries' captions, aligned with `queries`, only for a text-conditioned
        diffusion model (`conditions` then holds their text embeddings); attacks that weaken captions (CLiD)
        embed their variants with `denoiser.text_conditions`.
    labelled_subset (`(positions, labels)`): only for attacks that learn from labels (e.g. SecMI-NNs):
        positions into `queries` and their member labels; evaluation drops these records.
    reference (`torch.Tensor` of shape `(R, ...)`): only when the attack needs reference data.
    reference_model: the same queries seen through a reference model (an `AttackContext` whose
        generator / samples / discriminator come from a model trained the same way on reference
        records), only for attacks that calibrate against one (`needs_reference_model`).
    groups (`{n: np.ndarray of shape (G, n)}`): only for attacks that decide groups of records jointly
        (`Attack.group_draw`, co-membership): rows of positions into `queries`, each all members or all
        non-members, shuffled together and unlabelled (drawn by the pipeline, labelled again only in `evaluate`).
    shadow_models (`list[AttackContext]`): only for attacks that need a shadow zoo (`needs_shadow_models`):
        the same queries seen through each trained shadow model (same kind and training recipe as the
        target, each trained on a random half of the zoo's population, `mia_gen.zoo`), in zoo order.
    shadow_membership (`np.ndarray` bool of shape `(K, Q)`): with `shadow_models`, whether query q is in
        the training set of shadow k (the zoo's IN/OUT matrix, which the attacker drew: not the target's
        membership).
    shadow_indices (`list[int]`): each shadow's index in the zoo (a zoo may be incomplete: the pipeline
        hands over the trained shadows only and warns with the count).
    population (`AttackContext`): only for attacks that compare each query with population records z
        (`needs_population`, RMIA): the split's reference records (never evaluated, IN no shadow) seen
        through the same model as this context (the target's, or a shadow's in `shadow_models`).
    """

    queries: torch.Tensor
    record_ids: np.ndarray
    samples: Any = None
    generator: Optional[torch.nn.Module] = None
    discriminator: Optional[torch.nn.Module] = None
    denoiser: Optional[torch.nn.Module] = None
    conditions: Optional[torch.Tensor] = None
    captions: Optional[list[str]] = None
    labelled_subset: Optional[tuple[np.ndarray, np.ndarray]] = None
    reference: Optional[torch.Tensor] = None
    reference_model: Optional["AttackContext"] = None
    groups: Optional[dict[int, np.ndarray]] = None
    shadow_models: Optional[list["AttackContext"]] = None
    shadow_membership: Optional[np.ndarray] = None
    shadow_indices: Optional[list[int]] = None
    population: Optional["AttackContext"] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


@dataclass
class AttackOutput:
    """scores (`np.ndarray` of shape `(Q,)`, float64): higher means "more likely a member". NaN only
        where `info["unscored"]` says why (a shadow-model attack that cannot fit a record, e.g. one that
        is never OUT of a shadow); evaluation leaves those records out and reports them.

    neighbour_indices (`np.ndarray` of shape `(Q, k)`, optional): indices into the sample store of each
        query's nearest generated samples, used for the nearest-neighbour picture.
    """

    scores: np.ndarray
    neighbour_indices: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)


def is_integer(value) -> bool:
    """True for ints (and integral floats, as YAML may give), not for bools, strings or None."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def check_positive_int(value, what: str, attack_name: str) -> int:
    """`value` as an int >= 1, or a `MiaGenError` naming the setting."""
    if not is_integer(value) or int(value) < 1:
        raise MiaGenError(f"attack '{attack_name}': {what} must be a positive integer, got {value!r}.")
    return int(value)


ATTACKS: dict[str, type["Attack"]] = {}


def register_attack(cls: type["Attack"]) -> type["Attack"]:
    """Class decorator: make an attack buildable by its `name`."""
    if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
        raise ValueError(f"attack name '{cls.name}' is registered twice")
    ATTACKS[cls.name] = cls
    return cls


class Attack:
    """Base class: subclasses set `name`, `access`, `defaults` and implement `score`.

    `defaults` lists every parameter the attack takes with its default; constructor keyword
    arguments override them and become attributes. `self.config` (with `_target_`) records the
    exact settings, so every result can be traced back and the attack rebuilt.
    """

    name: ClassVar[str]
    access: ClassVar[Access]
    defaults: ClassVar[dict[str, Any]] = {}
    # The attack's code identity, part of its scores' cache key beside the package version: bump it with
    # any change to how the attack computes its scores (a formula, a random draw), so that scores cached
    # by the old code are recomputed. A subclass shares its parent's version unless it sets its own.
    version: ClassVar[int] = 1
    needs_reference_data: bool = False  # subclasses may make this a property of their config
    needs_labelled_subset: bool = False  # learns from a labelled part of the queries (then excluded)
    needs_reference_model: bool = False  # compares against a model trained the same way on reference data
    needs_shadow_models: bool = False  # reads a zoo of shadow models (AttackContext.shadow_models)
    needs_population: bool = False  # compares with population records z (AttackContext.population)
    min_shadows: int = 2  # shadow models it needs at least (checked before the zoo trains)
    min_shadows_why: str = "IN and OUT rows to tell apart"

    @property
    def uses_samples(self) -> bool:
        """Whether the attack reads the sample store (the pipeline only samples when one does)."""
        return self.access is Access.SAMPLES

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults) - {"_target_"})
        if unknown:
            raise MiaGenError(
                f"attack '{self.name}' has no parameter(s) {', '.join(unknown)}; "
                f"its parameters are: {', '.join(sorted(self.defaults))}."
            )
        settings = {**self.defaults, **{k: v for k, v in params.items() if k != "_target_"}}
        for key, value in settings.items():
            setattr(self, key, value)
        self.config = {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **settings}

    def code_versions(self) -> dict[str, int]:
        """`{attack name: version}` of every attack whose code computes these scores (a wrapper adds the
        attack it wraps); part of the scores' cache key."""
        return {self.name: self.version}

    def score(self, context: AttackContext) -> AttackOutput:
        raise NotImplementedError

    def statistic(self, context: AttackContext) -> Optional[Statistic]:
        """The type of the per-record statistic behind these scores (`mia_gen.statistic`: direction, reduction,
        scale), which LiRA and RMIA read; None where the attack does not declare one."""
        return None

    def check_split_sizes(self, n_members: int, n_non_members: int) -> None:
        """Fail before any work when the split cannot serve the attack (e.g. groups larger than it)."""

    def group_draw(self) -> Optional[tuple[list[int], int]]:
        """`(group sizes, groups per class and size)` for an attack that decides groups of records jointly
        (the pipeline then fills `AttackContext.groups`); None for a per-record attack."""
        return None

    def __call__(self, context: AttackContext) -> AttackOutput:
        self.check_context(context)
        output = self.score(context)
        scores = np.asarray(output.scores, dtype=np.float64)
        if scores.shape != (len(context.queries),):
            raise RuntimeError(
                f"attack '{self.name}' returned scores of shape {scores.shape} for "
                f"{len(context.queries)} queries; this is a bug in the attack."
            )
        declared = (output.info.get("unscored") or {}).get("positions", [])
        if not np.array_equal(np.flatnonzero(np.isnan(scores)), np.sort(np.asarray(declared, dtype=np.int64))):
            raise RuntimeError(
                f"attack '{self.name}' returned NaN scores other than the records it declares unscored "
                "(info['unscored']['positions']); this is a bug in the attack."
            )
        output.scores = scores
        return output

    def check_context(self, context: AttackContext) -> None:
        """Fail early, with the fix, when the pipeline could not provide what the attack needs."""
        if self.needs_shadow_models and len(context.shadow_models or []) < 2:
            raise MiaGenError(
                f"attack '{self.name}' needs a zoo of at least 2 trained shadow models, got "
                f"{len(context.shadow_models or [])}; set zoo.n_shadows (e.g. 8) and train the zoo with "
                "`mia-gen-train -m <same overrides> zoo.index='range(0,8)'` (or let `mia-gen` train it)."
            )
        if self.needs_population and (context.population is None or len(context.population.queries) == 0):
            raise MiaGenError(
                f"attack '{self.name}' compares each record with population records z (the split's reference "
                "records, IN no shadow); set split.n_reference > 0."
            )
        if context.samples is None and self.uses_samples:
            raise MiaGenError(
                f"attack '{self.name}' needs a store of generated samples; run the sample stage "
                "(`mia-gen-sample`) or point `sampling.store=<dir>` at an existing store."
            )
        if self.needs_reference_data and (context.reference is None or len(context.reference) == 0):
            raise MiaGenError(
                f"attack '{self.name}' needs reference data (records from the same distribution, "
                "disjoint from members and non-members); set `split.n_reference` > 0 or give a split "
                "file with a `reference` list."
            )
        if context.samples is not None and len(context.queries):
            sample_shape = tuple(context.samples.sample_shape)
            query_shape = tuple(context.queries.shape[1:])
            if sample_shape != query_shape:
                raise MiaGenError(
                    f"attack '{self.name}': query records have shape {query_shape} but generated "
                    f"samples have shape {sample_shape}; make `data.resolution` / `data.channels` "
                    "match the model that produced the samples."
                )


class WrapperAttack(Attack):
    """An attack built on another attack's per-record scores (its `attack` and `params` settings): it sees
    what the wrapped attack sees, and the wrapped attack's code is part of its scores' identity."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.attack == self.name:
            raise MiaGenError(f"{self.name} cannot wrap itself; set attack.{self.name}.attack to another attack.")
        self.inner = build_attack(str(self.attack), dict(self.params or {}))
        self.config["params"] = {k: v for k, v in self.inner.config.items() if k != "_target_"}

    @property
    def access(self):
        return self.inner.access

    @property
    def uses_samples(self) -> bool:
        return self.inner.uses_samples

    @property
    def needs_reference_data(self) -> bool:
        return self.inner.needs_reference_data

    @property
    def needs_labelled_subset(self) -> bool:
        return self.inner.needs_labelled_subset

    def check_split_sizes(self, n_members: int, n_non_members: int) -> None:
        self.inner.check_split_sizes(n_members, n_non_members)

    def code_versions(self) -> dict[str, int]:
        return {**self.inner.code_versions(), self.name: self.version}

    def inner_statistic(self, context: AttackContext, setting: str) -> Statistic:
        """The wrapped attack's statistic type; a clear error when it declares none (`setting` needs it)."""
        statistic = self.inner.statistic(context)
        if statistic is None:
            raise MiaGenError(
                f"attack '{self.name}': {setting} reads the statistic's type (its scale, its sign), but "
                f"'{self.attack}' does not declare one; attacks that do: diffusion_loss, pia, pian, secmi_stat, "
                "sample_distance.")
        return statistic

    def require_per_record_statistic(self, what: str) -> None:
        """Refuse a wrapped attack whose scores are not a plain per-record statistic (`what` the wrapper does)."""
        inner = self.inner
        if inner.needs_labelled_subset or inner.group_draw() is not None or inner.needs_reference_model \
                or inner.needs_shadow_models:
            raise MiaGenError(
                f"attack '{self.name}' {what}; '{self.attack}' learns from labels, decides groups or needs its own "
                "reference or shadow models: wrap a per-record attack (e.g. diffusion_loss, pia, secmi_stat, "
                "latent_inversion, sample_distance).")


def build_attack(name: str, params: Optional[dict] = None) -> Attack:
    """Build an attack by its registered name with keyword parameters.

    A config key that is not a registered name may still name an attack through `_target_`
    (e.g. `calibrated_fbb: {_target_: mia_gen.attacks.calibration.Calibration, ...}`), so one run can hold
    the same attack twice with different settings.
    """
    import mia_gen.attacks  # noqa: F401  (registers every attack module)

    params = dict(params or {})
    cls = ATTACKS.get(name)
    target = params.get("_target_")
    if cls is None and target:
        cls = next((c for c in ATTACKS.values() if f"{c.__module__}.{c.__qualname__}" == target), None)
    if cls is None:
        raise MiaGenError(
            f"unknown attack '{name}'{f' (_target_ {target})' if target else ''}; available: "
            f"{', '.join(sorted(ATTACKS))}. Select attacks with e.g. `attack=[sample_distance,domias]`."
        )
    return cls(**params)
