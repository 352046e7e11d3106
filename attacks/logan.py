"""LOGAN (Hayes et al., "LOGAN: Membership Inference Attacks Against Generative Models", PoPETs'19).

- `mode=white_box`: the target GAN's discriminator scores each query; a discriminator that has
  overfit its training set rates members as "more real" (score = its raw output, higher = member).
- `mode=black_box`: the attacker sees only generated samples. It trains a shadow GAN (a DCGAN)
  on those samples; the shadow discriminator learns the generator's distribution, which is
  concentrated near the members, and its output on a query is the score. The shadow GAN is seeded
  from the run's seed and sees no query, so a query's score does not depend on the others.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen.errors import MiaGenError

MODES = ("white_box", "black_box")


@register_attack
class LOGAN(Attack):
    name = "logan"
    defaults = {
        "mode": "white_box",  # white_box: the target's discriminator | black_box: a shadow GAN's
        "shadow_samples": 20000,  # generated samples the shadow GAN trains on (black_box)
        "shadow_steps": 1500,  # shadow GAN training steps (black_box)
        "shadow_batch_size": 64,
        "shadow_latent_dim": 32,
        "shadow_base_channels": 64,
        "shadow_lr": 2.0e-4,
        "batch_size": 1024,  # queries per discriminator call
    }

    def __init__(self, **params):
        super().__init__(**params)
        if self.mode not in MODES:
            raise MiaGenError(f"logan: unknown mode '{self.mode}'; use one of {MODES}.")

    @property
    def access(self) -> Access:
        return Access.WHITE_BOX if self.mode == "white_box" else Access.SAMPLES

    def score(self, context: AttackContext) -> AttackOutput:
        batch_size = check_positive_int(self.batch_size, "batch_size", self.name)
        info = {"mode": self.mode}
        if self.mode == "white_box":
            discriminator = context.discriminator
            if discriminator is None:
                raise MiaGenError(
                    "logan (white_box) needs the target GAN's discriminator; this model has none (only GANs "
                    "trained here or given with discriminator weights do). Use logan.mode=black_box."
                )
        else:
            discriminator, info["shadow_discriminator_loss"] = self.train_shadow(context)
        discriminator.eval()
        with torch.no_grad():
            queries = context.queries.float()
            scores = torch.cat([discriminator(queries[s : s + batch_size].to(context.device)).flatten().cpu()
                                for s in range(0, len(queries), batch_size)])
        return AttackOutput(scores=scores.double().numpy().astype(np.float64), info=info)

    def train_shadow(self, context: AttackContext) -> tuple[torch.nn.Module, float]:
        """A DCGAN trained on the first `shadow_samples` generated samples; returns its discriminator."""
        from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator, discriminator_loss
        from mia_gen.models.gan_trainer import train_gan

        store = context.samples
        n = min(check_positive_int(self.shadow_samples, "shadow_samples", self.name), len(store))
        samples = store.get(np.arange(n))
        if samples.dim() != 4:
            raise MiaGenError("logan (black_box) trains a shadow DCGAN and needs image samples; the store holds "
                              f"records of shape {tuple(samples.shape[1:])}.")
        channels, resolution = samples.shape[1], samples.shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(context.seed))
            generator = DCGANGenerator(int(self.shadow_latent_dim), resolution, channels, int(self.shadow_base_channels))
            discriminator = DCGANDiscriminator(resolution, channels, int(self.shadow_base_channels))
        training = {
            "loss": "dcgan", "steps": int(self.shadow_steps), "batch_size": int(self.shadow_batch_size),
            "lr_g": float(self.shadow_lr), "lr_d": float(self.shadow_lr), "betas": [0.5, 0.999], "n_critic": 1,
            "gp_weight": 0.0, "checkpoint_every": 0, "sample_every": 0, "seed": int(context.seed),
        }
        with tempfile.TemporaryDirectory(prefix="logan-shadow-") as scratch:
            train_gan(generator, discriminator, samples.clamp(-1, 1), training, scratch, context.device, progress=False)
        discriminator = discriminator.to(context.device).eval()
        with torch.no_grad():
            real = discriminator(samples[:1024].to(context.device))
            z = generator.sample_latent(1024, torch.Generator().manual_seed(int(context.seed)))
            fake = discriminator(generator(z.to(context.device)))
            loss = float(discriminator_loss(real, fake))
        return discriminator, loss
