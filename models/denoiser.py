"""The one interface white-box diffusion attacks use: epsilon(x_t, t, condition) plus the noise schedule.

Attacks (loss, SecMI, PIA, GSA, ...) see only a `Denoiser`; they never touch diffusers
internals, so any epsilon-, v- or x0-predicting network is attacked the same way:

- `alphas_cumprod`: `(T,)` float64 on CPU, the cumulative product of (1 - beta_t);
- `num_train_timesteps`: T; `sample_shape`: `(C, H, W)` of x0, what the network denoises;
  `image_shape`: `(C, H, W)` of a record (the same for a pixel model; `(3, H, W)` for Stable Diffusion);
- `to_x0(images)`: records -> x0: the images themselves, or for a latent model (Stable Diffusion, DiT) the
  VAE posterior MEAN times `scaling_factor` (not a sample: a record has one x0, as in SecMI / PIA);
- `condition_kind`: "none" (unconditional), "class" (`num_classes` class labels) or "text" (text
  embeddings `(N, L, D)`, from `text_conditions(captions)`: the pipeline's own tokenizer and text
  encoder; the empty caption "" is the unconditional branch);
- `epsilon(x_t, t, condition)`: the predicted noise, whatever the network was trained to predict;
  `condition` is one per record, None for an unconditional model.

`load_denoiser` builds one from a diffusers pipeline directory (or hub id, if allowed): pixel
`DDPMPipeline`s (unconditional or class-conditional), `StableDiffusionPipeline`s (+ `model.lora`) and
`DiTPipeline`s; a bare UNet directory plus `model.betas`; or the user's own network + safetensors weights.
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
from mia_gen.fixed_batches import in_fixed_chunks
from mia_gen.models.latent import LatentEncoder, TextEncoder, apply_lora, load_text_encoder, load_vae

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CONDITION_KINDS = ("none", "class", "text")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers classes of a pipeline's denoising network
NETWORK_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
CAPTIONS_HINT = ("give each record's caption (data.captions=true for the digits; a metadata.jsonl with file_name "
                 "and text beside an image folder)")
PIPELINE_INDEX = "model_index.json"
# Rows per network call without gradients, by device type (`Denoiser.micro_batch`; mia_gen/fixed_batches.py).
# Every call gets exactly this many rows, so a record's prediction depends on the record alone, whatever the
# attack's `batch_size` and whichever CPU runs it; scores are keyed by device type, which fixes the default.
MICRO_BATCH = {"cpu": 32, "cuda": 128}  # CPU: as fast as the old 256-row calls (BENCHMARKS.md (d3))
MICRO_BATCH_OTHER = 32
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What a network predicts, in the words of an error message.
_SPOKEN = {"epsilon": "an epsilon", "v_prediction": "a v-prediction", "sample": "a sample (x0)"}


class Denoiser(nn.Module):
    """A noise-prediction network `epsilon(x_t, t, condition)` with its noise schedule; always in eval() mode.

    Args:
        network: called as `network(x_t, t)` (unconditional), `network(x_t, t, class_labels=y)`
            (class-conditional: diffusers' `UNet2DModel(num_class_embeds=...)`, `DiTTransformer2DModel`) or
            `network(x_t, t, encoder_hidden_states=e)` (text: `UNet2DConditionModel`); returns a tensor
            `(N, C', H, W)` or an object whose `.sample` is one. `C' = 2C` (learned variance, e.g. DiT)
            keeps the first C channels, the mean prediction.
        alphas_cumprod: `(T,)`, values in (0, 1], decreasing.
        sample_shape: `(C, H, W)` of x0, what the network denoises (images, or VAE latents).
        prediction_type: what `network` predicts: "epsilon", "v_prediction" or "sample" (x0);
            `epsilon()` converts to epsilon exactly.
        condition_kind: "none", "class" (then `num_classes` labels 0..num_classes-1) or "text"
            (embeddings `(N, L, text_dim)`).
        null_class: the label of the unconditional branch of a class model trained with label dropout
            (DiT: `num_classes`), or None when it has none.
        guidance_scale: 1 = the conditional prediction (what the papers attack); s != 1 =
            eps_uncond + s (eps_cond - eps_uncond) (classifier-free guidance, Ho & Salimans), which
            needs a `null_class` (class) or the unconditional text embedding (text).
        latent: the VAE encoder of a latent model (`to_x0`); None for a pixel model.
        text: the pipeline's tokenizer + text encoder (`text_conditions`); its embedding of "" becomes
            `unconditional_text`.
        unconditional_text: `(L, D)`, the embedding of the empty caption, when no `text` is given.
        text_dim: D of a text model's embeddings (default: the network's `cross_attention_dim`).
        micro_batch: rows per network call without gradients (None: `MICRO_BATCH` of the device type,
            32 on CPU, 128 on CUDA). Every such call gets exactly this many rows, the last padded; the
            outputs are float-identical for any size, bit-identical only for the same size on one machine.
    """

    def __init__(self, network: nn.Module, alphas_cumprod: torch.Tensor, sample_shape: tuple[int, int, int],
                 prediction_type: str = "epsilon", *, condition_kind: str = "none", num_classes: int | None = None,
                 null_class: int | None = None, guidance_scale: float = 1.0, latent: LatentEncoder | None = None,
                 text: TextEncoder | None = None, unconditional_text: torch.Tensor | None = None,
                 text_dim: int | None = None, micro_batch: int | None = None) -> None:
        super().__init__()
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                        or micro_batch < 1):
            raise MiaGenError(f"micro_batch must be a positive integer (rows per network call) or None (the "
                              f"device's default), got {micro_batch!r}.")
        if prediction_type not in PREDICTION_TYPES:
            raise MiaGenError(
                f"prediction_type={prediction_type!r} is not supported; set model.prediction_type to one of "
                f"{list(PREDICTION_TYPES)} (or null to read it from the checkpoint's scheduler)."
            )
        if condition_kind == "text":
            network_dim = getattr(getattr(network, "config", None), "cross_attention_dim", None)
            text_dim = text_dim or network_dim or (text.hidden_size if text is not None else None)
            if text_dim is None:
                raise MiaGenError("a text-conditioned Denoiser needs text_dim (the width D of its (N, L, D) "
                                  "embeddings) or a network with config.cross_attention_dim.")
            if text is not None and text.hidden_size != int(text_dim):
                raise MiaGenError(
                    f"the text encoder's embeddings have width {text.hidden_size} but the network takes {text_dim} "
                    "(cross_attention_dim); the pipeline's text_encoder/ and its UNet do not belong together."
                )
            if text is not None:
                unconditional_text = text.encode([""])[0]
        _check_conditioning(condition_kind, num_classes, null_class, guidance_scale,
                            has_null_text=unconditional_text is not None)
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
        self.text_dim = int(text_dim) if condition_kind == "text" else None
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        # Not submodules: `parameters()` stays the denoising network's (GSA, DP); `_apply` moves them along.
        self._encoders = {"latent": latent, "text": text}
        self.register_buffer("unconditional_text", None if unconditional_text is None
                             else torch.as_tensor(unconditional_text).detach().float(), persistent=False)
        if latent is not None and latent.latent_channels != self.sample_shape[0]:
            raise MiaGenError(
                f"the VAE makes {latent.latent_channels}-channel latents but the network denoises "
                f"{self.sample_shape[0]} channels; the pipeline's vae/ and its network do not belong together."
            )
        self.image_shape = latent.image_shape(self.sample_shape) if latent is not None else self.sample_shape
        self.eval()

    @property
    def latent(self) -> LatentEncoder | None:
        return self._encoders["latent"]

    @property
    def text(self) -> TextEncoder | None:
        return self._encoders["text"]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for encoder in self._encoders.values():
            if encoder is not None and recurse:
                encoder._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "Denoiser":
        """Stays in eval mode: dropout would make every attack score noisy (and weaken PIA)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        parameter = next(self.network.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def rows_per_call(self) -> int:
        """Rows of every network call without gradients: `micro_batch`, or the device type's default."""
        if self.micro_batch is not None:
            return self.micro_batch
        return MICRO_BATCH.get(self.device.type, MICRO_BATCH_OTHER)

    def _check_images(self, x: Any, name: str) -> torch.Tensor:
        """Records `(N, C_img, H, W)` (or, for a pixel model, any x in image space) of `image_shape`."""
        c, h, w = self.image_shape
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise MiaGenError(f"{name} must be a (N, {c}, {h}, {w}) image tensor, got {shape}.")
        if not x.is_floating_point():
            raise MiaGenError(f"{name} must be a float tensor in the model's scale ([-1, 1] for images), got "
                              f"{x.dtype}; map uint8 images with x / 127.5 - 1.")
        if x.shape[1] != c:
            raise MiaGenError(
                f"{name} has {x.shape[1]} channel(s) but the diffusion model takes {c}; set data.channels={c} "
                "so the data loader converts the images."
            )
        if tuple(x.shape[2:]) != (h, w):
            if self.latent is not None:
                lc, lh, lw = self.sample_shape
                raise MiaGenError(
                    f"{name} are {x.shape[2]}x{x.shape[3]} px but this latent model's VAE turns {h}x{w} px images "
                    f"into the {lc}x{lh}x{lw} latents its network denoises (downsampling factor "
                    f"{self.latent.downsampling}); set data.resolution={h} so the data loader resizes the images."
                )
            raise MiaGenError(
                f"{name} is {x.shape[2]}x{x.shape[3]} px but the diffusion model takes {h}x{w}; set "
                f"data.resolution={h} so the data loader resizes the images."
            )
        return x

    def _check(self, x_t: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent is None:
            x_t = self._check_images(x_t, "x_t")
        else:
            c, h, w = self.sample_shape
            if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c, h, w) \
                    or not x_t.is_floating_point():
                shape = tuple(x_t.shape) if hasattr(x_t, "shape") else type(x_t).__name__
                raise MiaGenError(
                    f"x_t must be a float (N, {c}, {h}, {w}) tensor in this latent model's latent space, got {shape}; "
                    "map the records with `Denoiser.to_x0(images)` first (the attacks do)."
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
        """The condition as class ids `(n,)` int64, text embeddings `(n, L, D)`, or None (unconditional)."""
        if self.condition_kind == "none":
            if condition is not None:
                raise MiaGenError(
                    "a condition was given, but this diffusion model is unconditional (its network takes no "
                    "class labels or text); score it without conditions."
                )
            return None
        if self.condition_kind == "text":
            return self._check_text(condition, n)
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

    def _check_text(self, condition: Any, n: int) -> torch.Tensor:
        d = self.text_dim
        if condition is None:
            raise MiaGenError(
                f"this diffusion model is text-conditioned: {CAPTIONS_HINT}; the pipeline turns them into embeddings "
                "(with the Python API: `denoiser.epsilon(x_t, t, denoiser.text_conditions(captions))`)."
            )
        if isinstance(condition, (list, tuple)) and all(isinstance(c, str) for c in condition):
            raise MiaGenError("the condition of a text model is the captions' embeddings, not the captions: pass "
                              "`denoiser.text_conditions(captions)`.")
        if not isinstance(condition, torch.Tensor) or condition.dim() != 3 or not condition.is_floating_point() \
                or condition.shape[0] != n or condition.shape[2] != d:
            shape = tuple(condition.shape) if hasattr(condition, "shape") else type(condition).__name__
            dtype = getattr(condition, "dtype", "")
            raise MiaGenError(
                f"the condition of a text-conditioned model must be one float embedding per image, shape ({n}, L, "
                f"{d}) (from `denoiser.text_conditions(captions)`), got {dtype} {shape}."
            )
        return condition

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The network's raw prediction `(N, C', H, W)` (before the learned-variance cut), in x_t's dtype."""
        parameter = next(self.network.parameters(), None)
        network_dtype = parameter.dtype if parameter is not None else x_t.dtype
        if condition is None:
            out = self.network(x_t.to(network_dtype), t)
        elif self.condition_kind == "text":
            out = self.network(x_t.to(network_dtype), t, encoder_hidden_states=condition.to(x_t.device, network_dtype))
        else:
            out = self.network(x_t.to(network_dtype), t, class_labels=condition)
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
                "class"); text embeddings `(N, L, D)` float (`text_conditions(captions)`) for a text model;
                None for an unconditional one.
            grad: keep the autograd graph (gradient-based attacks: one network call, the shape the caller
                gives); otherwise runs under no_grad in calls of exactly `rows_per_call` rows, so a row's
                prediction does not depend on the other rows or on N.

        Returns:
            `(N, C, H, W)` on the model's device, in x_t's dtype.
        """
        x_t, t = self._check(x_t, t)
        condition = self._check_condition(condition, len(x_t))
        x_t = x_t.to(self.device)
        t = t.to(x_t.device)
        condition = None if condition is None else condition.to(x_t.device)
        if grad or len(x_t) == 0:  # gradient callers fix their own shapes (GSA: one record's timesteps a call)
            with torch.set_grad_enabled(grad):
                return self._epsilon(x_t, t, condition)
        with torch.no_grad():
            return in_fixed_chunks(self._epsilon, (x_t, t, condition), self.rows_per_call)

    def _epsilon(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """`epsilon` of checked inputs on the model's device, in one network call (two with guidance)."""
        out = self._predict(x_t, t, condition)
        c = self.sample_shape[0]
        if out.shape[1] == 2 * c:  # learned variance (Nichol & Dhariwal): mean prediction first
            out = out[:, :c]
        if condition is not None and self.guidance_scale != 1.0:  # classifier-free guidance (Ho & Salimans)
            uncond = self._predict(x_t, t, self._unconditional(condition, x_t.device))[:, :c]
            out = uncond + self.guidance_scale * (out - uncond)
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = a.sqrt().to(x_t.dtype), (1 - a).sqrt().to(x_t.dtype)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho, 2022)
            return sqrt_a * out + sqrt_1ma * x_t
        return (x_t - sqrt_a * out) / sqrt_1ma  # x_t = sqrt(a) x0 + sqrt(1-a) eps

    forward = epsilon

    def _unconditional(self, condition: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The unconditional branch's condition for each row: the null class, or the embedding of ""."""
        if self.condition_kind == "text":
            return self.unconditional_text.to(device).expand(len(condition), *self.unconditional_text.shape)
        return torch.full_like(condition, self.null_class, device=device)

    def to_x0(self, images: torch.Tensor) -> torch.Tensor:
        """Records -> x0, what the network denoises.

        Args:
            images: `(N, C_img, H, W)` float, in [-1, 1], of `image_shape`.

        Returns:
            a pixel model: the images themselves (on the model's device, dtype kept); a latent model:
            `vae.encode(images).latent_dist.mean * vae.config.scaling_factor` `(N, *sample_shape)`, float32
            on the model's device: the posterior MEAN, not a sample, computed under no_grad in fixed-size
            chunks (a record's latent does not depend on its batch).
        """
        images = self._check_images(images, "images")
        if self.latent is None:
            return images.to(self.device)
        return self.latent.encode(images).to(self.device)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (e.g. a sampler's output) -> records `(N, *image_shape)`, float32 in [-1, 1] on the model's
        device: a pixel model's x0 clipped; a latent model's decoded by the VAE
        (`vae.decode(x0 / scaling_factor).sample`, clipped), under no_grad in fixed-size chunks."""
        c, h, w = self.sample_shape
        if not isinstance(x0, torch.Tensor) or x0.dim() != 4 or tuple(x0.shape[1:]) != (c, h, w):
            shape = tuple(x0.shape) if hasattr(x0, "shape") else type(x0).__name__
            raise MiaGenError(f"to_images takes x0 of shape (N, {c}, {h}, {w}), got {shape}.")
        if self.latent is None:
            return x0.to(self.device, torch.float32).clamp(-1, 1)
        return self.latent.decode(x0).to(self.device)

    def text_conditions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> `(N, L, D)` float32 embeddings on the model's device, the conditions of a text model.

        The pipeline's own tokenizer (padding to `model_max_length`, truncating) and text encoder (its last
        hidden state, as `StableDiffusionPipeline.encode_prompt` with clip_skip=None), in fixed-size chunks
        under no_grad. "" gives the unconditional branch (`unconditional_text`).
        """
        if self.condition_kind != "text":
            raise MiaGenError(f"text_conditions: this diffusion model is not text-conditioned (condition_kind="
                              f"{self.condition_kind!r}); score it without captions.")
        if self.text is None:
            raise MiaGenError("this text-conditioned Denoiser has no tokenizer / text encoder (built without "
                              "`text=`); load the whole pipeline directory, or pass embeddings to `epsilon` yourself.")
        if isinstance(captions, str) or captions is None or not all(isinstance(c, str) for c in captions):
            missing = "no captions" if captions is None else (
                "a single string" if isinstance(captions, str) else
                f"{sum(not isinstance(c, str) for c in captions)} missing caption(s)")
            raise MiaGenError(f"this diffusion model is text-conditioned but got {missing}: {CAPTIONS_HINT}; "
                              "text_conditions takes a list of strings, one per record.")
        if not captions:
            return torch.zeros(0, self.text.tokenizer.model_max_length, self.text_dim, device=self.device)
        return self.text.encode(list(captions)).to(self.device)

    @classmethod
    def from_unet(cls, unet: nn.Module, scheduler: Any, prediction_type: str | None = None, *,
                  guidance_scale: float = 1.0, latent: LatentEncoder | None = None,
                  text: TextEncoder | None = None) -> "Denoiser":
        """Wrap a diffusers `UNet2DModel` (class-conditional with `num_class_embeds`), a
        `UNet2DConditionModel` (text: cross-attention) or a `DiTTransformer2DModel` and its scheduler
        (object or config dict).

        prediction_type: what the user declared (`model.prediction_type`); None reads it from the
        scheduler. A declaration that contradicts the scheduler is an error, not a silent choice.
        guidance_scale: see `Denoiser`; the model's classes and null class are read from its config.
        latent, text: a latent model's VAE encoder and a text model's tokenizer + text encoder.
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
                   num_classes=num_classes, null_class=null_class, guidance_scale=guidance_scale, latent=latent,
                   text=text)


def _check_conditioning(kind: str, num_classes: int | None, null_class: int | None, guidance_scale: Any, *,
                        has_null_text: bool = False) -> None:
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
        if kind == "text" and not has_null_text:
            raise MiaGenError(
                f"model.guidance_scale={guidance_scale} mixes in the unconditional prediction (the embedding of the "
                "empty caption), but this text model has no text encoder to make it; load the whole pipeline "
                "(tokenizer/, text_encoder/) or set model.guidance_scale=1."
            )
        if kind == "class" and null_class is None:
            raise MiaGenError(
                f"model.guidance_scale={guidance_scale} mixes in the unconditional prediction, but this "
                "class-conditional model has no null class (it was not trained with label dropout, e.g. a "
                "UNet2DModel with num_class_embeds); set model.guidance_scale=1 (the conditional prediction)."
            )


def _conditioning_of(network: nn.Module) -> tuple[str, int | None, int | None]:
    """(condition_kind, num_classes, null_class) of a diffusers network, read from its config."""
    config = network.config
    if config.get("addition_embed_type") is not None:
        raise MiaGenError(
            f"the UNet's addition_embed_type={config.get('addition_embed_type')!r} (SDXL-style extra conditioning) "
            "is not built; mia-gen attacks Stable Diffusion 1.x / 2.x-style UNets (text via cross-attention)."
        )
    if config.get("cross_attention_dim") is not None:  # UNet2DConditionModel: text through cross-attention
        if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
            raise MiaGenError("a UNet conditioned on both text and class labels is not supported; mia-gen "
                              "attacks text-conditioned or class-conditional models.")
        return "text", None, None
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


def _load_unet(location: str | Path, subfolder: str | None, local_only: bool, class_name: str = "UNet2DModel"):
    """The pipeline's denoising network (`class_name`, one of NETWORK_CLASSES), float32 on CPU."""
    import diffusers

    if class_name not in NETWORK_CLASSES:
        raise MiaGenError(f"the pipeline's denoising network is a {class_name}, which mia-gen does not attack; "
                          f"supported: {', '.join(NETWORK_CLASSES)}.")
    try:
        return getattr(diffusers, class_name).from_pretrained(
            str(location), subfolder=subfolder, local_files_only=local_only, use_safetensors=True,
            low_cpu_mem_usage=False)
    except (OSError, EnvironmentError, ValueError) as err:
        where = f"{location}/{subfolder}" if subfolder else str(location)
        raise MissingAssetError(
            f"could not load a {class_name} from {where} ({str(err).splitlines()[0]}); it needs config.json and "
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

    model_cfg keys (see configs/model/diffusers.yaml): `format` (`pytorch_ddpm`: a ckpt.pt of
    w86763777/pytorch-ddpm, `mia_gen.models.pytorch_ddpm`, with `flags`), `prediction_type` (null = from the checkpoint),
    `use_ema` (prefer `unet_ema/` when present), `allow_download` (hub ids; off by default),
    `betas` (noise schedule for a bare UNet directory or an own network), `network` (`_target_` +
    kwargs of an own epsilon network), `weights` (its safetensors state dict), `guidance_scale`
    (conditional models; default 1 = the conditional prediction), `lora` (a LoRA adapter merged into
    the network; null = none) and `dtype` (auto | float32 | float16 | bfloat16: auto = float32 on CPU,
    the weights' own dtype on CUDA; CPU runs in float32 only).

    model_dir_or_id: a diffusers pipeline directory (`model_index.json`, `scheduler/` and `unet/`
    [`unet_ema/`] or `transformer/`; pixel `DDPMPipeline`s, unconditional or class-conditional;
    `StableDiffusionPipeline`s with `vae/`, `tokenizer/`, `text_encoder/`; `DiTPipeline`s with `vae/`),
    a bare UNet directory (`config.json` + safetensors), a hub id (with `allow_download=true` or already
    in the local cache), or, for an own network, the directory `model.weights` is relative to.
    """
    cfg = _plain(model_cfg)
    prediction_type = cfg.get("prediction_type")
    device = torch.device(device)
    if cfg.get("format") == "pytorch_ddpm":  # SecMI's / PIA's released checkpoints (models/pytorch_ddpm.py)
        from mia_gen.models.pytorch_ddpm import load_pytorch_ddpm_denoiser

        denoiser = load_pytorch_ddpm_denoiser(cfg, model_dir_or_id)
        return denoiser.to(device=device, dtype=resolve_dtype(cfg.get("dtype"), device, torch.float32)).eval()
    if cfg.get("network"):
        denoiser = _load_own_network(cfg, model_dir_or_id, prediction_type)
        dtype = resolve_dtype(cfg.get("dtype"), device, torch.float32)
    else:
        if not model_dir_or_id:
            raise MiaGenError("no diffusion model given; set model.checkpoint=<pipeline directory or hub id>.")
        resolve_dtype(cfg.get("dtype"), device, torch.float32)  # a wrong setting fails before any loading
        denoiser, weights_dtype = _load_diffusers(cfg, model_dir_or_id, prediction_type)
        dtype = resolve_dtype(cfg.get("dtype"), device, weights_dtype)
    return denoiser.to(device=device, dtype=dtype).eval()


def resolve_dtype(name: Any, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """`model.dtype` (auto | float32 | float16 | bfloat16) -> the dtype the model runs in on `device`."""
    name = "auto" if name is None else str(name)
    if name != "auto" and name not in DTYPES:
        raise MiaGenError(f"model.dtype={name} is not supported; use auto, {', '.join(DTYPES)}.")
    if device.type == "cpu":
        if name not in ("auto", "float32"):
            raise MiaGenError(f"model.dtype={name} on the CPU: mia-gen runs CPU models in float32 (half precision "
                              "is slow there and changes the scores); set model.dtype=auto (or float32), or "
                              "device=cuda.")
        return torch.float32
    return DTYPES[name] if name != "auto" else weights_dtype


def _load_diffusers(cfg: dict, location: str | os.PathLike, prediction_type: str | None
                    ) -> tuple[Denoiser, torch.dtype]:
    """The Denoiser (float32, CPU) and the dtype its network's weights were saved in."""
    allow_download = bool(cfg.get("allow_download", False))
    use_ema = bool(cfg.get("use_ema", True))
    guidance_scale = cfg.get("guidance_scale", 1.0)
    lora = cfg.get("lora")
    path = _resolve_path(location)
    if path.is_dir():
        _warn_if_incomplete(path)
        if (path / PIPELINE_INDEX).is_file():
            return _load_pipeline_dir(path, cfg, prediction_type)
        if lora:
            raise MiaGenError(f"model.lora needs the base's whole pipeline directory (with {PIPELINE_INDEX}); "
                              f"{path} is not one.")
        if (path / "config.json").is_file():
            if not cfg.get("betas"):
                raise MiaGenError(
                    f"{path} is a bare UNet directory without a scheduler; give its noise schedule in model.betas "
                    "(num_train_timesteps, beta_schedule, beta_start, beta_end) or point model.checkpoint at the "
                    "whole pipeline directory (with model_index.json and scheduler/)."
                )
            scheduler = scheduler_from_betas(cfg["betas"], prediction_type)
            return Denoiser.from_unet(_load_unet(path, None, True), scheduler, prediction_type,
                                      guidance_scale=guidance_scale), _weights_dtype(path)
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
    snapshot = _hub_latent_pipeline(hub_id, local_only)
    if snapshot is not None:
        return _load_pipeline_dir(snapshot, cfg, prediction_type)
    if lora:
        raise MiaGenError(f"model.lora needs the base's whole pipeline ({PIPELINE_INDEX}); download {hub_id} "
                          "to a directory and set model.checkpoint=<dir>.")
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
    return Denoiser.from_unet(unet, scheduler, prediction_type, guidance_scale=guidance_scale), \
        next(unet.parameters()).dtype


def _load_pipeline_dir(path: Path, cfg: dict, prediction_type: str | None) -> tuple[Denoiser, torch.dtype]:
    """A pipeline directory: pixel (unet/), Stable Diffusion (unet/, vae/, tokenizer/, text_encoder/) or DiT
    (transformer/, vae/); each component loaded from its subfolder, local files only."""
    components = _read_index(path)
    present = {name for name, value in components.items()
               if isinstance(value, list) and len(value) == 2 and value[1] is not None}
    kind = components.get("_class_name", "diffusers pipeline")
    if "text_encoder_2" in present:
        raise MiaGenError(f"{path} is a {kind} with a second text encoder (text_encoder_2, SDXL): not built yet; "
                          "mia-gen attacks Stable Diffusion 1.x / 2.x, DiT and pixel pipelines.")
    if "transformer" in present:
        subfolder = "transformer"
    else:
        use_ema = bool(cfg.get("use_ema", True))
        subfolder = "unet_ema" if use_ema and (path / "unet_ema" / "config.json").is_file() else "unet"
    if not (path / subfolder).is_dir():
        raise MissingAssetError(
            f"{path} has {PIPELINE_INDEX} but no {subfolder}/ directory; the pipeline is incomplete. "
            "Save it again with `pipeline.save_pretrained(dir)` (or retrain with `mia-gen-train`)."
        )
    network_class = components.get("transformer" if subfolder == "transformer" else "unet", [None, "UNet2DModel"])[1]
    network = _load_unet(path, subfolder, True, network_class)
    vae_class = components.get("vae", [None, "AutoencoderKL"])[1] or "AutoencoderKL"
    latent = LatentEncoder(load_vae(path, True, vae_class)) if "vae" in present or (path / "vae").is_dir() else None
    text = None
    if network.config.get("cross_attention_dim") is not None:  # text-conditioned: the pipeline's own encoder
        text_class = components.get("text_encoder", [None, "CLIPTextModel"])[1] or "CLIPTextModel"
        tokenizer_class = components.get("tokenizer", [None, "CLIPTokenizer"])[1] or "CLIPTokenizer"
        text = load_text_encoder(path, True, text_class, tokenizer_class)
    if cfg.get("lora"):  # into the UNet, and into the text encoder when the adapter changes it too
        apply_lora(network, cfg["lora"], path, text.text_encoder if text is not None else None)
    if latent is None and network.config.get("cross_attention_dim") is not None:
        log.warning("%s: a text-conditioned network without a vae/: attacking it in pixel space.", path)
    log.info("diffusion model: %s/%s (%s)", path, subfolder, kind)
    denoiser = Denoiser.from_unet(network, _load_scheduler(path, True), prediction_type,
                                  guidance_scale=cfg.get("guidance_scale", 1.0), latent=latent, text=text)
    return denoiser, _weights_dtype(path / subfolder)


def _read_index(path: Path) -> dict:
    try:
        return json.loads((path / PIPELINE_INDEX).read_text())
    except json.JSONDecodeError as err:
        raise CorruptStoreError(f"{path / PIPELINE_INDEX} is not valid JSON ({err}); save the pipeline again "
                                "with `pipeline.save_pretrained(dir)`.") from err


def _weights_dtype(folder: Path) -> torch.dtype:
    """The floating dtype a network's safetensors weights were saved in (float32 when unknown)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype in ("F16", "BF16", "F32"):
                    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return torch.float32


# What a latent pipeline needs from the hub: configs, tokenizer files, the main safetensors weights (no
# variants, no pickles, no safety checker).
_HUB_PATTERNS = ["model_index.json", "scheduler/*.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "tokenizer/*", "text_encoder/config.json",
                 "text_encoder/model.safetensors"]


def _hub_latent_pipeline(hub_id: str, local_only: bool) -> Path | None:
    """The local snapshot of a hub id that names a latent pipeline (vae in its model_index.json), or None."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        index = json.loads(Path(hf_hub_download(hub_id, PIPELINE_INDEX, local_files_only=local_only)).read_text())
    except Exception:  # not cached / offline / no such repo: the pixel path below says what is missing
        return None
    if not isinstance(index.get("vae"), list) or index["vae"][1] is None:
        return None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS, local_files_only=local_only))
    except (OSError, ValueError) as err:
        raise MissingAssetError(
            f"could not get the pipeline {hub_id} ({str(err).splitlines()[0]}); download it "
            f"(`huggingface-cli download {hub_id} --local-dir <dir>`) and set model.checkpoint=<dir>."
        ) from err


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
