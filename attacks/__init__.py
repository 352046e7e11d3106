"""Membership inference attacks, one per module, registered by name in `attacks.base.ATTACKS`."""

from attacks import (  # noqa: F401  (registration)
    calibration, co_membership, diffusion_loss, domias, latent_inversion, latent_inversion_pbb, logan, monte_carlo,
    pia, sample_distance, secmi,
)
from attacks.base import ATTACKS, Access, Attack, AttackContext, AttackOutput, build_attack

__all__ = ["ATTACKS", "Access", "Attack", "AttackContext", "AttackOutput", "build_attack"]
