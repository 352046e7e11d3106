"""Training-time defenses against membership inference, applied alike by the GAN and DDPM trainers.

A defense is read from `configs/defense/<name>.yaml` (`Defense.from_config`, strict keys):

- `none`: train as is;
- `weight_decay`: decoupled weight decay (AdamW, Loshchilov & Hutter, ICLR'19) on every trained
  network (GAN: generator and discriminator; DDPM: the UNet);
- `dp_sgd`: DP-SGD with Opacus (the `[dp]` extra; `models/privacy.py`) on the network that sees
  the members (GAN: the discriminator, the generator learning only through it; DDPM: the UNet), for
  a target epsilon (with delta) or a given noise multiplier; the epsilon spent is written beside the model;
- `federated`: FedAvg on Flower (the `[fl]` extra) over `clients` disjoint shares of the members for
  `rounds` rounds of `training.steps / rounds` local steps each (`models/federated.py`);
- `early_stopping`: release the model as it was after `steps` training steps (or `fraction` of
  `model.training.steps`) instead of at the end. `effective_training` maps it onto the undefended
  model trained for that many steps, so it shares that model's cache and a sweep of stopping points
  (`defense.fraction=0.125,0.25,0.5`) reads AUC against training steps off one training lineage
  (the pipeline resumes a longer run from a shorter one; `experiments/pipeline.py`);
- `augmentation`: every member batch is transformed on the fly before the model sees it: random
  horizontal flips, random crops after reflect-padding, and RandAugment-style ops (Cubuk et al.,
  2020: `randaugment_ops` ops per image drawn from brightness, contrast, translation, at
  `randaugment_magnitude` in [0, 1]). For GANs the discriminator's real batch is augmented and, with
  `augment_fakes` (the default in configs/defense/augmentation.yaml), so is every generated batch the
  discriminator judges, in its own step and in the generator's (DiffAugment, Zhao et al., NeurIPS'20:
  every transform here is differentiable). Without it the generator learns to produce augmented
  images ("leaking" augmentations, Karras et al., NeurIPS'20). Images stay in [-1, 1].

All randomness comes from the trainer's seeded, checkpointed generator, so a resumed run is still
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mia_gen.errors import MiaGenError

NAMES = ("none", "weight_decay", "augmentation", "dp_sgd", "federated", "early_stopping")
ACCOUNTANTS = ("rdp", "prv", "gdp")
RANDAUGMENT_OPS = ("brightness", "contrast", "translate")


@dataclass(frozen=True)
class Defense:
    name: str = "none"
    weight_decay: float = 0.0
    hflip: bool = False
    crop_padding: int = 0
    randaugment_ops: int = 0
    randaugment_magnitude: float = 0.0
    augment_fakes: bool = False
    target_epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    clients: int = 1
    rounds: int = 1
    steps: int | None = None
    fraction: float | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Defense":
        """`cfg.defense` (None means `none`); unknown names or keys raise with the fix."""
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        name = raw.pop("name", None)
        if name not in NAMES:
            raise MiaGenError(f"defense.name={name!r} is not one this trainer applies; use one of {NAMES} "
                              "(configs/defense/).")
        allowed = {"none": set(), "weight_decay": {"weight_decay"},
                   "augmentation": {"hflip", "crop_padding", "randaugment_ops", "randaugment_magnitude",
                                    "augment_fakes"},
                   "dp_sgd": {"target_epsilon", "delta", "noise_multiplier", "max_grad_norm", "accountant"},
                   "federated": {"clients", "rounds"}, "early_stopping": {"steps", "fraction"}}[name]
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise MiaGenError(f"defense={name} has no setting(s) {unknown}; it takes {sorted(allowed) or 'none'}.")
        defense = cls(name=name, **raw)
        defense.validate()
        return defense

    def validate(self) -> None:
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise MiaGenError(f"defense.weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        for key in ("hflip", "augment_fakes"):
            if not isinstance(getattr(self, key), bool):
                raise MiaGenError(f"defense.{key} must be true or false, got {getattr(self, key)!r}.")
        for key in ("crop_padding", "randaugment_ops"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MiaGenError(f"defense.{key} must be an integer >= 0, got {value!r}.")
        if self.randaugment_ops > len(RANDAUGMENT_OPS):
            raise MiaGenError(f"defense.randaugment_ops must be at most {len(RANDAUGMENT_OPS)} ({RANDAUGMENT_OPS}).")
        magnitude = self.randaugment_magnitude
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= 1:
            raise MiaGenError(f"defense.randaugment_magnitude must lie in [0, 1], got {magnitude!r}.")
        for key in ("clients", "rounds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MiaGenError(f"defense.{key} must be a positive integer, got {value!r}.")
        if self.name == "dp_sgd":
            if (self.target_epsilon is None) == (self.noise_multiplier is None):
                raise MiaGenError("defense=dp_sgd needs exactly one of target_epsilon (solve for the noise) and "
                                  "noise_multiplier (report the epsilon it gives); set the other to null.")
            for key in ("target_epsilon", "noise_multiplier", "max_grad_norm"):
                value = getattr(self, key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                    raise MiaGenError(f"defense.{key} must be a positive number, got {value!r}.")
            if self.delta is not None and (isinstance(self.delta, bool) or not isinstance(self.delta, float)
                                           or not 0 < self.delta < 1):
                raise MiaGenError(f"defense.delta must lie in (0, 1) (or null: 1/(10 N)), got {self.delta!r}.")
            if self.accountant not in ACCOUNTANTS:
                raise MiaGenError(f"defense.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.name == "early_stopping":
            if self.steps is None and self.fraction is None:
                raise MiaGenError("defense=early_stopping needs steps (stop after that many training steps) or "
                                  "fraction (of model.training.steps).")
            if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                           or self.steps < 1):
                raise MiaGenError(f"defense.steps must be a positive integer, got {self.steps!r}.")
            if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                              or not 0 < self.fraction <= 1):
                raise MiaGenError(f"defense.fraction must lie in (0, 1], got {self.fraction!r}.")
        # the optional dependency (setup.cfg extra) is checked with the settings, so that a missing one stops
        # the run before any training, with the `pip install "mia-gen[...]"` line (MissingExtraError)
        if self.name == "dp_sgd":
            from mia_gen.models.privacy import opacus

            opacus("accountants")
        elif self.name == "federated":
            import mia_gen.models.federated  # noqa: F401  (Flower)

    def stop_step(self, planned_steps: int) -> int:
        """The training step an early-stopped model is released at, for a run planned for `planned_steps`
        (`steps` when set, else `fraction` of the planned steps)."""
        stop = self.steps if self.steps is not None else max(1, round(self.fraction * planned_steps))
        if stop > planned_steps:
            raise MiaGenError(f"defense.steps={stop} is beyond model.training.steps={planned_steps}: early stopping "
                              "can only release an earlier checkpoint; lower defense.steps or use defense.fraction.")
        return stop

    @property
    def strength(self) -> str:
        """The defense's strength as one short label for tables ("" when it has none)."""
        if self.name == "weight_decay":
            return f"λ={self.weight_decay:g}"
        if self.name == "augmentation":
            parts = (["flip"] if self.hflip else []) + ([f"crop{self.crop_padding}"] if self.crop_padding else [])
            if self.randaugment_ops:
                parts.append(f"RA{self.randaugment_ops}x{self.randaugment_magnitude:g}")
            return "+".join(parts) + (" (real and fake)" if self.augment_fakes else "")
        if self.name == "dp_sgd":
            return (f"target ε={self.target_epsilon:g}" if self.target_epsilon is not None
                    else f"σ={self.noise_multiplier:g}") + f", C={self.max_grad_norm:g}"
        if self.name == "federated":
            return f"K={self.clients}, {self.rounds} rounds"
        if self.name == "early_stopping":
            return f"{self.steps} steps" if self.steps is not None else f"{self.fraction:g} of training"
        return ""

    def to_dict(self) -> dict:
        """The defense's identity in a checkpoint (a run never resumes under another defense).
        `augment_fakes` enters it only for augmentation, so that older checkpoints keep theirs."""
        identity = asdict(self)
        if self.name != "augmentation":
            identity.pop("augment_fakes")
        return identity

    @property
    def augments(self) -> bool:
        return self.hflip or self.crop_padding > 0 or self.randaugment_ops > 0

    def optimizer(self, parameters, lr: float, betas: tuple[float, float], base: type = torch.optim.Adam,
                  weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """The trainer's optimiser, AdamW with this defense's decay when it decays weights."""
        if self.weight_decay > 0:
            if weight_decay:
                raise MiaGenError("both model.training.weight_decay and defense=weight_decay are set; keep one "
                                  "(the defense, to compare it against the undefended model).")
            return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=float(self.weight_decay))
        return base(parameters, lr=lr, betas=betas, weight_decay=weight_decay)

    def augment(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A transformed copy of the batch `x` (`(N, C, H, W)`, in [-1, 1]); `x` itself when nothing applies."""
        if not self.augments:
            return x
        n = x.shape[0]
        if self.hflip:
            flip = torch.rand(n, generator=rng) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, rng)
        if self.randaugment_ops > 0:
            x = randaugment(x, self.randaugment_ops, float(self.randaugment_magnitude), rng)
        return x.clamp(-1, 1)


def effective_training(model_cfg: Any, defense_cfg: Any) -> tuple[Any, Any]:
    """The (model, defense) configs a trainer actually runs: early stopping at step S is the undefended
    model trained for S steps (constant learning rate after warm-up, so S steps of a longer run and a run
    of S steps are the same model). Every other defense is returned as is."""
    defense = Defense.from_config(defense_cfg)
    if defense.name != "early_stopping":
        return model_cfg, defense_cfg
    training = model_cfg.get("training") if model_cfg is not None else None
    if not training or "steps" not in training:
        raise MiaGenError("defense=early_stopping needs a model trained here (model.training.steps); a given "
                          "checkpoint (model.checkpoint) cannot be stopped earlier.")
    model = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    model.training.steps = defense.stop_step(int(training.steps))
    return model, OmegaConf.create({"name": "none"})


def random_crop(x: torch.Tensor, padding: int, rng: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `padding` and crop back to the original size at a random offset per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def randaugment(x: torch.Tensor, n_ops: int, magnitude: float, rng: torch.Generator) -> torch.Tensor:
    """RandAugment-style: per image, `n_ops` distinct ops from `RANDAUGMENT_OPS` at `magnitude` in [0, 1]."""
    n = x.shape[0]
    chosen = torch.rand(n, len(RANDAUGMENT_OPS), generator=rng).argsort(dim=1)[:, :n_ops]
    signs = torch.where(torch.rand(n, len(RANDAUGMENT_OPS), generator=rng) < 0.5, -1.0, 1.0)
    uses = torch.zeros(n, len(RANDAUGMENT_OPS), dtype=torch.bool).scatter_(1, chosen, True)
    amount = (magnitude * signs * uses).to(x.dtype)
    # brightness: shift by up to 0.5 (a quarter of the [-1, 1] range); contrast: scale around the mean by 1 +- 0.5
    x = x + 0.5 * amount[:, 0].view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + 0.5 * amount[:, 1]).view(-1, 1, 1, 1)
    # translate: shift by up to a quarter of the width, filling with the border value
    shift = torch.round(amount[:, 2] * x.shape[-1] / 4).long()
    out = torch.empty_like(x)
    for i in range(n):
        s = int(shift[i])
        out[i] = x[i] if s == 0 else torch.roll(x[i], s, dims=-1)
        if s > 0:
            out[i, ..., :s] = x[i, ..., :1]
        elif s < 0:
            out[i, ..., s:] = x[i, ..., -1:]
    return out
