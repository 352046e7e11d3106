"""The GAN interface every generator / discriminator in `models/` keeps.

Attacks, the sampler and the trainer rely only on what is defined here:

- a generator has `latent_dim`, `resolution`, `channels`, `forward(z) -> images` in [-1, 1]
  and `sample_latent(n, generator)`;
- a discriminator (or WGAN critic) has `resolution`, `channels` and `forward(x) -> (N,)`
  (higher = "real");
- both carry their config (`module.config`, `_target_` plus constructor kwargs) so that
  `mia_gen.models.checkpoint` can rebuild them.
"""

from typing import Any

import torch
from torch import nn

from mia_gen.errors import MiaGenError

SUPPORTED_RESOLUTIONS = (16, 32, 64)
SUPPORTED_CHANNELS = (1, 3)
# Every architecture starts from (or ends at) a 4x4 feature map and doubles / halves it.
BASE_FEATURE_SIZE = 4


def num_scale_stages(resolution: int) -> int:
    """Number of 2x up- (generator) or down- (discriminator) sampling stages between 4 px and `resolution`."""
    return {16: 2, 32: 3, 64: 4}[resolution]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(value: Any, name: str, owner: str) -> int:
    if not _is_int(value) or value < 1:
        raise MiaGenError(f"{owner}: {name} must be a positive integer, got {value!r}; fix it in the model config.")
    return value


def check_architecture(owner: str, resolution: Any, channels: Any, base_channels: Any) -> None:
    """Raise `MiaGenError` unless the architecture is one this package builds."""
    if not _is_int(resolution) or resolution not in SUPPORTED_RESOLUTIONS:
        raise MiaGenError(
            f"{owner}: resolution={resolution!r} is not supported; allowed values are "
            f"{list(SUPPORTED_RESOLUTIONS)}. Set data.resolution (which the model config follows) to one of them."
        )
    if not _is_int(channels) or channels not in SUPPORTED_CHANNELS:
        raise MiaGenError(
            f"{owner}: channels={channels!r} is not supported; allowed values are {list(SUPPORTED_CHANNELS)} "
            "(grayscale or RGB). Set data.channels to one of them."
        )
    _check_positive_int(base_channels, "base_channels", owner)


class ConfiguredModule(nn.Module):
    """An `nn.Module` that remembers the kwargs it was built with (cf. diffusers `register_to_config`)."""

    def _register_config(self, **kwargs: Any) -> None:
        self._config_kwargs = dict(kwargs)

    @property
    def config(self) -> dict:
        """`{"_target_": "<module>.<Class>", **constructor_kwargs}`: enough to rebuild this module."""
        cls = type(self)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **self._config_kwargs}


class Generator(ConfiguredModule):
    """Maps latent codes `z` of shape `(N, latent_dim)` to images `(N, channels, resolution, resolution)` in [-1, 1]."""

    latent_dim: int
    resolution: int
    channels: int

    def __init__(self, latent_dim: int, resolution: int, channels: int, base_channels: int) -> None:
        super().__init__()
        owner = type(self).__name__
        check_architecture(owner, resolution, channels, base_channels)
        _check_positive_int(latent_dim, "latent_dim", owner)
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.channels = channels
        self._register_config(
            latent_dim=latent_dim, resolution=resolution, channels=channels, base_channels=base_channels
        )

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latent codes, `(n, latent_dim)` float32 on CPU (move them to the model's device)."""
        return torch.randn(n, self.latent_dim, generator=generator)

    def check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise MiaGenError(
                f"{type(self).__name__} expects latent codes of shape (N, {self.latent_dim}), got "
                f"{tuple(z.shape)}; draw them with generator.sample_latent(n)."
            )


class Discriminator(ConfiguredModule):
    """Maps images `(N, channels, resolution, resolution)` in [-1, 1] to a raw score `(N,)`, higher = "real"."""

    resolution: int
    channels: int

    def __init__(self, resolution: int, channels: int, base_channels: int) -> None:
        super().__init__()
        check_architecture(type(self).__name__, resolution, channels, base_channels)
        self.resolution = resolution
        self.channels = channels
        self._register_config(resolution=resolution, channels=channels, base_channels=base_channels)

    def check_images(self, x: torch.Tensor) -> None:
        expected = (self.channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise MiaGenError(
                f"{type(self).__name__} expects images of shape (N, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}; make data.channels / data.resolution match the model's "
                "channels / resolution."
            )
