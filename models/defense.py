"""Training-time defenses against membership inference, applied alike by the GAN and DDPM trainers.

A defense is read from `configs/defense/<name>.yaml` (`Defense.from_config`, strict keys):

- `none`: train as is;
- `weight_decay`: decoupled weight decay (AdamW, Loshchilov & Hutter, ICLR'19) on every trained
  network (GAN: generator and discriminator; DDPM: the UNet);
- `dp_sgd`: DP-SGD with Opacus (`models/privacy.py`) on the network that sees the members (GAN:
  the discriminator, the generator learning only through it; DDPM: the UNet), for a target
  epsilon (with delta) or a given noise multiplier; the epsilon spent is written beside the model;
- `federated`: FedAvg on Flower over `clients` disjoint shares of the members for `rounds` rounds
  of `training.steps / rounds` local steps each (`models/federated.py`);
- `augmentation`: every member batch is transformed on the fly before the model sees it: random
  horizontal flips, random crops after reflect-padding, and RandAugment-style ops (Cubuk et al.,
  2020: `randaugment_ops` ops per image drawn from brightness, contrast, translation, at
  `randaugment_magnitude` in [0, 1]). For GANs the discriminator's real batch is augmented (the
  generator learns from the discriminator only). Images stay in [-1, 1].

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

NAMES = ("none", "weight_decay", "augmentation", "dp_sgd", "federated")
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
    target_epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    clients: int = 1
    rounds: int = 1

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
                   "augmentation": {"hflip", "crop_padding", "randaugment_ops", "randaugment_magnitude"},
                   "dp_sgd": {"target_epsilon", "delta", "noise_multiplier", "max_grad_norm", "accountant"},
                   "federated": {"clients", "rounds"}}[name]
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise MiaGenError(f"defense={name} has no setting(s) {unknown}; it takes {sorted(allowed) or 'none'}.")
        defense = cls(name=name, **raw)
        defense.validate()
        return defense

    def validate(self) -> None:
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise MiaGenError(f"defense.weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if not isinstance(self.hflip, bool):
            raise MiaGenError(f"defense.hflip must be true or false, got {self.hflip!r}.")
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

    def to_dict(self) -> dict:
        return asdict(self)

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
