"""GAN-Leaks calibrated attack (Chen et al., CCS'20, Sec. 5.4): subtract a reference model's view.

score(x) = s_target(x) - s_reference(x), where s is any attack's score (higher = member) on the
target model and on a reference model trained the same way on reference records (disjoint from the
members and the evaluated non-members). A record that is simply easy to reconstruct for any model
of this kind scores high on both and is discounted; what remains is what the target learnt from it.

The pipeline trains (and caches) the reference model like the target and hands the wrapped attack
the same queries against it (`AttackContext.reference_model`).
"""

from __future__ import annotations

from mia_gen.attacks.base import AttackContext, AttackOutput, WrapperAttack, register_attack
from mia_gen.errors import MiaGenError


@register_attack
class Calibration(WrapperAttack):
    name = "calibration"
    defaults = {
        "attack": "latent_inversion",  # the wrapped attack's registered name
        "params": None,  # its parameters (its own defaults where not given)
        "reference_size": "members",  # records the reference model trains on: members (as many as the
        #                               target's members) | all (every reference record) | an integer
        "reference_checkpoint": None,  # a trained reference model to use instead of training one
    }
    needs_reference_model = True

    def check_context(self, context: AttackContext) -> None:
        if context.reference_model is None:
            raise MiaGenError(
                "calibration needs a reference model (a model trained the same way on reference records); "
                "give split.n_reference > 0 so the pipeline trains one, or set "
                "attack.calibration.reference_checkpoint=<dir> when the target is a given checkpoint."
            )
        super().check_context(context)

    def score(self, context: AttackContext) -> AttackOutput:
        target = self.inner(context)
        reference = self.inner(context.reference_model)
        info = {"target_info": target.info, "reference_info": reference.info,
                "target_scores": target.scores.tolist(), "reference_scores": reference.scores.tolist()}
        if "trained_on" in target.info:
            info["trained_on"] = target.info["trained_on"]
        return AttackOutput(scores=target.scores - reference.scores, neighbour_indices=target.neighbour_indices,
                            info=info)
