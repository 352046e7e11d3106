"""The one interface white-box diffusion attacks use: epsilon(x_t, t, condition) plus the noise schedule.

Attacks (loss, SecMI, PIA, GSA, ...) see only a `Denoiser`; they never touch diffusers
internals, so any epsilon-, v- or x0-predicting network is attacked the same way:

- `alphas_cumprod`: `(T,)` float64 on CPU, the cumulative product of (1 - beta_t);
- `num_train_timesteps`: T; `sample_shape`: `(C, H, W)`;
- `condition_kind`: "none" (unconditional) or "class" (`num_classes` class labels; text embeddings
  come with latent models);
- `epsilon(x_t, t, condition)`: the predicted noise, whatever the network was trained to predict;
  `condition` is one per record (class ids `(N,)` int64), None for an unconditional model.

`load_denoiser` builds one from a diffusers pipeline directory (or hub id, if allowed), a bare
UNet directory plus `model.betas`, or the user's own network class + safetensors weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mia_gen.errors import CorruptStoreError, MiaGenError, MissingAssetError

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CONDITION_KINDS = ("none", "class")
PIPELINE_INDEX = "model_index.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What a network predicts, in the words of an error message.
_SPOKEN = {"epsilon": "an epsilon", "v_prediction": "a v-prediction", "sample": "a sample (x0)"}


class Denoiser(nn.Module):
    """A noise-prediction network `epsilon(x_t, t, condition)` with its noise schedule; always in eval() mode.

    Args:
        network: called as `network(x_t, t)` (unconditional) or `network(x_t, t, class_labels=y)`
            (class-conditional: diffusers' `UNet2DModel(num_class_embeds=...)`, `DiTTransformer2DModel`);
            returns a tensor `(N, C', H, W)` or an object whose `.sample` is one. `C' = 2C` (learned
            variance, e.g. DiT) keeps the first C channels, the mean prediction.
        alphas_cumprod: `(T,)`, values in (0, 1], decreasing.
        sample_shape: `(C, H, W)` of the images the network was trained on.
        prediction_type: what `network` predicts: "epsilon", "v_prediction" or "sample" (x0);
            `epsilon()` converts to epsilon exactly.
        condition_kind: "none" or "class" (then `num_classes` labels 0..num_classes-1).
        null_class: the label of the unconditional branch of a class model trained with label dropout
            (DiT: `num_classes`), or None when it has none.
        guidance_scale: 1 = the conditional prediction (what the papers attack); s != 1 =
            eps_uncond + s (eps_cond - eps_uncond) (classifier-free guidance, Ho & Salimans), which
            needs a `null_class`.
    """

    def __init__(self, network: nn.Module, alphas_cumprod: torch.Tensor, sample_shape: tuple[int, int, int],
                 prediction_type: str = "epsilon", *, condition_kind: str = "none", num_classes: int | None = None,
                 null_class: int | None = None, guidance_scale: float = 1.0) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise MiaGenError(
                f"prediction_type={prediction_type!r} is not supported; set model.prediction_type to one of "
                f"{list(PREDICTION_TYPES)} (or null to read it from the checkpoint's scheduler)."
            )
        _check_conditioning(condition_kind, num_classes, null_class, guidance_scale)
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 1 or not (
            (alphas_cumprod > 0).all() and (alphas_cumprod <= 1).all()
        ):
            raise MiaGenError(
                "alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]; check model.betas "
                "(beta_start, beta_end in (0, 1))."
            )
        self.network = network
        # A plain attribute, not a buffer: it stays float64 on CPU whatever `.to()` is called.
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = int(len(alphas_cumprod))
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.prediction_type = prediction_type
        self.condition_kind = condition_kind
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_class = None if null_class is None else int(null_class)
        self.guidance_scale = float(guidance_scale)
        self.eval()

    def train(self, mode: bool = True) -> "Denoiser":
        """Stays in eval mode: dropout would make every attack score noisy (and weaken PIA)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        parameter = next(self.network.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _check(self, x_t: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.sample_shape
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            shape = tuple(x_t.shape) if hasattr(x_t, "shape") else type(x_t).__name__
            raise MiaGenError(f"x_t must be a (N, {c}, {h}, {w}) image tensor, got {shape}.")
        if not x_t.is_floating_point():
            raise MiaGenError(f"x_t must be a float tensor in the model's scale ([-1, 1] for images), got {x_t.dtype}; "
                              "map uint8 images with x / 127.5 - 1.")
        if x_t.shape[1] != c:
            raise MiaGenError(
                f"x_t has {x_t.shape[1]} channel(s) but the diffusion model takes {c}; set data.channels={c} "
                "so the data loader converts the images."
            )
        if tuple(x_t.shape[2:]) != (h, w):
            raise MiaGenError(
                f"x_t is {x_t.shape[2]}x{x_t.shape[3]} px but the diffusion model takes {h}x{w}; set "
                f"data.resolution={h} so the data loader resizes the images."
            )
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise MiaGenError(f"t must hold integer timesteps in [0, {self.num_train_timesteps}), got dtype {t.dtype}.")
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise MiaGenError(f"t must have shape ({x_t.shape[0]},) (one timestep per image) or be a scalar, "
                              f"got {tuple(t.shape)}.")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise MiaGenError(
                f"timesteps must lie in [0, {self.num_train_timesteps}) for this model (T="
                f"{self.num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]; fix the attack's timestep settings."
            )
        return x_t, t.to(torch.int64)

    def _check_condition(self, condition: Any, n: int) -> torch.Tensor | None:
        """The condition as class ids `(n,)` int64, or None for an unconditional model."""
        if self.condition_kind == "none":
            if condition is not None:
                raise MiaGenError(
                    "a condition was given, but this diffusion model is unconditional (its network takes no "
                    "class labels); score it without conditions."
                )
            return None
        if condition is None:
            raise MiaGenError(
                f"this diffusion model is class-conditional ({self.num_classes} classes): give each record's class "
                "label as its condition (the pipeline passes the dataset's labels; with the Python API, "
                "`score(..., conditions=labels)`; `Denoiser.epsilon(x_t, t, labels)`)."
            )
        condition = torch.as_tensor(condition)
        if condition.is_floating_point() or condition.is_complex() or condition.dtype == torch.bool \
                or condition.shape != (n,):
            raise MiaGenError(
                f"the condition of a class-conditional model must be one integer class label per image, shape "
                f"({n},), got {condition.dtype} {tuple(condition.shape)}."
            )
        if n and (int(condition.min()) < 0 or int(condition.max()) >= self.num_classes):
            raise MiaGenError(
                f"class labels must lie in [0, {self.num_classes}) for this model, got [{int(condition.min())}, "
                f"{int(condition.max())}]; the dataset's labels do not match the model's classes."
            )
        return condition.to(torch.int64)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's raw prediction `(N, C', H, W)` (before the learned-variance cut), in x_t's dtype."""
        parameter = next(self.network.parameters(), None)
        network_dtype = parameter.dtype if parameter is not None else x_t.dtype
        if labels is None:
            out = self.network(x_t.to(network_dtype), t)
        else:
            out = self.network(x_t.to(network_dtype), t, class_labels=labels)
        out = getattr(out, "sample", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.to(x_t.dtype)

    def epsilon(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any = None, *,
                grad: bool = False) -> torch.Tensor:
        """Predicted noise at `x_t`.

        Args:
            x_t: `(N, C, H, W)`, a noised image (any device / float dtype; the model's device is used).
            t: `(N,)` int64 in [0, T) (a scalar is broadcast).
            condition: per image: class ids `(N,)` int64 for a class-conditional model (`condition_kind`
                "class"); None for an unconditional one.
            grad: keep the autograd graph (gradient-based attacks); otherwise runs under no_grad.

        Returns:
            `(N, C, H, W)` on the model's device, in x_t's dtype.
        """
        x_t, t = self._check(x_t, t)
        labels = self._check_condition(condition, len(x_t))
        x_t = x_t.to(self.device)
        t = t.to(x_t.device)
        with torch.set_grad_enabled(grad):
            out = self._predict(x_t, t, None if labels is None else labels.to(x_t.device))
            c = self.sample_shape[0]
            if out.shape[1] == 2 * c:  # learned variance (Nichol & Dhariwal): mean prediction first
                out = out[:, :c]
            if labels is not None and self.guidance_scale != 1.0:  # classifier-free guidance (Ho & Salimans)
                uncond = self._predict(x_t, t, torch.full_like(labels, self.null_class, device=x_t.device))[:, :c]
                out = uncond + self.guidance_scale * (out - uncond)
            if self.prediction_type == "epsilon":
                return out
            a = self.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
            sqrt_a, sqrt_1ma = a.sqrt().to(x_t.dtype), (1 - a).sqrt().to(x_t.dtype)
            if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho, 2022)
                return sqrt_a * out + sqrt_1ma * x_t
            return (x_t - sqrt_a * out) / sqrt_1ma  # x_t = sqrt(a) x0 + sqrt(1-a) eps

    forward = epsilon

    @classmethod
    def from_unet(cls, unet: nn.Module, scheduler: Any, prediction_type: str | None = None, *,
                  guidance_scale: float = 1.0) -> "Denoiser":
        """Wrap a diffusers `UNet2DModel` (class-conditional with `num_class_embeds`) or a
        `DiTTransformer2DModel` and its scheduler (object or config dict).

        prediction_type: what the user declared (`model.prediction_type`); None reads it from the
        scheduler. A declaration that contradicts the scheduler is an error, not a silent choice.
        guidance_scale: see `Denoiser`; the model's classes and null class are read from its config.
        """
        scheduler = _as_scheduler(scheduler)
        checkpoint_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type is not None and prediction_type != checkpoint_type:
            raise MiaGenError(
                f"model.prediction_type={prediction_type} but the checkpoint's scheduler says {checkpoint_type}: "
                f"{_SPOKEN.get(checkpoint_type, checkpoint_type)} model used as {_SPOKEN.get(prediction_type, prediction_type)} "
                "one gives wrong scores. Set model.prediction_type=null to use the checkpoint's, or fix "
                "the checkpoint's scheduler/scheduler_config.json."
            )
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise MiaGenError(
                f"scheduler {type(scheduler).__name__} has no alphas_cumprod; use a DDPM/DDIM-type scheduler "
                "or give the noise schedule in model.betas."
            )
        config = unet.config
        size = config.sample_size
        if size is None:
            raise MiaGenError("the UNet's config has no sample_size; set it in the checkpoint's unet/config.json "
                              "(the image size it was trained on, e.g. 32).")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        kind, num_classes, null_class = _conditioning_of(unet)
        return cls(unet, alphas_cumprod, (config.in_channels, h, w), checkpoint_type, condition_kind=kind,
                   num_classes=num_classes, null_class=null_class, guidance_scale=guidance_scale)


def _check_conditioning(kind: str, num_classes: int | None, null_class: int | None, guidance_scale: Any) -> None:
    if kind not in CONDITION_KINDS:
        raise MiaGenError(f"condition_kind={kind!r} is not supported; use one of {list(CONDITION_KINDS)}.")
    if kind == "class" and (num_classes is None or int(num_classes) < 1):
        raise MiaGenError("a class-conditional Denoiser needs num_classes >= 1 (the number of class labels).")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise MiaGenError(f"model.guidance_scale must be a number (1 = the conditional prediction), got "
                          f"{guidance_scale!r}.")
    if float(guidance_scale) != 1.0:
        if kind == "none":
            raise MiaGenError(f"model.guidance_scale={guidance_scale} needs a conditional model; this one is "
                              "unconditional: set model.guidance_scale=1.")
        if null_class is None:
            raise MiaGenError(
                f"model.guidance_scale={guidance_scale} mixes in the unconditional prediction, but this "
                "class-conditional model has no null class (it was not trained with label dropout, e.g. a "
                "UNet2DModel with num_class_embeds); set model.guidance_scale=1 (the conditional prediction)."
            )


def _conditioning_of(network: nn.Module) -> tuple[str, int | None, int | None]:
    """(condition_kind, num_classes, null_class) of a diffusers network, read from its config."""
    config = network.config
    if config.get("class_embed_type") is not None:
        raise MiaGenError(
            f"the UNet's class_embed_type={config.get('class_embed_type')!r} (continuous class embeddings) is not "
            "supported; mia-gen attacks class-conditional UNets with num_class_embeds (integer labels)."
        )
    if config.get("num_class_embeds") is not None:  # UNet2DModel: nn.Embedding(num_class_embeds), no null label
        return "class", int(config.num_class_embeds), None
    if config.get("norm_type") == "ada_norm_zero" and config.get("num_embeds_ada_norm") is not None:
        # DiT: the label table has one extra row, the null label num_classes, when trained with label dropout
        num_classes = int(config.num_embeds_ada_norm)
        rows = [m.num_embeddings for name, m in network.named_modules()
                if name.endswith("class_embedder.embedding_table") and isinstance(m, nn.Embedding)]
        return "class", num_classes, num_classes if rows and rows[0] > num_classes else None
    return "none", None, None


def _as_scheduler(scheduler: Any):
    """A diffusers scheduler from a scheduler object or a config dict naming its `_class_name`."""
    if hasattr(scheduler, "config") and hasattr(scheduler, "alphas_cumprod"):
        return scheduler
    import diffusers

    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise MiaGenError(
                f"scheduler class {config.get('_class_name')!r} is not a diffusers scheduler; fix _class_name "
                "in scheduler_config.json (e.g. DDPMScheduler)."
            )
        return cls.from_config(config)
    return scheduler


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def scheduler_from_betas(betas_cfg: Any, prediction_type: str | None):
    """A `DDPMScheduler` from `model.betas` (`num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end`)."""
    from diffusers import DDPMScheduler

    betas = _plain(betas_cfg)
    allowed = {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end"}
    if not betas or set(betas) - allowed:
        raise MiaGenError(
            f"model.betas must set {sorted(allowed)} (e.g. 1000, linear, 1.0e-4, 0.02), got {betas or None}; "
            "it gives the noise schedule the network was trained with."
        )
    try:
        return DDPMScheduler(**betas, prediction_type=prediction_type or "epsilon")
    except NotImplementedError as err:
        raise MiaGenError(f"model.betas.beta_schedule: {err}; use linear, scaled_linear or squaredcos_cap_v2.") from err


def _load_unet(location: str | Path, subfolder: str | None, local_only: bool):
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(str(location), subfolder=subfolder, local_files_only=local_only,
                                           use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, EnvironmentError, ValueError) as err:
        where = f"{location}/{subfolder}" if subfolder else str(location)
        raise MissingAssetError(
            f"could not load a UNet2DModel from {where} ({str(err).splitlines()[0]}); it needs config.json and "
            f"{UNET_WEIGHTS} (safetensors). Save the model there with `unet.save_pretrained(dir)`"
            + ("" if not local_only else ", or set model.allow_download=true to fetch a hub id")
            + "."
        ) from err


def _load_scheduler(location: str | Path, local_only: bool):
    import diffusers

    try:
        config = diffusers.DDPMScheduler.load_config(str(location), subfolder="scheduler", local_files_only=local_only)
    except (OSError, EnvironmentError, ValueError) as err:
        raise MissingAssetError(
            f"could not read the scheduler config at {location}/scheduler ({str(err).splitlines()[0]}); a diffusers "
            "pipeline directory holds model_index.json, unet/ and scheduler/scheduler_config.json. Save it with "
            "`pipeline.save_pretrained(dir)`, or set model.allow_download=true to fetch a hub id."
        ) from err
    return _as_scheduler(config)


def _resolve_path(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def load_denoiser(model_cfg: Any, model_dir_or_id: str | os.PathLike | None, device: str | torch.device = "cpu") -> Denoiser:
    """The `Denoiser` of a trained or pretrained diffusion model, in eval() mode on `device`.

    model_cfg keys (see configs/model/diffusers.yaml): `prediction_type` (null = from the checkpoint),
    `use_ema` (prefer `unet_ema/` when present), `allow_download` (hub ids; off by default),
    `betas` (noise schedule for a bare UNet directory or an own network), `network` (`_target_` +
    kwargs of an own epsilon network), `weights` (its safetensors state dict) and `guidance_scale`
    (class-conditional models; default 1 = the conditional prediction).

    model_dir_or_id: a diffusers pipeline directory (`model_index.json`, `unet/` [`unet_ema/`],
    `scheduler/`; a UNet with `num_class_embeds` makes a class-conditional Denoiser; latent
    pipelines such as DiT are refused for now), a bare UNet directory (`config.json` + safetensors),
    a hub id (with `allow_download=true` or already in the local cache), or, for an own network, the
    directory `model.weights` is relative to.
    """
    cfg = _plain(model_cfg)
    prediction_type = cfg.get("prediction_type")
    if cfg.get("network"):
        denoiser = _load_own_network(cfg, model_dir_or_id, prediction_type)
    else:
        if not model_dir_or_id:
            raise MiaGenError("no diffusion model given; set model.checkpoint=<pipeline directory or hub id>.")
        denoiser = _load_diffusers(cfg, model_dir_or_id, prediction_type)
    return denoiser.to(device).eval()


def _load_diffusers(cfg: dict, location: str | os.PathLike, prediction_type: str | None) -> Denoiser:
    allow_download = bool(cfg.get("allow_download", False))
    use_ema = bool(cfg.get("use_ema", True))
    guidance_scale = cfg.get("guidance_scale", 1.0)
    path = _resolve_path(location)
    if path.is_dir():
        _warn_if_incomplete(path)
        if (path / PIPELINE_INDEX).is_file():
            _refuse_latent_pipeline(path)
            subfolder = "unet_ema" if use_ema and (path / "unet_ema" / "config.json").is_file() else "unet"
            if not (path / subfolder).is_dir():
                raise MissingAssetError(
                    f"{path} has {PIPELINE_INDEX} but no {subfolder}/ directory; the pipeline is incomplete. "
                    "Save it again with `pipeline.save_pretrained(dir)` (or retrain with `mia-gen-train`)."
                )
            log.info("diffusion model: %s/%s", path, subfolder)
            return Denoiser.from_unet(_load_unet(path, subfolder, True), _load_scheduler(path, True), prediction_type,
                                      guidance_scale=guidance_scale)
        if (path / "config.json").is_file():
            if not cfg.get("betas"):
                raise MiaGenError(
                    f"{path} is a bare UNet directory without a scheduler; give its noise schedule in model.betas "
                    "(num_train_timesteps, beta_schedule, beta_start, beta_end) or point model.checkpoint at the "
                    "whole pipeline directory (with model_index.json and scheduler/)."
                )
            scheduler = scheduler_from_betas(cfg["betas"], prediction_type)
            return Denoiser.from_unet(_load_unet(path, None, True), scheduler, prediction_type,
                                      guidance_scale=guidance_scale)
        raise MissingAssetError(
            f"{path} holds neither a diffusers pipeline ({PIPELINE_INDEX}, unet/, scheduler/) nor a UNet "
            f"(config.json, {UNET_WEIGHTS}). Put the model there (`pipeline.save_pretrained(dir)`), or point "
            "model.checkpoint at the right directory."
        )
    looks_like_hub_id = not path.exists() and str(location).count("/") == 1 and not str(location).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MissingAssetError(
            f"no diffusion model at {path}: the directory does not exist. Put a diffusers pipeline there "
            f"(`pipeline.save_pretrained('{path}')`, or `huggingface-cli download <id> --local-dir {path}`), "
            "or set model.checkpoint=<hub id> with model.allow_download=true."
        )
    hub_id, local_only = str(location), not allow_download
    try:
        unet = _load_unet(hub_id, "unet_ema", local_only) if use_ema else None
    except MissingAssetError:
        unet = None
    try:
        unet = unet or _load_unet(hub_id, "unet", local_only)
        scheduler = _load_scheduler(hub_id, local_only)
    except MissingAssetError as err:
        if local_only:
            raise MissingAssetError(
                f"{hub_id} is not a local directory and not in the Hugging Face cache, and downloads are off. "
                f"Download it (`huggingface-cli download {hub_id} --local-dir <dir>`) and set "
                f"model.checkpoint=<dir>, or set model.allow_download=true."
            ) from err
        raise
    return Denoiser.from_unet(unet, scheduler, prediction_type, guidance_scale=guidance_scale)


def _refuse_latent_pipeline(path: Path) -> None:
    """A pipeline whose network denoises a VAE latent (DiT, Stable Diffusion) is not attacked yet."""
    try:
        components = json.loads((path / PIPELINE_INDEX).read_text())
    except json.JSONDecodeError as err:
        raise CorruptStoreError(f"{path / PIPELINE_INDEX} is not valid JSON ({err}); save the pipeline again "
                                "with `pipeline.save_pretrained(dir)`.") from err
    latent = [name for name in ("vae", "transformer", "text_encoder") if name in components]
    if latent:
        raise MiaGenError(
            f"{path} is a {components.get('_class_name', 'diffusers')} with {', '.join(latent)}: a latent "
            "(or text-conditioned) diffusion model. Not yet: latent models come with issue 12's next part; "
            "today mia-gen attacks pixel-space pipelines (DDPMPipeline / DDIMPipeline, unconditional or with a "
            "UNet2DModel's num_class_embeds); a pixel-space DiT transformer can be wrapped with "
            "`Denoiser.from_unet(transformer, scheduler)`."
        )


def _warn_if_incomplete(path: Path) -> None:
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            summary = json.loads(state.read_text())
        except json.JSONDecodeError as err:
            raise CorruptStoreError(f"{state} is not valid JSON ({err}); delete {path} and retrain.") from err
        if not summary.get("complete", False):
            log.warning("%s is an unfinished training run (step %s of %s); attacking it as it is.",
                        path, summary.get("step"), summary.get("steps"))


def _load_own_network(cfg: dict, location: str | os.PathLike | None, prediction_type: str | None) -> Denoiser:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    network_cfg = dict(cfg["network"])
    if "_target_" not in network_cfg:
        raise MiaGenError("model.network needs a `_target_` (the importable class of your epsilon network) "
                          "plus its constructor kwargs.")
    shape = cfg.get("sample_shape")
    if not shape or len(shape) != 3:
        raise MiaGenError("model.sample_shape must be [C, H, W] of the network's images, e.g. "
                          "[${data.channels}, ${data.resolution}, ${data.resolution}].")
    weights = cfg.get("weights")
    if not weights:
        raise MiaGenError("model.weights must name the safetensors state dict of model.network "
                          "(`safetensors.torch.save_file(net.state_dict(), path)`).")
    weights_path = Path(weights).expanduser()
    if not weights_path.is_absolute() and location:
        weights_path = _resolve_path(location) / weights_path
    if not weights_path.is_file():
        raise MissingAssetError(
            f"model.weights={weights_path} does not exist; save your network's state dict there with "
            "`safetensors.torch.save_file(net.state_dict(), path)` or fix the path (relative paths are "
            "relative to model.checkpoint)."
        )
    try:
        network = instantiate(network_cfg)
    except InstantiationException as err:
        raise MiaGenError(f"model.network could not be built ({err}); check its _target_ and kwargs.") from err
    try:
        network.load_state_dict(load_file(str(weights_path), device="cpu"))
    except (SafetensorError, RuntimeError) as err:
        raise CorruptStoreError(
            f"{weights_path} could not be loaded into {type(network).__name__} ({str(err).splitlines()[0]}); "
            "it is damaged or was saved from another architecture: check model.network."
        ) from err
    scheduler = scheduler_from_betas(cfg.get("betas"), prediction_type)
    return Denoiser(network, scheduler.alphas_cumprod, tuple(shape), prediction_type or "epsilon",
                    guidance_scale=cfg.get("guidance_scale", 1.0))
