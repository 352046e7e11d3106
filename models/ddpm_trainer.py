"""Train a DDPM (`mia_gen.models.ddpm`) on the members, with EMA and atomic, resumable checkpoints.

Checkpoint layout in `out_dir` — a diffusers `DDPMPipeline` directory plus trainer state:

- `model_index.json`, `unet/` (raw weights), `unet_ema/` (EMA weights: the ones attacks use),
  `scheduler/` (all through `save_pretrained`, safetensors + JSON);
- `trainer_state.{pt,json}` and the atomic, resumable checkpointing of `mia_gen.models.training_loop`;
- `samples/step_XXXXXX.png`: DDIM grids (EMA weights) of a fixed set of 16 initial noises.

All randomness (batch order, timesteps and noise, dropout) comes from generators seeded by
`training.seed` and checkpointed, so a resumed run gives the same weights as an uninterrupted one
on CPU. Dropout draws from torch's global RNG, forked for the duration of training so the caller's
RNG state is left alone.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torchvision.utils import save_image

from mia_gen.device import resolve_device
from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.hashing import config_hash
from mia_gen.models.checkpoint import atomic_replace, retrain_hint
from mia_gen.models.ddpm import build_scheduler, build_unet, diffusion_loss
from mia_gen.models.defense import Defense
from mia_gen.models.denoiser import PIPELINE_INDEX, UNET_WEIGHTS, Denoiser
from mia_gen.models.diffusion_sampling import DiffusionSampler
from mia_gen.models.gan_trainer import training_config_with_keys, validate_members
from mia_gen.models.training_loop import MemberBatches, Plan, TrainingSteps, check_stop_after, run_training

TRAINING_KEYS = (
    "steps", "batch_size", "optimizer", "lr", "adam_betas", "weight_decay", "warmup_steps", "grad_clip",
    "ema_decay", "hflip", "checkpoint_every", "sample_every", "sample_steps", "seed",
)
# Keys that may change between a run and its resumption without changing the weights.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "sample_every", "sample_steps")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
GRID_SIZE = 16


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_training_config(training_cfg: Any) -> dict:
    """Check `model.training` and return it as a plain dict with typed values."""
    cfg = training_config_with_keys(training_cfg, TRAINING_KEYS, "configs/model/ddpm.yaml")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise MiaGenError(f"model.training.optimizer={cfg['optimizer']!r} is unknown; use one of {sorted(OPTIMIZERS)}.")
    for key, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("checkpoint_every", 0),
                         ("sample_every", 0), ("sample_steps", 1)):
        if not _is_int(cfg[key]) or cfg[key] < minimum:
            raise MiaGenError(f"model.training.{key} must be an integer >= {minimum}, got {cfg[key]!r}.")
    betas = cfg["adam_betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        raise MiaGenError(f"model.training.adam_betas must be a list of two numbers in [0, 1), got {betas!r}.")
    cfg["adam_betas"] = [float(b) for b in betas]
    if not _is_number(cfg["lr"]) or cfg["lr"] <= 0:
        raise MiaGenError(f"model.training.lr must be a positive number, got {cfg['lr']!r}.")
    if not _is_number(cfg["weight_decay"]) or cfg["weight_decay"] < 0:
        raise MiaGenError(f"model.training.weight_decay must be a number >= 0, got {cfg['weight_decay']!r}.")
    if cfg["grad_clip"] is not None and (not _is_number(cfg["grad_clip"]) or cfg["grad_clip"] <= 0):
        raise MiaGenError(f"model.training.grad_clip must be a positive max-norm or null (off), got {cfg['grad_clip']!r}.")
    if cfg["ema_decay"] is not None and (not _is_number(cfg["ema_decay"]) or not 0 < cfg["ema_decay"] < 1):
        raise MiaGenError(f"model.training.ema_decay must lie in (0, 1) (e.g. 0.999) or be null (no EMA), "
                          f"got {cfg['ema_decay']!r}.")
    if not isinstance(cfg["hflip"], bool):
        raise MiaGenError(f"model.training.hflip must be true or false (random horizontal flips), got {cfg['hflip']!r}.")
    if not _is_int(cfg["seed"]):
        raise MiaGenError(f"model.training.seed must be an integer, got {cfg['seed']!r} (it follows the top-level seed).")
    for key in ("lr", "weight_decay"):
        cfg[key] = float(cfg[key])
    return cfg


def _seeds(seed: int) -> tuple[int, int, int, int, int]:
    """Independent seeds for the initial weights, batch order, timesteps + noise, dropout and the grid noises."""
    return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(5))


def _training_hash(model: dict, cfg: dict) -> str:
    return config_hash({
        "unet": model["unet"], "betas": model.get("betas"), "prediction_type": model.get("prediction_type"),
        "training": {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS},
    })


def learning_rate(step: int, cfg: dict) -> float:
    """Linear warm-up from lr/warmup_steps at step 1 to lr at `warmup_steps`, then constant (Ho et al., 2020)."""
    if cfg["warmup_steps"] == 0:
        return cfg["lr"]
    return cfg["lr"] * min(1.0, step / cfg["warmup_steps"])


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter; buffers are copied."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def _load_unet_weights(out_dir: Path, folder: str, unet: torch.nn.Module) -> None:
    path = out_dir / folder / UNET_WEIGHTS
    try:
        unet.load_state_dict(load_file(str(path), device="cpu"))
    except (FileNotFoundError, SafetensorError, RuntimeError) as err:
        raise CorruptStoreError(
            f"{path} could not be loaded ({str(err).splitlines()[0]}); the checkpoint is damaged. {retrain_hint(out_dir)}"
        ) from err


def _save_grid(unet, scheduler, noise: torch.Tensor, steps: int, path: Path) -> None:
    sampler = DiffusionSampler(Denoiser.from_unet(unet, scheduler), "ddim", steps=steps)
    images = sampler(noise).cpu() * 0.5 + 0.5  # Denoiser put unet in eval(): the caller restores train()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: save_image(images, str(tmp), nrow=4, format="png"))


class DDPMSteps(TrainingSteps):
    """A DDPM for `mia_gen.models.training_loop.run_training`: one denoising-loss step, then the EMA update."""

    desc = "train ddpm"
    # trainer_state.json as this trainer has always written it
    summary_keys = ("steps", "training_hash", "step", "complete")

    def __init__(self, unet, scheduler, members: torch.Tensor, cfg: dict, defense: Defense, device: torch.device,
                 grid_seed: int, noise_seed: int) -> None:
        self.unet, self.scheduler, self.members, self.cfg = unet, scheduler, members, cfg
        self.defense, self.device, self.noise_seed = defense, device, noise_seed
        self.ema = copy.deepcopy(unet) if cfg["ema_decay"] is not None else None
        self.unets = {"unet": unet, **({"unet_ema": self.ema} if self.ema is not None else {})}
        self.grid_seed, self.loss = grid_seed, None

    def load_weights(self, out_dir: Path) -> None:
        for folder, module in self.unets.items():
            _load_unet_weights(out_dir, folder, module)

    def start(self) -> None:
        cfg, unet = self.cfg, self.unet
        self.grid_noise = torch.randn(GRID_SIZE, unet.config.in_channels * unet.config.sample_size ** 2,
                                      generator=torch.Generator().manual_seed(self.grid_seed))
        for module in self.unets.values():
            module.to(self.device)
        self.optimizer = self.defense.optimizer(unet.parameters(), lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                                                base=OPTIMIZERS[cfg["optimizer"]], weight_decay=cfg["weight_decay"])
        if self.defense.name == "dp_sgd":
            from mia_gen.models.privacy import PrivateTraining

            self.private = PrivateTraining(unet, self.optimizer, self.defense, self.members.shape[0],
                                           cfg["batch_size"], cfg["steps"], self.noise_seed + 1, "UNet")
        unet.train()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def step(self, step: int, batches: MemberBatches, rng: torch.Generator) -> dict[str, torch.Tensor | None]:
        cfg, unet, scheduler, private, device = self.cfg, self.unet, self.scheduler, self.private, self.device
        if private is None:
            x0 = self.members[batches.next_indices()]
        else:  # Poisson sampling, as the accountant assumes
            x0 = self.members[private.poisson_indices(self.members.shape[0], rng)]
        if cfg["hflip"]:  # the CIFAR-10 protocol of DDPM / SecMI / PIA
            flip = torch.rand(x0.shape[0], generator=rng) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        x0 = self.defense.augment(x0, rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=rng)
        noise = torch.randn(x0.shape, generator=rng)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        if private is None:
            loss = diffusion_loss(unet, scheduler, x0.to(device), t.to(device), noise.to(device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["grad_clip"])
            self.optimizer.step()
            self.loss = loss
        elif len(x0):  # per-sample clipping to max_grad_norm replaces grad_clip (an empty draw: no step)
            loss = diffusion_loss(private.module, scheduler, x0.to(device), t.to(device), noise.to(device),
                                  per_sample_sum=True)
            private.optimizer.zero_grad(set_to_none=True)
            private.backward(loss)
            private.optimizer.step()
            self.loss = loss.detach() / len(x0)
        if self.ema is not None:
            ema_update(self.ema, unet, cfg["ema_decay"])
        return {"loss": self.loss}  # the last step's loss after an empty draw

    def sample_grid(self, path: Path) -> None:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            _save_grid(self.ema if self.ema is not None else self.unet, self.scheduler, self.grid_noise,
                       self.cfg["sample_steps"], path)
        self.unet.train()

    def write_weights(self, folder: Path) -> None:
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", type(self.scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]}
        for name, unet in self.unets.items():
            unet.save_pretrained(folder / name, safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / PIPELINE_INDEX).write_text(json.dumps(index, indent=2))

    def result(self) -> Denoiser:
        return Denoiser.from_unet((self.ema if self.ema is not None else self.unet).to(self.device),
                                  self.scheduler).eval()


def train_ddpm(
    model_cfg: Any,
    members: torch.Tensor,
    out_dir: str | os.PathLike,
    device: str | torch.device,
    progress: bool = True,
    stop_after: int | None = None,
    defense: Defense | None = None,
) -> Denoiser:
    """Train the DDPM of `model_cfg` on `members` into `out_dir`; returns its Denoiser (EMA weights if any).

    members: `(N, C, H, W)` in [-1, 1], C and H = W as `model.unet.in_channels` / `sample_size`.
    model_cfg: `unet`, `betas`, `prediction_type`, `training` (keys of `TRAINING_KEYS`), see
        configs/model/ddpm.yaml.
    out_dir: checkpoint directory; a checkpoint with step < steps is resumed, a finished one is
        loaded without training (extending `training.steps` continues it).
    stop_after: stop (as if interrupted) once this many steps are done, leaving an incomplete checkpoint.
    defense: a `mia_gen.models.defense.Defense` (weight decay on the UNet; augmentation of each member batch).
    """
    model = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    cfg = validate_training_config(model.get("training") or {})
    defense = defense or Defense()
    if defense.name != "none":  # part of the checkpoint's identity: resuming under another defense fails
        cfg["defense"] = defense.to_dict()
    check_stop_after(stop_after)
    scheduler = build_scheduler(model)
    init_seed, batch_seed, noise_seed, dropout_seed, grid_seed = _seeds(cfg["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(init_seed)  # the initial weights (built on CPU) follow training.seed
        unet = build_unet(model.get("unet") or {})
    shape = SimpleNamespace(channels=unet.config.in_channels, resolution=unet.config.sample_size)
    members = validate_members(members, shape, shape)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    plan = Plan(steps=cfg["steps"], checkpoint_every=cfg["checkpoint_every"], sample_every=cfg["sample_every"],
                training_hash=_training_hash(model, cfg), resumable_keys=RESUMABLE_KEYS, n_members=members.shape[0],
                batch_size=cfg["batch_size"], batch_seed=batch_seed, noise_seed=noise_seed, stop_after=stop_after,
                dropout_seed=dropout_seed, what_differs="another model or other training settings")
    steps = DDPMSteps(unet, scheduler, members, cfg, defense, device, grid_seed, noise_seed)
    return run_training(steps, plan, out_dir, device, progress)
