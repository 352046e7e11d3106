"""Typed per-record statistics (mia_gen/statistic.py) and the wrappers that read them: RMIA's temperature,
LiRA's transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mia_gen.attacks import Access, AttackContext, AttackOutput, build_attack
from mia_gen.attacks.shadow_stats import lira_online
from mia_gen.errors import MiaGenError
from mia_gen.statistic import Statistic

DIMS = 256  # a 1x16x16 record: a denoising loss summed over 256 pixels is ~40


def test_scale_transforms_and_their_domains():
    assert Statistic("loss", True, "sum", DIMS).scale == DIMS
    assert Statistic("norm", True, "norm", DIMS, p=4).scale == pytest.approx(DIMS ** 0.25)
    assert Statistic("mean", True, "mean", DIMS).scale == 1.0
    loss = Statistic("loss", True, "sum", DIMS)
    scores = -np.array([4.0, 9.0])  # an attack's scores: the loss negated
    np.testing.assert_allclose(loss.values(scores), [4.0, 9.0])  # lower = member
    np.testing.assert_allclose(loss.transformed("log").values(scores), np.log([4.0, 9.0]))
    count = Statistic("count", False, "mean", 1, transform="logit")  # higher = member, in (0, 1)
    np.testing.assert_allclose(count.values(np.array([0.2, 0.5])), -np.log([0.25, 1.0]))
    assert loss.per_dimension(np.array([DIMS * 0.5]))[0] == pytest.approx(0.5)
    with pytest.raises(MiaGenError, match="positive statistic"):
        loss.transformed("log").values(np.array([1.0]))  # a loss of -1
    with pytest.raises(MiaGenError, match=r"in \(0, 1\)"):
        count.values(np.array([1.0]))
    for bad in ({"reduction": "max"}, {"transform": "sqrt"}, {"dims": 0}):
        with pytest.raises(MiaGenError):
            Statistic(**{"name": "x", "lower_is_member": True, "reduction": "sum", "dims": 4, **bad})


class StubStatistic:
    """A per-record attack whose 'denoising loss' per model is given: scores = -loss, a declared sum over DIMS."""

    access, uses_samples, needs_reference_data, needs_labelled_subset = Access.WHITE_BOX, False, False, False

    def __init__(self, losses: dict[int, np.ndarray]):
        self.losses = losses

    def __call__(self, view: AttackContext) -> AttackOutput:
        return AttackOutput(scores=-self.losses[id(view)][view.record_ids])

    def statistic(self, view: AttackContext) -> Statistic:
        return Statistic("stub denoising loss", True, "sum", DIMS)


def zoo(seed: int = 0, n: int = 400, k: int = 8, m: int = 100):
    """Records whose difficulty (a loss of ~40 +- 6, shared by every model) dwarfs the member effect (-2):
    the plain loss barely separates members; a statistic calibrated on the shadows does."""
    rng = np.random.default_rng(seed)
    members = np.zeros(n, dtype=bool)
    members[rng.permutation(n)[: n // 2]] = True
    membership = np.zeros((k, n), dtype=bool)
    for j in range(n):
        membership[rng.permutation(k)[: k // 2], j] = True
    difficulty, difficulty_z = rng.normal(40, 6, n), rng.normal(40, 6, m)

    def loss(trained_on):
        return difficulty + rng.normal(0, 0.5, n) - 2.0 * trained_on, difficulty_z + rng.normal(0, 0.5, m)

    ids, z_ids = np.arange(n), np.arange(m)
    views, losses = [], {}

    def view(trained_on):
        records, population = loss(trained_on)
        context = AttackContext(queries=torch.zeros(n, 1, 16, 16), record_ids=ids, seed=0)
        context.population = AttackContext(queries=torch.zeros(m, 1, 16, 16), record_ids=z_ids, seed=0)
        losses[id(context)], losses[id(context.population)] = records, population
        views.append(context)
        return context

    target = view(members)
    target.shadow_models = [view(row) for row in membership]
    target.shadow_membership, target.shadow_indices = membership, list(range(k))
    return target, members, StubStatistic(losses)


def with_stub(name: str, params: dict, stub: StubStatistic):
    attack = build_attack(name, {"attack": "diffusion_loss", **params})
    attack.inner = stub
    if name == "lira":
        attack.query_attacks = [stub]
    return attack


def test_offline_rmia_beats_the_plain_statistic_and_the_old_temperature_is_refused():
    target, members, stub = zoo()
    plain = roc_auc_score(members, stub(target).scores)
    rmia = with_stub("rmia", {"mode": "offline", "offline_a": 0.5}, stub)
    output = rmia(target)
    assert output.info["temperature"] == DIMS  # auto: the summed loss's per-dimension scale
    assert roc_auc_score(members, output.scores) > plain + 0.15, (plain, roc_auc_score(members, output.scores))
    # temperature 1 (version 1's default): Pr_OUT ~ e^-40, the correction a constant, RMIA = the plain loss
    with pytest.raises(MiaGenError, match="same for every record"):
        with_stub("rmia", {"mode": "offline", "offline_a": 0.5, "temperature": 1.0}, stub)(target)
    online = with_stub("rmia", {}, stub)(target)  # online, auto
    assert roc_auc_score(members, online.scores) > plain + 0.15


def test_lira_fits_the_transformed_statistic():
    target, members, stub = zoo(seed=1)
    lira = with_stub("lira", {"transform": "log"}, stub)
    scores = lira(target).scores
    log_target = np.log(-stub(target).scores)[:, None]
    log_shadows = np.stack([np.log(-stub(view).scores)[:, None] for view in target.shadow_models])
    np.testing.assert_allclose(scores, lira_online(log_target, log_shadows, target.shadow_membership).scores)
    assert roc_auc_score(members, scores) > roc_auc_score(members, stub(target).scores) + 0.15
    with pytest.raises(MiaGenError, match="transform must be null, log or logit"):
        build_attack("lira", {"transform": "sqrt"})


def test_a_wrapper_that_needs_a_type_says_which_attacks_declare_one():
    target, _, stub = zoo(n=40, m=10)
    rmia = with_stub("rmia", {}, stub)
    stub.statistic = lambda view: None  # an attack that declares no statistic type
    with pytest.raises(MiaGenError, match="does not declare one; attacks that do: diffusion_loss"):
        rmia(target)
    assert with_stub("rmia", {"temperature": 3.0}, stub)(target).info["temperature"] == 3.0
