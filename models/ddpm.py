"""DDPM (Ho et al., 2020): a diffusers `UNet2DModel` + `DDPMScheduler`, built from a model config, and its loss.

The model config (configs/model/ddpm.yaml) holds `unet` (UNet2DModel kwargs; `sample_size`,
`in_channels`, `out_channels` follow `data.resolution` / `data.channels`), `betas` (the noise
schedule) and `prediction_type` ("epsilon" or "v_prediction").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mia_gen.errors import MiaGenError
from mia_gen.models.denoiser import scheduler_from_betas

SUPPORTED_RESOLUTIONS = (16, 32, 64)
SUPPORTED_CHANNELS = (1, 3)
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_unet(unet_cfg: Any):
    """A freshly initialised `UNet2DModel` from `model.unet` (uses the global torch RNG for its init)."""
    from diffusers import UNet2DModel

    kwargs = _plain(unet_cfg)
    size, c_in, c_out = kwargs.get("sample_size"), kwargs.get("in_channels"), kwargs.get("out_channels")
    if size not in SUPPORTED_RESOLUTIONS:
        raise MiaGenError(
            f"model.unet.sample_size={size!r} is not supported; use one of {list(SUPPORTED_RESOLUTIONS)} "
            "(it follows data.resolution)."
        )
    if c_in not in SUPPORTED_CHANNELS or c_out != c_in:
        raise MiaGenError(
            f"model.unet needs in_channels = out_channels in {list(SUPPORTED_CHANNELS)}, got {c_in!r} / {c_out!r}; "
            "both follow data.channels."
        )
    blocks = kwargs.get("block_out_channels") or []
    for key in ("down_block_types", "up_block_types"):
        if len(kwargs.get(key) or []) != len(blocks):
            raise MiaGenError(
                f"model.unet.{key} has {len(kwargs.get(key) or [])} entries but block_out_channels has "
                f"{len(blocks)}; give one block type per resolution level."
            )
    if not blocks or size % 2 ** (len(blocks) - 1):
        raise MiaGenError(
            f"model.unet: {len(blocks)} resolution levels do not fit {size} px (each level halves it); "
            "use fewer block_out_channels."
        )
    groups = kwargs.get("norm_num_groups", 32)
    if any(ch % groups for ch in blocks):
        raise MiaGenError(
            f"model.unet.norm_num_groups={groups} does not divide every block_out_channels {blocks}; lower it."
        )
    try:
        return UNet2DModel(**kwargs)
    except (TypeError, ValueError) as err:
        raise MiaGenError(f"model.unet could not build a UNet2DModel ({err}); fix the kwargs in the model config.") from err


def build_scheduler(model_cfg: Any):
    """The `DDPMScheduler` of `model.betas` + `model.prediction_type` (training accepts epsilon / v_prediction)."""
    cfg = _plain(model_cfg)
    prediction_type = cfg.get("prediction_type") or "epsilon"
    if prediction_type not in TRAINABLE_PREDICTION_TYPES:
        raise MiaGenError(
            f"model.prediction_type={prediction_type!r} cannot be trained here; use one of "
            f"{list(TRAINABLE_PREDICTION_TYPES)}."
        )
    return scheduler_from_betas(cfg.get("betas"), prediction_type)


def diffusion_loss(unet, scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   per_sample_sum: bool = False, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the network's prediction (Ho et al., 2020, eq. 14; v-target: Salimans & Ho, 2022).

    x0, noise: `(N, C, H, W)` (x0 in [-1, 1]); t: `(N,)` int64 in [0, T). With `per_sample_sum`, the
    sum over samples of each sample's mean error (DP-SGD clips each sample's gradient of its own term).
    encoder_hidden_states: a text-conditioned UNet's caption embeddings `(N, L, D)` (x0 is then a latent).
    """
    x_t = scheduler.add_noise(x0, noise, t)
    if encoder_hidden_states is None:
        prediction = unet(x_t, t).sample
    else:
        prediction = unet(x_t, t, encoder_hidden_states=encoder_hidden_states).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    if per_sample_sum:
        return F.mse_loss(prediction, target, reduction="none").flatten(1).mean(1).sum()
    return F.mse_loss(prediction, target)
