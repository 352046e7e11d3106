"""Groups of records for co-membership (Liu et al., ICDM'19): n records that are all members or all
non-members, drawn where labels are known and handed to an attack unlabelled.

A group is a row of positions into the queries. `draw_groups` needs the member mask, so only the
pipeline calls it; the attack sees the rows only; `group_labels` (in `evaluate`) labels them again.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from mia_gen.errors import MiaGenError


def draw_groups(is_member: np.ndarray, sizes: Iterable[int], n_groups: int, seed: int,
                eligible: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
    """Per size n, up to `n_groups` disjoint groups of n members and up to `n_groups` disjoint groups of n
    non-members, rows shuffled together so that a row's position says nothing of its label.

    Within one size no record is in two groups: the groups are consecutive runs of one seeded permutation of
    the pool, so a class with P records gives min(`n_groups`, P // n) groups. Reusing records across groups
    (as independent draws would: 200 groups of 16 from 64 members use each member 50 times) makes the groups
    dependent, and an interval on the group AUC that treats them as independent would be far too narrow.
    Different sizes draw independently.

    Args:
        is_member (`np.ndarray` of shape `(Q,)`, bool): the queries' membership.
        sizes: the group sizes n (positive integers).
        n_groups: at most this many groups per class and size.
        seed: the draw is a function of (seed, n) only.
        eligible (`np.ndarray` of query positions, optional): draw only from these (e.g. to leave out
            a labelled calibration subset); all queries when None.

    Returns:
        `{n: np.ndarray of shape (G_members + G_non_members, n)}` of query positions (int64).
    """
    is_member = np.asarray(is_member, dtype=bool)
    positions = np.arange(len(is_member)) if eligible is None else np.sort(np.asarray(eligible, dtype=np.int64))
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise MiaGenError(f"n_groups must be a positive integer, got {n_groups!r}.")
    groups = {}
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise MiaGenError(f"group sizes must be positive integers, got {n!r}.")
        rng = np.random.default_rng([int(seed), int(n)])
        rows = []
        for label in (True, False):
            pool = positions[is_member[positions] == label]
            if n > len(pool):
                raise MiaGenError(
                    f"groups of {n} need at least {n} {'members' if label else 'non-members'} but {len(pool)} "
                    "can be drawn; use smaller group sizes or a larger split."
                )
            count = min(int(n_groups), len(pool) // int(n))
            rows.append(rng.permutation(pool)[: count * int(n)].reshape(count, int(n)))
        stacked = np.concatenate(rows)
        groups[int(n)] = stacked[rng.permutation(len(stacked))].astype(np.int64)
    return groups


def group_labels(groups: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 for a group of members, 0 for a group of non-members, `(G,)`; `groups` `(G, n)` positions into
    `labels` `(Q,)`. A mixed group is refused (co-membership asks "are all n members?" of pure groups)."""
    groups = np.asarray(groups, dtype=np.int64)
    member = np.asarray(labels)[groups].astype(int)
    if (member.min(axis=1) != member.max(axis=1)).any():
        raise MiaGenError("a co-membership group mixes members and non-members; groups must come from "
                          "`mia_gen.groups.draw_groups` over the same queries.")
    return member[:, 0]


def per_record_average(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The baseline group score: the mean of the group's per-record scores, `(G,)` from `scores` `(Q,)`
    and `groups` `(G, n)`."""
    return np.asarray(scores, dtype=np.float64)[np.asarray(groups, dtype=np.int64)].mean(axis=1)
