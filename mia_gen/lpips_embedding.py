"""LPIPS v0.1 as a squared L2 distance between explicit embeddings, so LPIPS kNN can use faiss.

LPIPS(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (n_l(x) - n_l(y))_{c,h,w}^2, with n_l the channel-
normalised features of layer l and w_{l,c} >= 0 (Zhang et al., CVPR'18, eq. 1). Hence
LPIPS(x, y) = ||phi(x) - phi(y)||^2 with phi(x) = concat_l sqrt(w_l) * n_l(x) / sqrt(H_l W_l).

Backbone weights come from torchvision's files in the torch hub cache and are never downloaded
here; the linear weights ship inside the `lpips` package.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from mia_gen.device import resolve_device
from mia_gen.errors import MiaGenError, MissingAssetError

logger = logging.getLogger(__name__)

NETS = ("alex", "vgg", "squeeze")
# Outside this the images are not in [-1, 1] (e.g. [0, 255]); small excess is resampling overshoot.
_RANGE_TOLERANCE = 1e-2
_RANDOM_BACKBONE_SEED = 0


def _torchvision_weights(net: str):
    """The torchvision weights enum entry that `lpips` loads for `net` (pretrained=True)."""
    from torchvision import models

    return {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]


def backbone_checkpoint(net: str) -> Path:
    """Where torchvision keeps `net`'s ImageNet weights: `torch.hub.get_dir()/checkpoints/<file>`."""
    _check_net(net)
    filename = os.path.basename(_torchvision_weights(net).url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _check_net(net: str) -> None:
    if net not in NETS:
        raise MiaGenError(f"LPIPS net={net!r} is unknown; use one of {NETS} ('alex' is the usual one).")


def _missing_backbone_error(net: str, checkpoint: Path) -> MissingAssetError:
    url = _torchvision_weights(net).url
    return MissingAssetError(
        f"LPIPS ({net}) needs the ImageNet backbone weights {checkpoint.name}, which are not in "
        f"{checkpoint.parent}. On a machine with internet access download {url} (or run "
        f"`python -c \"import torchvision; torchvision.models.{_torchvision_weights(net).__class__.__name__}"
        f".IMAGENET1K_V1.get_state_dict()\"` there) and copy the file into {checkpoint.parent} "
        "(set TORCH_HOME to choose another cache directory). For tests only, "
        "`attack.lpips.allow_random_backbone=true` uses a random backbone instead; the distances "
        "are then NOT LPIPS."
    )


def _load_backbone(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy torchvision `features.<i>.*` weights into lpips' `slice<k>.<i>.*` modules."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    slice_of = {
        child: slice_name
        for slice_name, block in model.net.named_children()
        for child, _ in block.named_children()
    }
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in slice_of:
            mapped[".".join([slice_of[parts[1]], *parts[1:]])] = value
    model.net.load_state_dict(mapped, strict=True)


@lru_cache(maxsize=4)
def _cached_lpips(net: str, allow_random_backbone: bool, device: str, checkpoint: str) -> tuple[torch.nn.Module, str]:
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # The backbone is always built randomly (so lpips never reaches torchvision's downloader)
        # and seeded, so a random backbone is reproducible; real weights are loaded below.
        torch.manual_seed(_RANDOM_BACKBONE_SEED)
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if Path(checkpoint).exists():
        _load_backbone(model, Path(checkpoint))
        backbone = "pretrained"
    else:
        backbone = "random"
    return model.eval().requires_grad_(False).to(device), backbone


def build_lpips(net: str = "alex", allow_random_backbone: bool = False, device: str = "cpu") -> tuple[torch.nn.Module, str]:
    """The real `lpips.LPIPS` v0.1 model, offline; returns `(model, "pretrained" | "random")`.

    MissingAssetError when the torchvision backbone file is absent, unless
    `allow_random_backbone` (tests only), which then uses a seeded random backbone.
    """
    _check_net(net)
    checkpoint = backbone_checkpoint(net)
    if not checkpoint.exists() and not allow_random_backbone:
        raise _missing_backbone_error(net, checkpoint)
    model, backbone = _cached_lpips(net, bool(allow_random_backbone), str(resolve_device(str(device))), str(checkpoint))
    if backbone == "random":
        message = (
            f"LPIPS ({net}) is using a RANDOM backbone because {checkpoint} is missing and "
            "allow_random_backbone=true: these distances are NOT LPIPS. Use this for tests only."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return model, backbone


def lpips_preprocess(x: torch.Tensor, resize: int | None) -> torch.Tensor:
    """Images `(N, 1|3, H, W)` in [-1, 1] -> `(N, 3, resize, resize)` for the LPIPS network.

    1-channel images are repeated to 3 channels; images are resized (bilinear,
    align_corners=False) to `resize` px since small digits are too small for AlexNet.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MiaGenError(
            f"LPIPS needs images of shape (N, C, H, W) with C = 1 or 3, got {got}; "
            "LPIPS is for images: use the L2 distance for tabular data."
        )
    x = x.float()
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise MiaGenError(
                f"LPIPS expects images in [-1, 1] but got values in [{lo:.3g}, {hi:.3g}]; map "
                "[0, 1] images with 2x - 1 and [0, 255] images with x / 127.5 - 1."
            )
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize is not None and tuple(x.shape[-2:]) != (resize, resize):
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    return x


def _check_resize(resize: int | None) -> None:
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise MiaGenError(f"resize must be a positive number of pixels or None, got {resize!r}.")


def _run_backbone(model: torch.nn.Module, x: torch.Tensor, net: str):
    try:
        return model.net(model.scaling_layer(x))
    except RuntimeError as exc:
        if "too small" not in str(exc) and "size" not in str(exc):
            raise
        raise MiaGenError(
            f"Images of {tuple(x.shape[-2:])} px are too small for the LPIPS {net} network ({exc}); "
            "set attack.lpips.resize to 64 or more."
        ) from exc


class LPIPSEmbedding(torch.nn.Module):
    """phi(x) with LPIPS(x, y) = ||phi(x) - phi(y)||^2 exactly (up to float rounding).

    forward(x (`torch.Tensor` of shape `(N, C, H, W)`, C = 1 or 3, in [-1, 1])) -> `(N, D)`
    float32 on `device`, computed in batches of `batch_size`. Channels with LPIPS weight 0 are
    dropped (they contribute nothing). `backbone` is "pretrained" or "random".
    """

    def __init__(
        self,
        net: str = "alex",
        resize: int | None = 64,
        allow_random_backbone: bool = False,
        device: str = "cpu",
        batch_size: int = 256,
    ):
        super().__init__()
        _check_resize(resize)
        self.net_name, self.resize, self.batch_size = net, resize, int(batch_size)
        self.device = resolve_device(str(device))
        model, self.backbone = build_lpips(net, allow_random_backbone, str(self.device))
        self._model = model
        self._kept_channels: list[torch.Tensor] = []
        self._channel_scales: list[torch.Tensor] = []
        for lin in model.lins:
            weight = lin.model[-1].weight.detach().flatten()
            if (weight < 0).any():
                raise MiaGenError(
                    f"The LPIPS linear weights for {net} have negative entries, so LPIPS is not a "
                    "squared distance in an embedding; use the official v0.1 weights from the lpips package."
                )
            kept = torch.nonzero(weight > 0).flatten()
            self._kept_channels.append(kept.to(self.device))
            self._channel_scales.append(weight[kept].sqrt().to(self.device))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with autograd (the backbone's weights stay frozen): for objectives such as
        latent inversion, whose gradient flows through LPIPS into the generator's input."""
        import lpips

        out = []
        for s in range(0, max(len(x), 1), self.batch_size):
            batch = lpips_preprocess(x[s : s + self.batch_size], self.resize).to(self.device)
            layers = _run_backbone(self._model, batch, self.net_name)
            parts = []
            for feats, kept, scale in zip(layers, self._kept_channels, self._channel_scales):
                normed = lpips.normalize_tensor(feats)[:, kept]
                height, width = normed.shape[-2:]
                parts.append((normed * (scale / math.sqrt(height * width))[None, :, None, None]).flatten(1))
            out.append(torch.cat(parts, 1))
        return torch.cat(out)


@torch.no_grad()
def lpips_pairwise(
    x: torch.Tensor,
    y: torch.Tensor,
    net: str = "alex",
    resize: int | None = 64,
    allow_random_backbone: bool = False,
    device: str = "cpu",
) -> torch.Tensor:
    """LPIPS(x_i, y_i) from the real `lpips.LPIPS`, with the embedding's preprocessing.

    x, y (`torch.Tensor` of shape `(N, C, H, W)` or `(1, C, H, W)` broadcast, in [-1, 1])
    -> `(N,)` float32 on CPU. The slow reference that `LPIPSEmbedding` must reproduce.
    """
    _check_resize(resize)
    model, _ = build_lpips(net, allow_random_backbone, device)
    x, y = lpips_preprocess(x, resize), lpips_preprocess(y, resize)
    if len(x) != len(y):
        if len(x) == 1:
            x = x.expand(len(y), -1, -1, -1)
        elif len(y) == 1:
            y = y.expand(len(x), -1, -1, -1)
        else:
            raise MiaGenError(
                f"lpips_pairwise compares x[i] with y[i]: got {len(x)} and {len(y)} images; pass "
                "equal counts or a single image on one side."
            )
    target = resolve_device(str(device))
    return model(x.to(target), y.to(target)).flatten().float().cpu()
