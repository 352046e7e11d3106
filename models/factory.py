"""Train and load generators by model family, so the pipeline does not know their trainers.

Families: `gan` (DCGAN, WGAN-GP: `mia_gen.models.gan_trainer`), `memorizer` (noisy copies of the
training records; the leakage upper bound used in tests and sanity checks), `diffusion` (DDPM:
`mia_gen.models.ddpm_trainer`; pretrained diffusers pipelines; served to white-box attacks as a
`mia_gen.models.denoiser.Denoiser` and to the sample store as a `mia_gen.models.diffusion_sampling.DiffusionSampler`),
`tabular` (CTGAN, TVAE through the ctgan library: `mia_gen.models.tabular`; trained on a table's rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from mia_gen.errors import MiaGenError, MissingAssetError

FAMILIES = ("gan", "memorizer", "diffusion", "tabular")


def _family(model_cfg: DictConfig) -> str:
    family = model_cfg.get("family")
    if family not in FAMILIES:
        raise MiaGenError(
            f"model family '{family}' is not supported; model configs must set `family` to one of "
            f"{FAMILIES} (see configs/model/)."
        )
    return family


def is_latent_text(model_cfg: DictConfig) -> bool:
    """Whether `model_cfg` is a text-to-image model trained here (base + fine-tune: configs/model/ldm.yaml)."""
    return _family(model_cfg) == "diffusion" and bool(model_cfg.get("pretrain") is not None or model_cfg.get("base"))


def finetune_method(model_cfg: DictConfig) -> str:
    """`model.training.method` of a text-to-image model: lora | full | none (the base is the model)."""
    return str((model_cfg.get("training") or {}).get("method", "lora"))


def train_base_model(model_cfg: DictConfig, images: torch.Tensor, captions: list[str], out_dir: Path,
                     device: torch.device, progress: bool = True) -> None:
    """Pretrain (or resume, or find finished) a text-to-image model's base on public `images` + `captions`."""
    from mia_gen.models.ldm_trainer import train_ldm_base

    out_dir.mkdir(parents=True, exist_ok=True)
    train_ldm_base(model_cfg, images, captions, out_dir, device, progress=progress)


def train_model(model_cfg: DictConfig, members: torch.Tensor, out_dir: Path, device: torch.device,
                progress: bool = True, defense_cfg: DictConfig | None = None, captions: list[str] | None = None,
                base_dir: Path | None = None, table=None, schema=None) -> None:
    """Train (or resume, or find finished) the model of `model_cfg` on `members` into `out_dir`.

    members (`torch.Tensor` of shape `(N, C, H, W)`, in [-1, 1]). defense_cfg: `cfg.defense`
    (`mia_gen.models.defense`), applied by the trainer. A text-to-image model (`is_latent_text`) is
    fine-tuned from the base at `base_dir` on the members and their `captions`. A tabular model trains on the
    members' rows `table` (a `DataFrame` conformed to `schema`, `mia_gen.tables`).
    """
    from mia_gen.models.defense import Defense, effective_training

    model_cfg, defense_cfg = effective_training(model_cfg, defense_cfg)
    defense = Defense.from_config(defense_cfg)
    family = _family(model_cfg)
    if is_latent_text(model_cfg):
        if defense.name == "federated":
            raise MiaGenError("defense=federated does not apply to model=ldm: a fine-tune of one base on one "
                              "party's records is what it attacks; use dp_sgd, augmentation, weight_decay or "
                              "early_stopping.")
        from mia_gen.models.ldm_trainer import train_ldm_finetune

        out_dir.mkdir(parents=True, exist_ok=True)
        train_ldm_finetune(model_cfg, base_dir, members, captions, out_dir, device, progress=progress, defense=defense)
        return
    if family == "tabular":
        if defense.name != "none":
            raise MiaGenError(f"defense={defense.name} is not available for model={model_cfg.get('name')}: the ctgan "
                              "library trains in its own loop, without DP-SGD or the other defenses; use defense=none.")
        if table is None:
            raise MiaGenError(f"model={model_cfg.get('name')} trains on a table: use data=table.")
        from mia_gen.models.tabular import train_tabular

        train_tabular(model_cfg, table, schema, out_dir, device)
        return
    if family == "memorizer" and defense.name != "none":
        raise MiaGenError(
            f"defense={defense.name} does not apply to the memorizer (it copies its members by construction); "
            "use model=dcgan, wgan_gp or ddpm to measure a defense."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if defense.name == "federated" and family != "memorizer":
        _train_federated(model_cfg, members, out_dir, device, defense)
        return
    if family == "memorizer":
        if not (out_dir / "generator.json").is_file():  # written last: its presence means complete
            _save_memorizer(model_cfg, members, out_dir)
        return
    if family == "diffusion":
        if not model_cfg.get("unet"):
            raise MiaGenError(
                f"model={model_cfg.get('name')} attacks a pretrained diffusion model and cannot be trained; set "
                "model.checkpoint=<pipeline directory> (or a hub id with model.allow_download=true), or use "
                "model=ddpm to train one."
            )
        from mia_gen.models.ddpm_trainer import train_ddpm

        train_ddpm(model_cfg, members, out_dir, device, progress=progress, defense=defense)
        return
    from mia_gen.models.gan_trainer import train_gan

    generator, discriminator = _initial_gan(model_cfg)
    with torch.random.fork_rng(devices=[]):  # a resumed run restores its saved RNG state inside the fork only
        train_gan(generator, discriminator, members, model_cfg.training, out_dir, device, progress=progress,
                  defense=defense)


def _initial_gan(model_cfg: DictConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The untrained generator and discriminator, their weights drawn from `model.training.seed` (the
    caller's global RNG is neither read nor advanced), so the trained weights follow the training config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.training.seed))
        return instantiate(model_cfg.generator), instantiate(model_cfg.discriminator)


def _train_federated(model_cfg: DictConfig, members: torch.Tensor, out_dir: Path, device: torch.device,
                     defense) -> None:
    """FedAvg over `defense.clients` clients, each training with the model's own trainer (`mia_gen.models.federated`)."""
    from mia_gen.models.defense import Defense
    from mia_gen.models.federated import train_federated

    steps, rounds = int(model_cfg.training.steps), int(defense.rounds)
    if steps % rounds:
        raise MiaGenError(
            f"federated: training.steps={steps} is not a multiple of rounds={rounds}; each round trains "
            "steps / rounds local steps. Change one of them."
        )

    def train(client_members: torch.Tensor, directory: Path, stop_after: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if _family(model_cfg) == "diffusion":
            from mia_gen.models.ddpm_trainer import train_ddpm

            train_ddpm(model_cfg, client_members, directory, device, progress=False, stop_after=stop_after,
                       defense=Defense())
            return
        from mia_gen.models.gan_trainer import train_gan

        generator, discriminator = _initial_gan(model_cfg)  # the weights pooled training would start from
        with torch.random.fork_rng(devices=[]):
            train_gan(generator, discriminator, client_members, model_cfg.training, directory, device,
                      progress=False, stop_after=stop_after, defense=Defense())

    train_federated(members, out_dir, train, int(defense.clients), rounds, steps // rounds,
                    int(model_cfg.training.seed))


def load_generator(model_cfg: DictConfig, model_dir: Path, device: torch.device, table=None, encoding=None):
    """The trained generator in eval mode on `device` (a diffusion model: its `DiffusionSampler`; a tabular
    model: its `mia_gen.models.tabular.TabularSampler`, rebuilt from the members' rows `table` and drawing
    rows in the real table's `encoding`)."""
    family = _family(model_cfg)
    if family == "tabular":
        if table is None or encoding is None:
            raise MiaGenError(f"model={model_cfg.get('name')} samples a table: use data=table.")
        from mia_gen.models.tabular import load_tabular

        return load_tabular(model_dir, table, encoding, device)
    if family == "diffusion":
        from mia_gen.models.diffusion_sampling import DiffusionSampler

        sampler = model_cfg.get("sampler") or {}
        return DiffusionSampler(load_diffusion_denoiser(model_cfg, model_dir, device), sampler.get("name", "ddim"),
                                sampler.get("steps", 50), sampler.get("eta")).eval()
    if not model_dir.is_dir():
        raise MissingAssetError(
            f"no trained model at {model_dir}; train one first (`mia-gen-train` with the same "
            "overrides) or point `model.checkpoint=<dir>` at a directory holding a trained model."
        )
    if family == "memorizer":
        generator = _load_memorizer(model_dir)
    else:
        from mia_gen.models.checkpoint import load_module

        generator = load_module(model_dir, "generator")
    return generator.to(device).eval()


def load_diffusion_denoiser(model_cfg: DictConfig, model_dir: Path | str, device: torch.device) -> torch.nn.Module:
    """The `mia_gen.models.denoiser.Denoiser` (EMA weights when present and `model.use_ema`) white-box attacks use."""
    if _family(model_cfg) != "diffusion":
        raise MiaGenError(
            f"model family '{model_cfg.family}' has no denoiser; white-box diffusion attacks need a diffusion "
            "model (model=ddpm, model=diffusers)."
        )
    from mia_gen.models.denoiser import load_denoiser

    if is_latent_text(model_cfg) and not model_cfg.get("checkpoint"):
        return load_denoiser(*_finetuned(model_cfg, Path(model_dir)), device)
    return load_denoiser(model_cfg, model_dir, device)


def _finetuned(model_cfg: DictConfig, model_dir: Path) -> tuple[dict, Path]:
    """(loading config, pipeline directory) of a text-to-image model trained here: its base with the LoRA adapter
    in `model_dir` merged, a whole fine-tuned pipeline, or the base itself (`training.method=none`)."""
    from mia_gen.models.ldm_trainer import FINETUNE_JSON

    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    cfg["lora"] = None
    marker = model_dir / FINETUNE_JSON
    if not marker.is_file():  # the base itself
        return cfg, model_dir
    finetune = json.loads(marker.read_text())
    if finetune.get("method") == "lora":
        cfg["lora"] = str(model_dir)
        return cfg, Path(finetune["base"])
    return cfg, model_dir


def load_discriminator(model_cfg: DictConfig, model_dir: Path, device: torch.device) -> torch.nn.Module:
    if _family(model_cfg) != "gan":
        raise MiaGenError(f"model family '{model_cfg.family}' has no discriminator to load.")
    from mia_gen.models.checkpoint import load_module

    return load_module(model_dir, "discriminator").to(device).eval()


def _save_memorizer(model_cfg: DictConfig, members: torch.Tensor, out_dir: Path) -> None:
    from mia_gen.models.checkpoint import atomic_replace
    from mia_gen.models.memorizer import NoisyCopyGenerator

    generator = NoisyCopyGenerator(members, **OmegaConf.to_container(model_cfg.generator, resolve=True))
    weights = {"records": generator.records.contiguous()}
    atomic_replace(out_dir / "generator.safetensors", lambda tmp: save_file(weights, str(tmp)))
    atomic_replace(out_dir / "generator.json", lambda tmp: tmp.write_text(json.dumps(generator.config)))


def _load_memorizer(model_dir: Path) -> torch.nn.Module:
    from mia_gen.models.memorizer import NoisyCopyGenerator

    weights, config = model_dir / "generator.safetensors", model_dir / "generator.json"
    for path in (weights, config):
        if not path.is_file():
            raise MissingAssetError(f"{path} is missing; retrain with `mia-gen-train`.")
    settings = json.loads(config.read_text())
    return NoisyCopyGenerator(load_file(str(weights))["records"], noise_std=settings["noise_std"],
                              clip=settings["clip"])
