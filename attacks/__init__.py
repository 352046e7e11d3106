"""Membership inference attacks, one per module, registered by name in `attacks.base.ATTACKS`."""

from attacks import diffusion_loss, domias, monte_carlo, pia, sample_distance, secmi  # noqa: F401  (registration)
from attacks.base import ATTACKS, Access, Attack, AttackContext, AttackOutput, build_attack

__all__ = ["ATTACKS", "Access", "Attack", "AttackContext", "AttackOutput", "build_attack"]
