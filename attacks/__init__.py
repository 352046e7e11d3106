"""Membership inference attacks, one per module, registered by name in `attacks.base.ATTACKS`."""

from attacks import domias, monte_carlo, sample_distance  # noqa: F401  (registration)
from attacks.base import ATTACKS, Access, Attack, AttackContext, AttackOutput, build_attack

__all__ = ["ATTACKS", "Access", "Attack", "AttackContext", "AttackOutput", "build_attack"]
