"""Membership inference attacks, one per module, registered by name in `mia_gen.attacks.base.ATTACKS`."""

from mia_gen.attacks import (  # noqa: F401  (registration)
    calibration, co_membership, diffusion_loss, domias, latent_inversion, latent_inversion_pbb, logan, monte_carlo,
    pia, sample_distance, secmi, gsa, lira, rmia, clid,
)
from mia_gen.attacks.base import ATTACKS, Access, Attack, AttackContext, AttackOutput, build_attack

__all__ = ["ATTACKS", "Access", "Attack", "AttackContext", "AttackOutput", "build_attack"]
