"""The DDPM of `w86763777/pytorch-ddpm` (the code SecMI's and PIA's released CIFAR-10 / CIFAR-100 / STL10-U
models were trained with), written for mia-gen from that repository's description (`model.py` at 9cc37cd,
`diffusion.py` at 7abb4c0): Ho et al.'s UNet `UNet(T, ch, ch_mult, attn, num_res_blocks, dropout)` with its
module names, so that its `ckpt.pt` loads as saved, and its linear noise schedule.

Layout (what the state dict's keys name): `time_embedding.timembedding` = [frozen sinusoidal table (T, ch),
Linear(ch, 4ch), Swish, Linear(4ch, 4ch)]; `head` Conv3x3(3, ch); `downblocks`: per level i, `num_res_blocks`
ResBlocks to ch * ch_mult[i] (self-attention at the levels in `attn`), then a stride-2 Conv3x3 `DownSample`
except after the last level; `middleblocks`: ResBlock with attention, ResBlock without; `upblocks`: per level
from the last, `num_res_blocks + 1` ResBlocks on the concatenated skip, then a nearest x2 `UpSample` + Conv3x3
except at level 0; `tail` = [GroupNorm(32), Swish, Conv3x3(ch, 3)]. A ResBlock: `block1` = [GroupNorm(32),
Swish, Conv3x3], plus `temb_proj` = [Swish, Linear(4ch, out)] of the time embedding, `block2` = [GroupNorm(32),
Swish, Dropout, Conv3x3], plus `shortcut` (Conv1x1 when the width changes), then `attn`: x + proj(softmax(q k /
sqrt(C)) v) over all positions, one head, q k v from a GroupNorm(32) of x. The sinusoidal table: position p,
frequency f_i = exp(-2i / ch * log 10000), entries interleaved (sin, cos) per frequency.

`ckpt.pt` holds `net_model` and `ema_model` state dicts (keys sometimes prefixed `module.` by DataParallel),
the optimiser, scheduler and step; `flagfile.txt` beside it (absl flags, one `--name=value` per line,
`--ch_mult` repeated) holds the hyper-parameters. It is read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mia_gen.errors import MiaGenError, MissingAssetError

CHECKPOINT_NAME = "ckpt.pt"
FLAGFILE_NAME = "flagfile.txt"
# The settings the UNet and its schedule take, with the values of the released CIFAR-10 model
# (pytorch-ddpm's config/CIFAR10.txt, SecMI's `get_model`).
DEFAULTS = {"T": 1000, "ch": 128, "ch_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 2, "dropout": 0.1,
            "beta_1": 1.0e-4, "beta_T": 0.02, "img_size": 32}
_LISTS = ("ch_mult", "attn")


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def sinusoidal_table(T: int, dim: int) -> torch.Tensor:
    """(T, dim): row p = [sin(p f_0), cos(p f_0), sin(p f_1), cos(p f_1), ...], f_i = exp(-2i/dim log 10000)."""
    if dim % 2:
        raise MiaGenError(f"pytorch_ddpm: ch must be even (the time embedding pairs sin and cos), got {dim}.")
    frequencies = torch.exp(-torch.arange(0, dim, 2) / dim * math.log(10000))
    angles = torch.arange(T).float()[:, None] * frequencies[None, :]
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(T, dim)


class TimeEmbedding(nn.Module):
    def __init__(self, T: int, ch: int, dim: int):
        super().__init__()
        self.timembedding = nn.Sequential(nn.Embedding.from_pretrained(sinusoidal_table(T, ch)),
                                          nn.Linear(ch, dim), Swish(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class DownSample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpSample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, channels)
        self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.group_norm(x)
        q = self.proj_q(normed).permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = self.proj_k(normed).reshape(b, c, h * w)
        v = self.proj_v(normed).permute(0, 2, 3, 1).reshape(b, h * w, c)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        out = torch.bmm(weights, v).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj(out)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, in_ch), Swish(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(nn.GroupNorm(32, out_ch), Swish(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class UNet(nn.Module):
    """pytorch-ddpm's UNet: `forward(x_t (N, 3, H, W), t (N,) int) -> eps (N, 3, H, W)`."""

    def __init__(self, T: int, ch: int, ch_mult: list[int], attn: list[int], num_res_blocks: int, dropout: float):
        super().__init__()
        if any(not 0 <= i < len(ch_mult) for i in attn):
            raise MiaGenError(f"pytorch_ddpm: attn levels {list(attn)} must index ch_mult {list(ch_mult)}.")
        tdim = ch * 4
        self.T = int(T)
        self.time_embedding = TimeEmbedding(T, ch, tdim)
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        self.downblocks = nn.ModuleList()
        skips, width = [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(width, ch * mult, tdim, dropout, attn=level in attn))
                width = ch * mult
                skips.append(width)
            if level != len(ch_mult) - 1:
                self.downblocks.append(DownSample(width))
                skips.append(width)
        self.middleblocks = nn.ModuleList([ResBlock(width, width, tdim, dropout, attn=True),
                                           ResBlock(width, width, tdim, dropout, attn=False)])
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(skips.pop() + width, ch * mult, tdim, dropout, attn=level in attn))
                width = ch * mult
            if level != 0:
                self.upblocks.append(UpSample(width))
        self.tail = nn.Sequential(nn.GroupNorm(32, width), Swish(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(len(x))
        temb = self.time_embedding(t)
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)


def linear_alphas_cumprod(T: int, beta_1: float, beta_T: float) -> torch.Tensor:
    """pytorch-ddpm's schedule as its `diffusion.py` computes it: betas = linspace(beta_1, beta_T, T) in float32,
    then float64; alpha_bar = cumprod(1 - betas) in float64."""
    betas = torch.linspace(float(beta_1), float(beta_T), int(T), dtype=torch.float32).double()
    return torch.cumprod(1.0 - betas, dim=0)


def checkpoint_file(location: str | Path) -> Path:
    """`ckpt.pt` itself, or the directory (pytorch-ddpm's logdir) holding it."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MissingAssetError(
            f"model.checkpoint: no pytorch-ddpm checkpoint at {path}; give the released ckpt.pt (or the directory "
            "holding it and its flagfile.txt), e.g. from SecMI's or PIA's model links.")
    return path


def read_flagfile(path: Path) -> dict[str, Any]:
    """The settings of DEFAULTS that an absl flagfile sets (`--name=value`, `--ch_mult` repeated); {} if absent."""
    if not path.is_file():
        return {}
    found: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("--") or "=" not in line:
            continue
        name, value = line[2:].split("=", 1)
        if name not in DEFAULTS:
            continue
        try:
            number = float(value) if name in ("dropout", "beta_1", "beta_T") else int(value)
        except ValueError as error:
            raise MiaGenError(f"{path}: --{name}={value} is not a number.") from error
        if name in _LISTS:
            found.setdefault(name, []).append(number)
        else:
            found[name] = number
    return found


def hyperparameters(location: str | Path, given: dict[str, Any] | None) -> dict[str, Any]:
    """The UNet / schedule settings: the flagfile beside the checkpoint when there is one, else `given`
    (`model.flags`), else the released CIFAR-10 model's. A setting given that the flagfile contradicts is
    refused: the flagfile is what the checkpoint was trained with."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise MiaGenError(f"model.flags has unknown settings {unknown}; they are {sorted(DEFAULTS)}.")
    flagfile = checkpoint_file(location).parent / FLAGFILE_NAME
    read = read_flagfile(flagfile)
    for name, value in given.items():
        if name in read and _plain_value(read[name]) != _plain_value(value):
            raise MiaGenError(f"model.flags.{name}={value} but {flagfile} says {read[name]}, and the flagfile is what "
                              f"the checkpoint was trained with; drop model.flags.{name}.")
    return {**DEFAULTS, **given, **read}


def _plain_value(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def load_state_dict(location: str | Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """The `ema_model` (or `net_model`) state dict of a pytorch-ddpm `ckpt.pt`, `module.` prefixes removed."""
    path = checkpoint_file(location)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled code; a damaged file fails to unpickle
        raise MiaGenError(f"{path} cannot be read with torch.load(weights_only=True) ({str(error).splitlines()[0]}); "
                          "mia-gen reads only tensors and plain values from a checkpoint, never pickled code. "
                          "Is it pytorch-ddpm's ckpt.pt, undamaged?") from error
    key = "ema_model" if use_ema else "net_model"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(key), dict):
        present = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        hint = (" To attack the raw weights, set model.use_ema=false." if use_ema and isinstance(checkpoint, dict)
                and isinstance(checkpoint.get("net_model"), dict) else "")
        raise MiaGenError(f"{path} has no '{key}' state dict (it holds {present}); a pytorch-ddpm checkpoint has "
                          f"net_model and ema_model.{hint}")
    return {(name[len("module."):] if name.startswith("module.") else name): tensor
            for name, tensor in checkpoint[key].items()}


def load_network(location: str | Path, flags: dict[str, Any] | None, use_ema: bool) -> tuple[UNet, dict[str, Any]]:
    """The UNet of a pytorch-ddpm checkpoint with its weights, and the settings it was built with.

    Raises:
        MiaGenError: a key missing, extra or of another shape (named) than the settings' UNet has.
    """
    settings = hyperparameters(location, flags)
    with torch.random.fork_rng(devices=[]):
        network = UNet(settings["T"], settings["ch"], list(settings["ch_mult"]), list(settings["attn"]),
                       settings["num_res_blocks"], settings["dropout"])
    state = load_state_dict(location, use_ema)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (the UNet has {tuple(expected[k].shape)})"
                 for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or misshapen:
        problems = "; ".join(part for part in (
            f"missing {missing[:5]}" if missing else "", f"not in the UNet {extra[:5]}" if extra else "",
            f"of another shape {misshapen[:3]}" if misshapen else "") if part)
        raise MiaGenError(f"{checkpoint_file(location)} does not fit UNet(T={settings['T']}, ch={settings['ch']}, "
                          f"ch_mult={list(settings['ch_mult'])}, attn={list(settings['attn'])}, num_res_blocks="
                          f"{settings['num_res_blocks']}): {problems}. Check model.flags (or the flagfile.txt beside "
                          "the checkpoint).")
    network.load_state_dict(state)
    return network.eval(), settings


def load_pytorch_ddpm_denoiser(cfg: dict, location: str | Path | None):
    """The `Denoiser` of a pytorch-ddpm checkpoint (`model=pytorch_ddpm`): EMA weights unless `use_ema=false`,
    the settings from the flagfile or `model.flags`, the linear schedule from beta_1, beta_T, T."""
    from mia_gen.models.denoiser import Denoiser

    if not location:
        raise MiaGenError("model=pytorch_ddpm attacks a released checkpoint: set model.checkpoint=<ckpt.pt> (or the "
                          "directory holding it and its flagfile.txt).")
    network, settings = load_network(location, cfg.get("flags"), bool(cfg.get("use_ema", True)))
    size = int(settings["img_size"])
    return Denoiser(network, linear_alphas_cumprod(settings["T"], settings["beta_1"], settings["beta_T"]),
                    (3, size, size), "epsilon")


def model_files(location: str | Path) -> list[Path]:
    """What loading reads: the checkpoint and, when present, the flagfile beside it (for the cache key)."""
    path = checkpoint_file(location)
    return [path, *[p for p in [path.parent / FLAGFILE_NAME] if p.is_file()]]
