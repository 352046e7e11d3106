"""Train a latent text-to-image model: a base pretrained on public records, then a fine-tune on the members.

The third trainer on `mia_gen.models.training_loop` (after the GAN and DDPM trainers), in three stages:

1. `train_ldm_base` stage 1, the VAE (`AutoencoderKL`, `mia_gen.models.ldm.build_vae`) on the public
   images: reconstruction MSE of a posterior sample + `kl_weight` x KL. Its `scaling_factor` is then set
   to 1 / std of the public records' posterior means (as Stable Diffusion's 0.18215 was chosen), so the
   latents the UNet sees have unit scale. Checkpoint: `<base>/vae_training/`.
2. `train_ldm_base` stage 2, the UNet (`UNet2DConditionModel`) on the public records' latents (a posterior
   sample times scaling_factor, as diffusers' train_text_to_image.py) under their captions' embeddings,
   each caption dropped to "" with probability `caption_dropout` so that "" is the unconditional branch.
   The text encoder (`CLIPTextModel`) is never trained: a random, seeded, frozen encoder stands in for
   CLIP, whose weights cannot be downloaded here; it maps each caption to a fixed embedding, which is
   the role it has in Stable Diffusion fine-tuning. `<base>` is a `StableDiffusionPipeline` directory.
3. `train_ldm_finetune`: the base's UNet fine-tuned on the members (`training.method`): `lora` adds a peft
   LoRA adapter (rank `rank`, alpha `alpha`, Gaussian init of A and zero B, on `target_modules`, as
   diffusers' train_text_to_image_lora.py) and trains only it, saved as `pytorch_lora_weights.safetensors`
   (`StableDiffusionPipeline.save_lora_weights`, alpha in its metadata); `full` trains every UNet weight and
   saves a whole pipeline. Defenses: DP-SGD (Opacus) on the trained parameters (the adapter's under
   `lora`), augmentation of the member images before encoding, weight decay; early stopping is fewer steps
   (`mia_gen.models.defense.effective_training`). `finetune.json` names the base.

Each stage resumes bit-identically on CPU and writes sample grids (`samples/step_XXXXXX.png`: fixed noises
under captions of the stage's own records; the VAE stage: originals above their reconstructions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torchvision.utils import save_image

from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.extras import require
from mia_gen.models.denoiser import _plain
from mia_gen.hashing import config_hash
from mia_gen.models.checkpoint import atomic_replace, retrain_hint
from mia_gen.models.ddpm import build_scheduler, diffusion_loss
from mia_gen.models.ddpm_trainer import OPTIMIZERS, learning_rate
from mia_gen.models.defense import Defense
from mia_gen.models.gan_trainer import training_config_with_keys
from mia_gen.models.ldm import (T2I_FEATURE, build_text_encoder, build_tokenizer, build_unet, build_vae,
                                caption_words, save_pipeline, set_seed_for)
from mia_gen.models.training_loop import MemberBatches, Plan, TrainingSteps, check_stop_after, run_training

VAE_KEYS = ("steps", "batch_size", "lr", "kl_weight", "checkpoint_every", "sample_every", "seed")
PRETRAIN_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "grad_clip", "caption_dropout", "checkpoint_every",
                 "sample_every", "sample_steps", "seed", "vae")
FINETUNE_KEYS = ("method", "rank", "alpha", "target_modules", "steps", "batch_size", "optimizer", "lr",
                 "adam_betas", "weight_decay", "warmup_steps", "grad_clip", "checkpoint_every", "sample_every",
                 "sample_steps", "seed")
RESUMABLE_KEYS = ("steps", "checkpoint_every", "sample_every", "sample_steps")
METHODS = ("lora", "full", "none")
FINETUNE_JSON = "finetune.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
VAE_DIR = "vae_training"
VOCABULARY_DIR = "vocabulary"  # the tokenizer's vocab.json + merges.txt, built from the public captions
GRID_SIZE = 16


def _seeds(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(n))


def _positive(cfg: dict, where: str, *keys: str, integer: bool = False) -> None:
    for key in keys:
        value = cfg[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or value <= 0:
            raise MiaGenError(f"{where}.{key} must be a positive {'integer' if integer else 'number'}, got {value!r}.")


def validate_finetune_config(training_cfg: Any) -> dict:
    """`model.training` of configs/model/ldm.yaml (the fine-tune on the members), checked, as a plain dict."""
    cfg = training_config_with_keys(training_cfg, FINETUNE_KEYS, "configs/model/ldm.yaml")
    if cfg["method"] not in METHODS:
        raise MiaGenError(f"model.training.method={cfg['method']!r} is unknown; use lora (an adapter on the base), "
                          "full (every UNet weight) or none (attack the pretrained base itself).")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise MiaGenError(f"model.training.optimizer={cfg['optimizer']!r} is unknown; use one of {sorted(OPTIMIZERS)}.")
    _positive(cfg, "model.training", "steps", "batch_size", "sample_steps", integer=True)
    _positive(cfg, "model.training", "lr")
    if cfg["method"] == "lora":
        _positive(cfg, "model.training", "rank", integer=True)
        _positive(cfg, "model.training", "alpha")
        if not cfg["target_modules"] or not all(isinstance(m, str) for m in cfg["target_modules"]):
            raise MiaGenError("model.training.target_modules must list the UNet layers the LoRA adapts, e.g. "
                              "[to_q, to_k, to_v, to_out.0] (the attention projections, as diffusers' LoRA script).")
    cfg["lr"], cfg["weight_decay"] = float(cfg["lr"]), float(cfg["weight_decay"])
    return cfg


def validate_pretrain_config(pretrain_cfg: Any) -> dict:
    """`model.pretrain` (the base on public records, with its `vae` stage), checked, as a plain dict."""
    cfg = training_config_with_keys(pretrain_cfg, PRETRAIN_KEYS, "configs/model/ldm.yaml (pretrain)")
    cfg["vae"] = training_config_with_keys(cfg["vae"], VAE_KEYS, "configs/model/ldm.yaml (pretrain.vae)")
    _positive(cfg, "model.pretrain", "steps", "batch_size", "sample_steps", integer=True)
    _positive(cfg, "model.pretrain", "lr")
    _positive(cfg["vae"], "model.pretrain.vae", "steps", "batch_size", integer=True)
    _positive(cfg["vae"], "model.pretrain.vae", "lr", "kl_weight")
    if not 0 <= cfg["caption_dropout"] < 1:
        raise MiaGenError(f"model.pretrain.caption_dropout must lie in [0, 1), got {cfg['caption_dropout']!r}.")
    return cfg


def _load_weights(module: torch.nn.Module, path: Path, out_dir: Path, strict: bool = True) -> None:
    try:
        module.load_state_dict(load_file(str(path), device="cpu"), strict=strict)
    except (FileNotFoundError, SafetensorError, RuntimeError) as err:
        raise CorruptStoreError(f"{path} could not be loaded ({str(err).splitlines()[0]}); the checkpoint is "
                                f"damaged. {retrain_hint(out_dir)}") from err


def _save_png(images: torch.Tensor, path: Path, nrow: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: save_image(images.clamp(-1, 1) * 0.5 + 0.5, str(tmp), nrow=nrow, format="png"))


def posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's posterior mean and std of `images` `(N, C, H, W)` in [-1, 1] (unscaled latent units)."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


# ---- stage 1: the VAE ------------------------------------------------------------------------------
class VAESteps(TrainingSteps):
    desc = "train ldm vae"

    def __init__(self, vae, images: torch.Tensor, cfg: dict, device: torch.device) -> None:
        self.vae, self.images, self.cfg, self.device, self.loss = vae, images, cfg, device, None
        self.grid_rows = images[torch.linspace(0, len(images) - 1, GRID_SIZE // 2).long()]

    def load_weights(self, out_dir: Path) -> None:
        _load_weights(self.vae, out_dir / "vae" / "diffusion_pytorch_model.safetensors", out_dir)

    def start(self) -> None:
        self.vae.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg["lr"], weight_decay=0.0)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def step(self, step: int, batches: MemberBatches, rng: torch.Generator) -> dict[str, torch.Tensor | None]:
        x = self.images[batches.next_indices()].to(self.device)
        mean, std = posterior(self.vae, x)
        z = mean + std * torch.randn(mean.shape, generator=rng).to(self.device)
        reconstruction = self.vae.decode(z).sample
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).flatten(1).sum(1).mean()
        loss = F.mse_loss(reconstruction, x) + self.cfg["kl_weight"] * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss = loss.detach()
        return {"loss": self.loss}

    def sample_grid(self, path: Path) -> None:
        self.vae.eval()
        with torch.no_grad():
            rows = self.grid_rows.to(self.device)
            reconstruction = self.vae.decode(posterior(self.vae, rows)[0]).sample
        _save_png(torch.cat([rows, reconstruction]).cpu(), path, nrow=len(rows))
        self.vae.train()

    def write_weights(self, folder: Path) -> None:
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)

    def result(self):
        return self.vae.to(self.device).eval()


# ---- stages 2 and 3: the UNet ----------------------------------------------------------------------
class CaptionEmbeddings:
    """Each distinct caption's embedding, computed once by the frozen text encoder; "" included."""

    def __init__(self, text_encoder, tokenizer, captions: list[str], device: torch.device) -> None:
        from mia_gen.models.latent import TextEncoder

        self.distinct = sorted(set(captions) | {""})
        position = {caption: i for i, caption in enumerate(self.distinct)}
        self.index = torch.tensor([position[c] for c in captions])
        self.table = TextEncoder(tokenizer, text_encoder.to(device)).encode(self.distinct)
        self.empty = position[""]

    def of(self, rows: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings `(n, L, D)` of records `rows`; where `drop` is True, the "" caption's."""
        index = self.index[rows]
        if drop is not None:
            index = torch.where(drop, torch.full_like(index, self.empty), index)
        return self.table[index.to(self.table.device)]


class LatentSteps(TrainingSteps):
    """One denoising step of a text-conditioned UNet on VAE latents (pretraining and fine-tuning alike)."""

    def __init__(self, unet, scheduler, vae, text_encoder, tokenizer, images: torch.Tensor, captions: list[str],
                 cfg: dict, defense: Defense, device: torch.device, grid_seed: int, noise_seed: int,
                 caption_dropout: float = 0.0) -> None:
        self.unet, self.scheduler, self.vae, self.cfg = unet, scheduler, vae.eval(), cfg
        self.text_encoder, self.tokenizer = text_encoder.eval(), tokenizer
        self.images, self.captions, self.defense, self.device = images, captions, defense, device
        self.grid_seed, self.noise_seed, self.caption_dropout, self.loss = grid_seed, noise_seed, caption_dropout, None
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def start(self) -> None:
        cfg = self.cfg
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        self.embeddings = CaptionEmbeddings(self.text_encoder, self.tokenizer, self.captions, self.device)
        rows = torch.linspace(0, len(self.captions) - 1, GRID_SIZE).long()
        self.grid_conditions = self.embeddings.of(rows)
        latent = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.grid_noise = torch.randn(GRID_SIZE, int(np.prod(latent)), generator=torch.Generator().manual_seed(self.grid_seed))
        base = OPTIMIZERS[cfg.get("optimizer", "adamw")]
        betas = tuple(cfg.get("adam_betas", (0.9, 0.999)))
        self.optimizer = self.defense.optimizer(self.trainable(), lr=cfg["lr"], betas=betas, base=base,
                                                weight_decay=cfg.get("weight_decay", 0.0))
        self.unet.train()
        if self.defense.name == "dp_sgd":
            from mia_gen.models.privacy import PrivateTraining

            self.private = PrivateTraining(self.unet, self.optimizer, self.defense, len(self.images),
                                           cfg["batch_size"], cfg["steps"], self.noise_seed + 1, self.what)

    what = "UNet"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def step(self, step: int, batches: MemberBatches, rng: torch.Generator) -> dict[str, torch.Tensor | None]:
        cfg, private, device = self.cfg, self.private, self.device
        if private is None:
            rows = batches.next_indices()
        else:  # Poisson sampling, as the accountant assumes
            rows = private.poisson_indices(len(self.images), rng)
        images = self.defense.augment(self.images[rows], rng).to(device)
        drop = torch.rand(len(rows), generator=rng) < self.caption_dropout if self.caption_dropout else None
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(rows),), generator=rng)
        with torch.no_grad():
            mean, std = posterior(self.vae, images) if len(rows) else (images, images)
        latents = (mean + std * torch.randn(mean.shape, generator=rng).to(device)) * self.scale
        noise = torch.randn(latents.shape, generator=rng).to(device)
        conditions = self.embeddings.of(rows, drop)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        if private is None:
            loss = diffusion_loss(self.unet, self.scheduler, latents, t.to(device), noise,
                                  encoder_hidden_states=conditions)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable(), cfg["grad_clip"])
            self.optimizer.step()
            self.loss = loss.detach()
        elif len(rows):  # per-sample clipping to max_grad_norm replaces grad_clip (an empty draw: no step)
            loss = diffusion_loss(private.module, self.scheduler, latents, t.to(device), noise,
                                  per_sample_sum=True, encoder_hidden_states=conditions)
            private.optimizer.zero_grad(set_to_none=True)
            private.backward(loss)
            private.optimizer.step()
            self.loss = loss.detach() / len(rows)
        return {"loss": self.loss}

    def denoiser(self):
        from mia_gen.models.denoiser import Denoiser
        from mia_gen.models.latent import LatentEncoder, TextEncoder

        return Denoiser.from_unet(self.unet, self.scheduler, latent=LatentEncoder(self.vae),
                                  text=TextEncoder(self.tokenizer, self.text_encoder))

    def sample_grid(self, path: Path) -> None:
        from mia_gen.models.diffusion_sampling import DiffusionSampler

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            sampler = DiffusionSampler(self.denoiser(), "ddim", steps=self.cfg["sample_steps"])
            with torch.no_grad():
                images = sampler(self.grid_noise.to(self.device), condition=self.grid_conditions)
        _save_png(images.cpu(), path, nrow=4)
        self.unet.train()


class BaseSteps(LatentSteps):
    desc = "train ldm base"

    def load_weights(self, out_dir: Path) -> None:
        _load_weights(self.unet, out_dir / "unet" / "diffusion_pytorch_model.safetensors", out_dir)

    def write_weights(self, folder: Path) -> None:
        save_pipeline(folder, self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler, self.vocabulary)

    def result(self):
        return self.denoiser().eval()


class FinetuneSteps(LatentSteps):
    desc = "train ldm fine-tune"

    def __init__(self, *args, base_dir: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_dir, self.method = base_dir, self.cfg["method"]
        self.what = "UNet's LoRA adapter" if self.method == "lora" else "UNet"

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors in diffusers' layout (`...lora.down.weight`, `...lora.up.weight`)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def load_weights(self, out_dir: Path) -> None:
        if self.method == "full":
            _load_weights(self.unet, out_dir / "unet" / "diffusion_pytorch_model.safetensors", out_dir)
            return
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        path = out_dir / LORA_WEIGHTS
        try:
            state = load_file(str(path), device="cpu")
        except (FileNotFoundError, SafetensorError) as err:
            raise CorruptStoreError(f"{path} could not be loaded ({err}); the checkpoint is damaged. "
                                    f"{retrain_hint(out_dir)}") from err
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
        result = set_peft_model_state_dict(self.unet, state)
        if getattr(result, "unexpected_keys", None):
            raise CorruptStoreError(f"{path} holds tensors the adapter does not have ({result.unexpected_keys[:2]}). "
                                    f"{retrain_hint(out_dir)}")

    def write_weights(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline

        if self.method == "full":
            save_pipeline(folder, self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler,
                          self.base_dir / "tokenizer")
        else:
            metadata = {"r": self.cfg["rank"], "lora_alpha": self.cfg["alpha"],
                        "target_modules": list(self.cfg["target_modules"])}
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=self.lora_state(),
                                                      unet_lora_adapter_metadata=metadata)
        (folder / FINETUNE_JSON).write_text(json.dumps({"method": self.method, "base": str(self.base_dir)}, indent=2))

    def result(self) -> Path:
        return self.base_dir


# ---- entry points ----------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, captions: list[str], vae_cfg: dict, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise MiaGenError(f"{what}: expected images (N, C, H, W) in [-1, 1], got {type(images).__name__}.")
    channels, size = int(vae_cfg.get("in_channels", 3)), int(vae_cfg.get("sample_size", images.shape[-1]))
    if images.shape[1] != channels or images.shape[-1] != size or images.shape[-2] != size:
        raise MiaGenError(f"{what}: the records are {tuple(images.shape[1:])} but the VAE takes "
                          f"({channels}, {size}, {size}); set data.channels={channels} data.resolution={size}, or "
                          "change model.vae.")
    if len(captions) != len(images):
        raise MiaGenError(f"{what}: {len(images)} images but {len(captions)} captions; every record needs one.")
    return images.float()


def _training_hash(model: dict, stage: str, cfg: dict, extra: Any = None) -> str:
    return config_hash({"stage": stage, "model": {k: model.get(k) for k in ("vae", "text_encoder", "unet", "betas",
                                                                           "prediction_type", "tokenizer")},
                        "training": {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}, "extra": extra})


def _device(device) -> torch.device:
    from mia_gen.device import resolve_device

    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def sd_scheduler(model: dict):
    """The DDPMScheduler of `model.betas` with Stable Diffusion's sampling settings (steps_offset 1, no clipping),
    which `StableDiffusionPipeline` would otherwise rewrite with a warning."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(build_scheduler(model).config), steps_offset=1, clip_sample=False)


def train_ldm_base(model_cfg: Any, images: torch.Tensor, captions: list[str], out_dir: str | os.PathLike,
                   device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Pretrain the base of `model_cfg` (VAE, then UNet) on public `images` `(N, C, H, W)` in [-1, 1] with one
    caption each; `out_dir` becomes a `StableDiffusionPipeline` directory (returned)."""
    require("transformers", T2I_FEATURE)
    model = _plain(model_cfg)
    cfg = validate_pretrain_config(model.get("pretrain"))
    images = _check_images(images, captions, model["vae"], "model.pretrain")
    out_dir, device = Path(out_dir), _device(device)
    vae_seed, vae_batches, vae_noise, unet_seed, batch_seed, noise_seed, grid_seed, text_seed = _seeds(cfg["seed"], 8)

    vae_cfg = cfg["vae"]
    vae = set_seed_for(build_vae, vae_seed, model["vae"])
    vae_plan = Plan(steps=vae_cfg["steps"], checkpoint_every=vae_cfg["checkpoint_every"],
                    sample_every=vae_cfg["sample_every"], training_hash=_training_hash(model, "vae", vae_cfg),
                    resumable_keys=RESUMABLE_KEYS, n_members=len(images), batch_size=vae_cfg["batch_size"],
                    batch_seed=vae_batches, noise_seed=vae_noise, dropout_seed=vae_seed,
                    what_differs="another VAE or other VAE training settings")
    vae = run_training(VAESteps(vae, images, vae_cfg, device), vae_plan, out_dir / VAE_DIR, device, progress)
    with torch.no_grad():
        means = torch.cat([posterior(vae, images[i : i + 256].to(device))[0].cpu() for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))

    tokenizer_cfg = model.get("tokenizer") or {}
    tokenizer = build_tokenizer(out_dir / VOCABULARY_DIR, caption_words(captions), tokenizer_cfg.get("max_length", 16))
    text_encoder = set_seed_for(build_text_encoder, text_seed, model["text_encoder"], tokenizer).eval()
    unet = set_seed_for(build_unet, unet_seed, model["unet"])
    scheduler = sd_scheduler(model)
    plan = Plan(steps=cfg["steps"], checkpoint_every=cfg["checkpoint_every"], sample_every=cfg["sample_every"],
                training_hash=_training_hash(model, "base", {k: v for k, v in cfg.items() if k != "vae"},
                                             {"scaling_factor": vae.config.scaling_factor, "vae": vae_cfg}),
                resumable_keys=RESUMABLE_KEYS, n_members=len(images), batch_size=cfg["batch_size"],
                batch_seed=batch_seed, noise_seed=noise_seed, dropout_seed=unet_seed,
                what_differs="another model or other pretraining settings")
    steps = BaseSteps(unet, scheduler, vae, text_encoder, tokenizer, images, captions, cfg, Defense(), device,
                      grid_seed, noise_seed, caption_dropout=float(cfg["caption_dropout"]))
    steps.vocabulary = out_dir / VOCABULARY_DIR
    run_training(steps, plan, out_dir, device, progress)
    return out_dir


def load_base(base_dir: str | Path, device: torch.device):
    """The base pipeline's (vae, text_encoder, tokenizer, unet, scheduler), float32, to fine-tune."""
    from mia_gen.models.denoiser import _load_scheduler, _load_unet
    from mia_gen.models.latent import load_text_encoder, load_vae

    base_dir = Path(base_dir)
    text = load_text_encoder(base_dir, True)
    return (load_vae(base_dir, True).to(device), text.text_encoder.to(device), text.tokenizer,
            _load_unet(base_dir, "unet", True, "UNet2DConditionModel").float(), _load_scheduler(base_dir, True))


def train_ldm_finetune(model_cfg: Any, base_dir: str | os.PathLike, members: torch.Tensor, captions: list[str],
                       out_dir: str | os.PathLike, device: str | torch.device = "cpu", progress: bool = True,
                       stop_after: int | None = None, defense: Defense | None = None) -> Path:
    """Fine-tune the base at `base_dir` on `members` `(N, C, H, W)` in [-1, 1] and their captions into `out_dir`
    (`model.training`: LoRA adapter or full UNet); returns `base_dir`. `out_dir/finetune.json` names the base."""
    require("transformers", T2I_FEATURE)
    model = _plain(model_cfg)
    cfg = validate_finetune_config(model.get("training"))
    if cfg["method"] == "none":
        raise MiaGenError("model.training.method=none attacks the pretrained base: there is no fine-tune to train.")
    if cfg["method"] == "lora":
        require("peft", "model.training.method=lora (LoRA fine-tuning)")
    defense = defense or Defense()
    if defense.name not in ("none", "dp_sgd", "augmentation", "weight_decay"):
        raise MiaGenError(f"defense={defense.name} does not apply to a text-to-image fine-tune: use none, dp_sgd, "
                          "augmentation, weight_decay or early_stopping (fewer fine-tuning steps).")
    if defense.name != "none":
        cfg["defense"] = defense.to_dict()
    check_stop_after(stop_after)
    device, out_dir, base_dir = _device(device), Path(out_dir), Path(base_dir)
    vae, text_encoder, tokenizer, unet, scheduler = load_base(base_dir, device)
    members = _check_images(members, captions, {"in_channels": vae.config.in_channels,
                                                "sample_size": vae.config.sample_size}, "model.training")
    init_seed, batch_seed, noise_seed, dropout_seed, grid_seed = _seeds(cfg["seed"], 5)
    if cfg["method"] == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        config = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], init_lora_weights="gaussian",
                            target_modules=list(cfg["target_modules"]))
        try:
            set_seed_for(unet.add_adapter, init_seed, config)
        except ValueError as err:
            raise MiaGenError(f"model.training.target_modules={cfg['target_modules']} do not name layers of the base "
                              f"UNet at {base_dir}: {str(err).splitlines()[0][:200]}") from err
    plan = Plan(steps=cfg["steps"], checkpoint_every=cfg["checkpoint_every"], sample_every=cfg["sample_every"],
                training_hash=_training_hash(model, "finetune", cfg, {"base": str(base_dir)}),
                resumable_keys=RESUMABLE_KEYS, n_members=len(members), batch_size=cfg["batch_size"],
                batch_seed=batch_seed, noise_seed=noise_seed, stop_after=stop_after, dropout_seed=dropout_seed,
                what_differs="another base, method or other fine-tuning settings")
    steps = FinetuneSteps(unet, scheduler, vae, text_encoder, tokenizer, members, captions, cfg, defense, device,
                          grid_seed, noise_seed, base_dir=base_dir)
    return run_training(steps, plan, out_dir, device, progress)
