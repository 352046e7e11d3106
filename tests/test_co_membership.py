"""Co-membership (Liu et al., ICDM'19): groups drawn where labels are known, the attack network refined
on a group's targets jointly, and the per-record-average baseline on the same groups."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mia_gen.attacks.base import AttackContext, build_attack
from mia_gen.attacks.co_membership import train_encoder
from mia_gen.attacks.latent_inversion import ReconstructionObjective, invert
from mia_gen.errors import MiaGenError
from mia_gen.groups import draw_groups, group_labels, per_record_average
from mia_gen.metrics import group_auc
from test_gan_attacks import generated_and_far, generator  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"lambda_lpips": 0.0, "encoder_steps": 5, "encoder_batch_size": 32, "iterations": 5, "refine_steps": 4,
        "refine_lr": 1e-3}
IS_MEMBER = np.r_[np.ones(4, bool), np.zeros(4, bool)]  # generated_and_far: 4 images G made, 4 it does not


def context(queries, generator, groups, seed=4):
    return AttackContext(queries=queries, record_ids=np.arange(len(queries)), generator=generator,
                         groups=groups, seed=seed)


def test_groups_are_pure_seeded_shuffled_disjoint_and_drawn_only_from_the_eligible_records():
    is_member = np.r_[np.ones(30, bool), np.zeros(40, bool)]
    groups = draw_groups(is_member, [1, 4], n_groups=25, seed=3)
    assert sorted(groups) == [1, 4] and groups[1].shape == (50, 1)
    assert groups[4].shape == (7 + 10, 4)  # at most P // n disjoint groups of a class of P records
    for n, rows in groups.items():
        labels = group_labels(rows, is_member)  # raises on a mixed group
        assert labels.sum() == min(25, 30 // n)
        assert not np.array_equal(labels, np.sort(labels)[::-1])  # shuffled: not all member groups first
        assert len(set(rows.ravel().tolist())) == rows.size  # no record in two groups of one size
    np.testing.assert_array_equal(draw_groups(is_member, [4], 25, seed=3)[4], groups[4])
    assert not np.array_equal(draw_groups(is_member, [4], 25, seed=4)[4], groups[4])
    assert draw_groups(is_member, [4], 3, seed=3)[4].shape == (6, 4)  # n_groups caps each class
    eligible = np.r_[0:10, 50:70]
    assert set(draw_groups(is_member, [4], 25, seed=3, eligible=eligible)[4].ravel()) <= set(eligible)
    with pytest.raises(MiaGenError, match="at least 11 members"):
        draw_groups(is_member, [11], 5, seed=3, eligible=eligible)
    with pytest.raises(MiaGenError, match="mixes members and non-members"):
        group_labels(np.array([[0, 35]]), is_member)


def test_per_record_average_and_group_auc_equal_a_plain_loop_over_the_same_groups():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(12), np.zeros(9)].astype(int)
    scores = rng.normal(size=21) + 0.5 * labels
    rows = draw_groups(labels.astype(bool), [3], n_groups=7, seed=2)[3]
    averages = per_record_average(scores, rows)
    expected = [sum(scores[i] for i in row) / len(row) for row in rows]
    np.testing.assert_allclose(averages, expected, rtol=1e-12)
    member = [all(labels[i] for i in row) for row in rows]
    pairs = [(a, b) for a, m in zip(averages, member) if m for b, o in zip(averages, member) if not o]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)
    assert group_auc(labels, rows, averages) == pytest.approx(wins)


def encoder_reconstruction_distance(network, generator, targets):
    """The group decision's distance, written out: the mean L2 between each target and G(E(target))."""
    with torch.no_grad():
        return (generator(network(targets)) - targets).square().flatten(1).mean(1).double()


def test_without_refinement_a_group_scores_its_records_encoder_reconstructions(generator, generated_and_far):
    """refine_steps=0: a group scores minus the mean distance of its records to G(E(x)) through the pre-trained
    encoder; with per_record_search it is the per-record-average baseline (for n = 1: the per-record
    encoder-started inversion itself)."""
    groups = draw_groups(IS_MEMBER, [1, 2], n_groups=2, seed=0)
    params = {**FAST, "group_sizes": [1, 2], "refine_steps": 0}
    decided = build_attack("co_membership", params)(context(generated_and_far, generator, groups))
    searched = build_attack("co_membership", {**params, "per_record_search": True})(
        context(generated_and_far, generator, groups))
    encoder, _ = train_encoder(generator, (1, 16, 16), 5, 32, 1e-3, 4, torch.device("cpu"))
    with torch.no_grad():
        z0 = encoder(generated_and_far)
    distance, _, _ = invert(ReconstructionObjective(generator, generated_and_far, 0.0, 0.001), z0, "lbfgs", 5, 0.05, 1024)
    np.testing.assert_allclose(decided.scores, -distance.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(searched.scores, decided.scores, rtol=1e-12)  # the per-record attack is the same
    reconstructed = encoder_reconstruction_distance(encoder, generator, generated_and_far).numpy()
    for n, rows in groups.items():
        np.testing.assert_allclose(searched.info["group_scores"][str(n)], per_record_average(searched.scores, rows),
                                   rtol=1e-5)
        np.testing.assert_allclose(decided.info["group_scores"][str(n)], [-reconstructed[row].mean() for row in rows],
                                   rtol=1e-5)
        assert decided.info["groups"][str(n)] == rows.tolist()


@pytest.mark.parametrize("per_record_search", [False, True])
def test_joint_refinement_equals_a_plain_loop_that_fine_tunes_the_encoder_on_each_group(
        generator, generated_and_far, per_record_search):
    """A group's n targets refine one copy of the encoder together (Adam on their mean loss); the group is decided
    on the refined network's reconstructions (or, as an option, after each target's inversion from it); the
    batched attack matches this loop group by group."""
    groups = draw_groups(IS_MEMBER, [1, 2], n_groups=2, seed=1)
    params = {**FAST, "group_sizes": [1, 2], "batch_size": 2, "per_record_search": per_record_search}
    output = build_attack("co_membership", params)(context(generated_and_far, generator, groups))  # several chunks
    encoder, _ = train_encoder(generator, (1, 16, 16), 5, 32, 1e-3, 4, torch.device("cpu"))
    for n, rows in groups.items():
        expected = []
        for row in rows:
            targets = generated_and_far[torch.as_tensor(row)]
            objective = ReconstructionObjective(generator, targets, 0.0, 0.001)
            network = copy.deepcopy(encoder).requires_grad_(True)
            optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
            for _ in range(4):
                loss = objective(network(targets), torch.arange(n)).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if per_record_search:
                with torch.no_grad():
                    z = network(targets)
                distance, _, _ = invert(objective, z, "lbfgs", 5, 0.05, 1024)
            else:
                distance = encoder_reconstruction_distance(network, generator, targets)
            expected.append(-float(distance.double().mean()))
        np.testing.assert_allclose(output.info["group_scores"][str(n)], expected, rtol=1e-4, atol=1e-6)


class SoftMemorizer(torch.nn.Module):
    """A differentiable generator that memorises: G(z) = softmax(beta * W z) @ records, so its outputs are
    (near) its training records and the rest of image space is out of reach."""

    def __init__(self, records: torch.Tensor, latent_dim: int = 8, beta: float = 4.0):
        super().__init__()
        self.records = records.flatten(1)
        self.shape = records.shape[1:]
        self.latent_dim = latent_dim
        self.projection = torch.randn(len(records), latent_dim, generator=torch.Generator().manual_seed(0))
        self.beta = beta

    def sample_latent(self, n, generator=None):
        return torch.randn(n, self.latent_dim, generator=generator)

    def forward(self, z):
        weights = torch.softmax(self.beta * z @ self.projection.T, dim=1)
        return (weights @ self.records).reshape(len(z), *self.shape)


def test_groups_of_members_of_a_memorising_generator_are_decided_jointly_better_than_chance():
    rng = torch.Generator().manual_seed(5)
    images = torch.tanh(torch.nn.functional.avg_pool2d(torch.randn(48, 1, 32, 32, generator=rng), 2) * 4)
    members = images[:24]  # images[24:] are the non-members, never seen by the memoriser
    memoriser = SoftMemorizer(members)
    is_member = np.r_[np.ones(24, bool), np.zeros(24, bool)]
    groups = draw_groups(is_member, [4], n_groups=6, seed=0)  # 6 disjoint groups of each class
    params = {**FAST, "group_sizes": [4], "refine_steps": 40, "iterations": 10}
    output = build_attack("co_membership", params)(context(images, memoriser, groups))
    joint = group_auc(is_member.astype(int), groups[4], output.info["group_scores"]["4"])
    assert joint >= 0.9, joint


def test_the_attack_gets_groups_only_and_refuses_to_run_without_them(generator, generated_and_far):
    attack = build_attack("co_membership", {**FAST, "group_sizes": [2]})
    with pytest.raises(MiaGenError, match="AttackContext.groups"):
        attack(context(generated_and_far, generator, None))
    with pytest.raises(MiaGenError, match="group_sizes=\\[2\\]"):
        attack(context(generated_and_far, generator, draw_groups(IS_MEMBER, [1], 2, seed=0)))
    # the context holds queries and groups, no labels; a group's score depends on its records only, not on
    # its row or on which groups share its refinement batch
    groups = draw_groups(IS_MEMBER, [2], 2, seed=0)
    first = attack(context(generated_and_far, generator, groups)).info["group_scores"]
    flipped = {2: groups[2][::-1].copy()}
    second = attack(context(generated_and_far, generator, flipped)).info["group_scores"]
    np.testing.assert_allclose(second["2"][::-1], first["2"], rtol=1e-5)


def test_groups_larger_than_the_split_are_refused():
    attack = build_attack("co_membership", {"group_sizes": [1, 32]})
    with pytest.raises(MiaGenError, match="group of n=32"):
        attack.check_split_sizes(64, 20)
