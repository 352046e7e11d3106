"""Train a GAN (DCGAN or WGAN-GP objective) on the members, with atomic, resumable checkpoints.

A *step* is one generator update preceded by `n_critic` discriminator / critic updates, each on
a fresh batch of members (Gulrajani et al., 2017, Algorithm 1).

Checkpoint layout in `out_dir`:

- `generator.{safetensors,json}`, `discriminator.{safetensors,json}` (`mia_gen.models.checkpoint.save_module`);
- `trainer_state.{pt,json}` and the atomic, resumable checkpointing of `mia_gen.models.training_loop`;
- `samples/step_XXXXXX.png`: grids of a fixed set of 64 latent codes.

All randomness of training (batch order, latent codes, penalty interpolation) comes from CPU
`torch.Generator`s seeded from `training.seed`, and their states are checkpointed, so a resumed run
gives bit-identical weights to an uninterrupted one on CPU.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.utils import save_image

from mia_gen.device import resolve_device
from mia_gen.errors import MiaGenError
from mia_gen.hashing import config_hash
from mia_gen.models import dcgan, wgan_gp
from mia_gen.models.checkpoint import atomic_replace, load_module, save_module
from mia_gen.models.defense import Defense
from mia_gen.models.training_loop import MemberBatches, Plan, TrainingSteps, check_stop_after, run_training

TRAINING_KEYS = (
    "loss", "steps", "batch_size", "lr_g", "lr_d", "betas", "n_critic",
    "gp_weight", "checkpoint_every", "sample_every", "seed",
)
# Keys that may change between a run and its resumption without changing the weights.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "sample_every")
GRID_SIZE = 64


@dataclass(frozen=True)
class Objective:
    """Loss pair of a GAN family; scores are the discriminator's `(N,)` outputs."""

    discriminator_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator_loss: Callable[[torch.Tensor], torch.Tensor]
    gradient_penalty: bool


OBJECTIVES = {
    "dcgan": Objective(dcgan.discriminator_loss, dcgan.generator_loss, gradient_penalty=False),
    "wgan_gp": Objective(wgan_gp.critic_loss, wgan_gp.generator_loss, gradient_penalty=True),
}


def training_config_with_keys(training_cfg: Any, keys: Sequence[str], example: str) -> dict:
    """`model.training` as a plain dict holding exactly `keys` (any trainer); `example` names a config file."""
    if isinstance(training_cfg, DictConfig):
        cfg = OmegaConf.to_container(training_cfg, resolve=True)
    else:
        cfg = dict(training_cfg)
    missing = [k for k in keys if k not in cfg]
    unknown = sorted(set(cfg) - set(keys))
    if missing or unknown:
        raise MiaGenError(
            f"model.training is missing {missing} / has unknown keys {unknown}; it takes exactly "
            f"{list(keys)} (see {example})."
        )
    return cfg


def validate_training_config(training_cfg: Any) -> dict:
    """Check the `model.training` block and return it as a plain dict with typed values."""
    cfg = training_config_with_keys(training_cfg, TRAINING_KEYS, "configs/model/dcgan.yaml")
    if cfg["loss"] not in OBJECTIVES:
        raise MiaGenError(f"model.training.loss={cfg['loss']!r} is unknown; use one of {sorted(OBJECTIVES)}.")
    for key, minimum in (("steps", 1), ("batch_size", 1), ("n_critic", 1), ("checkpoint_every", 0), ("sample_every", 0)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MiaGenError(f"model.training.{key} must be an integer >= {minimum}, got {value!r}.")
    betas = cfg["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        raise MiaGenError(f"model.training.betas must be a list of two numbers in [0, 1), got {betas!r}.")
    cfg["betas"] = [float(b) for b in betas]
    for key in ("lr_g", "lr_d", "gp_weight"):
        if not _is_number(cfg[key]) or cfg[key] < 0 or (key != "gp_weight" and cfg[key] == 0):
            raise MiaGenError(f"model.training.{key} must be a positive number, got {cfg[key]!r}.")
        cfg[key] = float(cfg[key])
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise MiaGenError(f"model.training.seed must be an integer, got {cfg['seed']!r} (it follows the top-level seed).")
    return cfg


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_members(members: Any, generator: nn.Module, discriminator: nn.Module) -> torch.Tensor:
    """Check that members `(N, C, H, W)` in [-1, 1] fit the generator and discriminator; return them as float32."""
    for attr in ("channels", "resolution"):
        if getattr(generator, attr) != getattr(discriminator, attr):
            raise MiaGenError(
                f"The generator has {attr}={getattr(generator, attr)} but the discriminator has "
                f"{getattr(discriminator, attr)}; build both from the same data.{attr}."
            )
    members = torch.as_tensor(members).float()
    c, r = generator.channels, generator.resolution
    if members.dim() != 4 or members.shape[0] == 0:
        raise MiaGenError(f"members must be a non-empty (N, C, H, W) image tensor, got shape {tuple(members.shape)}.")
    if members.shape[1] != c:
        raise MiaGenError(
            f"members have {members.shape[1]} channel(s) but the model was built for channels={c}; set "
            f"data.channels={c} (the data loader converts) or build the model with channels={members.shape[1]}."
        )
    if tuple(members.shape[2:]) != (r, r):
        raise MiaGenError(
            f"members are {members.shape[2]}x{members.shape[3]} px but the model was built for resolution={r}; "
            f"set data.resolution={r} or build the model with the members' resolution."
        )
    if not torch.isfinite(members).all() or members.min() < -1.0 - 1e-5 or members.max() > 1.0 + 1e-5:
        raise MiaGenError(
            f"members must be finite and scaled to [-1, 1], got range [{members.min():.3g}, {members.max():.3g}]; "
            "map uint8 images with x / 127.5 - 1."
        )
    return members


def _training_hash(cfg: dict) -> str:
    return config_hash({k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS})


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for batch order, training noise and the fixed sample-grid latents."""
    batch_seed, noise_seed, grid_seed = np.random.SeedSequence(seed).generate_state(3)
    return int(batch_seed), int(noise_seed), int(grid_seed)


def _load_weights(out_dir: Path, modules: dict) -> None:
    for name, module in modules.items():
        saved = load_module(out_dir, name)
        if saved.config != module.config:
            raise MiaGenError(
                f"{out_dir} holds a {name} built as {saved.config}, but this run builds {module.config}; "
                "use a fresh output directory (or delete this one) to train the new model."
            )
        module.load_state_dict(saved.state_dict())


def _save_grid(generator: nn.Module, z: torch.Tensor, path: Path) -> None:
    generator.eval()
    with torch.no_grad():
        images = generator(z).cpu() * 0.5 + 0.5
    generator.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: save_image(images, str(tmp), nrow=8, format="png"))


def private_discriminator_step(private, generator: nn.Module, members: torch.Tensor, defense: Defense,
                               rng: torch.Generator, batch_size: int, device: torch.device) -> torch.Tensor:
    """One DP-SGD discriminator step: a Poisson batch of members and `batch_size` fakes, per-sample
    BCE terms summed (Opacus clips each sample's gradient, then adds noise)."""
    real = defense.augment(members[private.poisson_indices(members.shape[0], rng)], rng).to(device)
    with torch.no_grad():
        fake = generator(generator.sample_latent(batch_size, rng).to(device))
    if defense.augment_fakes:
        fake = defense.augment(fake, rng)
    logits = private.module(torch.cat([real, fake]))
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(device)
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    private.optimizer.zero_grad(set_to_none=True)
    private.backward(loss)
    private.optimizer.step()
    return loss.detach() / len(logits)


class GANSteps(TrainingSteps):
    """A GAN for `mia_gen.models.training_loop.run_training`: `n_critic` discriminator steps, then one generator step."""

    loss_format = ".3f"
    # trainer_state.pt as this trainer has always written it
    state_keys = ("step", "torch_rng", "batches", "noise_rng", "private", "optimizers", "cuda_rng")

    def __init__(self, generator: nn.Module, discriminator: nn.Module, members: torch.Tensor, cfg: dict,
                 defense: Defense, device: torch.device, grid_seed: int, noise_seed: int) -> None:
        self.generator, self.discriminator, self.members = generator, discriminator, members
        self.cfg, self.defense, self.device, self.noise_seed = cfg, defense, device, noise_seed
        self.modules = {"generator": generator, "discriminator": discriminator}
        self.objective = OBJECTIVES[cfg["loss"]]
        self.desc, self.private_steps_per_step = f"train {cfg['loss']}", cfg["n_critic"]
        self.grid_z = generator.sample_latent(GRID_SIZE, torch.Generator().manual_seed(grid_seed)).to(device)

    def load_weights(self, out_dir: Path) -> None:
        _load_weights(out_dir, self.modules)

    def start(self) -> None:
        cfg = self.cfg
        self.generator.to(self.device).train()
        self.discriminator.to(self.device).train()
        self._optimizers = {
            name: self.defense.optimizer(module.parameters(), lr=cfg[lr], betas=tuple(cfg["betas"]))
            for name, module, lr in (("generator", self.generator, "lr_g"), ("discriminator", self.discriminator, "lr_d"))
        }
        if self.defense.name == "dp_sgd":
            if cfg["loss"] != "dcgan":
                raise MiaGenError(
                    "defense=dp_sgd trains the discriminator with per-sample gradients, which the WGAN-GP gradient "
                    "penalty (a gradient of a gradient) does not have in Opacus; use model.training.loss=dcgan."
                )
            from mia_gen.models.privacy import PrivateTraining

            self.private = PrivateTraining(self.discriminator, self._optimizers["discriminator"], self.defense,
                                           self.members.shape[0], cfg["batch_size"], cfg["steps"] * cfg["n_critic"],
                                           self.noise_seed + 1, "discriminator",
                                           expected_batch_size=2 * cfg["batch_size"])

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {f"optimizer_{name}": optimizer for name, optimizer in self._optimizers.items()}

    def step(self, step: int, batches: MemberBatches, rng: torch.Generator) -> dict[str, torch.Tensor]:
        generator, discriminator, defense, private = self.generator, self.discriminator, self.defense, self.private
        batch_size, device, objective = self.cfg["batch_size"], self.device, self.objective
        for _ in range(self.cfg["n_critic"]):
            if private is not None:
                d_loss = private_discriminator_step(private, generator, self.members, defense, rng, batch_size, device)
                continue
            real = defense.augment(self.members[batches.next_indices()], rng).to(device)
            with torch.no_grad():
                fake = generator(generator.sample_latent(batch_size, rng).to(device))
            if defense.augment_fakes:  # DiffAugment: D judges real and generated batches alike
                fake = defense.augment(fake, rng)
            d_loss = objective.discriminator_loss(discriminator(real), discriminator(fake))
            if objective.gradient_penalty:
                d_loss = d_loss + self.cfg["gp_weight"] * wgan_gp.gradient_penalty(discriminator, real, fake, rng)
            self._optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            self._optimizers["discriminator"].step()

        discriminator.requires_grad_(False)  # the generator step needs gradients w.r.t. G only
        if private is not None:
            private.module.disable_hooks()  # no per-sample gradients for D in G's step
        fake = generator(generator.sample_latent(batch_size, rng).to(device))
        if defense.augment_fakes:  # differentiable: G learns through the same transforms
            fake = defense.augment(fake, rng)
        g_loss = objective.generator_loss(discriminator(fake))
        self._optimizers["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        self._optimizers["generator"].step()
        discriminator.requires_grad_(True)
        if private is not None:
            private.module.enable_hooks()
        return {"d_loss": d_loss, "g_loss": g_loss}

    def sample_grid(self, path: Path) -> None:
        _save_grid(self.generator, self.grid_z, path)

    def write_weights(self, folder: Path) -> None:
        for name, module in self.modules.items():
            save_module(module, folder, name)

    def close(self) -> None:
        self.discriminator.eval()

    def result(self) -> nn.Module:
        return self.generator.to(self.device).eval()


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    members: torch.Tensor,
    training_cfg: Any,
    out_dir: str | os.PathLike,
    device: str | torch.device,
    progress: bool = True,
    stop_after: int | None = None,
    defense: Defense | None = None,
) -> nn.Module:
    """Train `generator` against `discriminator` on `members`; returns the generator in eval() mode on `device`.

    members: `(N, channels, resolution, resolution)` in [-1, 1].
    training_cfg: dict / DictConfig with the keys of `TRAINING_KEYS` (see configs/model/dcgan.yaml).
    out_dir: checkpoint directory. If it holds a checkpoint with step < steps, training continues from
        it; if it holds a finished run (step == steps), the saved generator is loaded and returned.
    stop_after: stop (as if interrupted) once this many steps are done, leaving an incomplete checkpoint.
    defense: a `mia_gen.models.defense.Defense` (weight decay on both networks; augmentation of the real batch
        and, with `augment_fakes`, of the generated ones).
    """
    cfg = validate_training_config(training_cfg)
    defense = defense or Defense()
    if defense.name != "none":  # part of the checkpoint's identity: resuming under another defense fails
        cfg["defense"] = defense.to_dict()
    check_stop_after(stop_after)
    members = validate_members(members, generator, discriminator)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    batch_seed, noise_seed, grid_seed = _seeds(cfg["seed"])
    plan = Plan(steps=cfg["steps"], checkpoint_every=cfg["checkpoint_every"], sample_every=cfg["sample_every"],
                training_hash=_training_hash(cfg), resumable_keys=RESUMABLE_KEYS, n_members=members.shape[0],
                batch_size=cfg["batch_size"], batch_seed=batch_seed, noise_seed=noise_seed, stop_after=stop_after)
    steps = GANSteps(generator, discriminator, members, cfg, defense, device, grid_seed, noise_seed)
    return run_training(steps, plan, out_dir, device, progress)
