"""The parts of a latent, text-conditioned diffusion pipeline around its denoising network.

- `LatentEncoder`: records `(N, C, H, W)` in [-1, 1] -> the VAE latent the network denoises, the
  posterior MEAN times `scaling_factor` (as SecMI, PIA and CopyMark do on Stable Diffusion; not a sample).
- `TextEncoder`: captions -> `(N, L, D)` embeddings from the pipeline's own tokenizer and text encoder
  (the last hidden state, as `StableDiffusionPipeline.encode_prompt` with clip_skip=None).
- `load_vae`, `load_text_encoder`: those components from a pipeline directory (or hub id).
- `apply_lora`: merge a LoRA adapter (diffusers / peft format) into a network, every key checked.

transformers and peft are the setup.cfg extra [t2i]; diffusers is a core dependency.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mia_gen.errors import CorruptStoreError, MiaGenError, MissingAssetError
from mia_gen.fixed_batches import in_fixed_chunks
from mia_gen.extras import require

log = logging.getLogger(__name__)

# Rows per VAE / text-encoder call. Every call gets exactly this many rows (the last chunk is padded), so a
# record's latent or embedding never depends on which records share its batch.
ENCODE_BATCH = 8
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_ADAPTER = "mia_gen_lora"
_PEFT_PREFIX = "base_model.model."
_LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_linear_layer")
T2I_FEATURE = "text-to-image models"


class LatentEncoder(nn.Module):
    """A diffusers `AutoencoderKL`'s encoder as the map from records to the latent space the network denoises.

    Args:
        vae: `AutoencoderKL` (its `config.scaling_factor`, `block_out_channels`, `latent_channels`).
        batch_size: rows per VAE call (fixed; see `ENCODE_BATCH`).
    """

    def __init__(self, vae: nn.Module, batch_size: int = ENCODE_BATCH) -> None:
        super().__init__()
        self.vae = vae.eval()
        self.batch_size = int(batch_size)
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)

    def train(self, mode: bool = True) -> "LatentEncoder":
        return super().train(False)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """`(C_img, H, W)` of the records whose latents have shape `latent_shape` `(C, h, w)`."""
        _, h, w = latent_shape
        return self.image_channels, h * self.downsampling, w * self.downsampling

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, C_img, H, W)` images in [-1, 1] -> `(N, C, H/f, W/f)` float32 latents on the VAE's device:
        `vae.encode(x).latent_dist.mean * scaling_factor` (the posterior mean, deterministic)."""
        parameter = next(self.vae.parameters())
        if len(images) == 0:
            _, h, w = images.shape[1:]
            return torch.zeros(0, self.latent_channels, h // self.downsampling, w // self.downsampling,
                               device=parameter.device)
        images = images.to(parameter.device, parameter.dtype)
        with torch.no_grad():
            latents = in_fixed_chunks(lambda x: self.vae.encode(x).latent_dist.mean, images, self.batch_size)
        return latents.float() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`(N, C, h, w)` latents (x0 space) -> `(N, C_img, h f, w f)` float32 images clipped to [-1, 1]:
        `vae.decode(latents / scaling_factor).sample`, as the diffusers pipelines decode samples."""
        parameter = next(self.vae.parameters())
        if len(latents) == 0:
            _, h, w = latents.shape[1:]
            return torch.zeros(0, self.image_channels, h * self.downsampling, w * self.downsampling,
                               device=parameter.device)
        latents = (latents.float() / self.scaling_factor).to(parameter.device, parameter.dtype)
        with torch.no_grad():
            images = in_fixed_chunks(lambda z: self.vae.decode(z).sample, latents, self.batch_size)
        return images.float().clamp(-1, 1)


class TextEncoder(nn.Module):
    """A pipeline's tokenizer and text encoder (transformers `CLIPTokenizer` + `CLIPTextModel`, or alike).

    Args:
        tokenizer: called as `tokenizer(captions, padding="max_length", max_length=model_max_length,
            truncation=True)`, as `StableDiffusionPipeline` does.
        text_encoder: returns the last hidden state first (`CLIPTextModel`).
        batch_size: captions per text-encoder call (fixed; see `ENCODE_BATCH`).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, batch_size: int = ENCODE_BATCH) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.batch_size = int(batch_size)
        self.hidden_size = int(text_encoder.config.hidden_size)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)

    def encode(self, captions: list[str]) -> torch.Tensor:
        """`N` captions -> `(N, L, D)` float32 embeddings on the text encoder's device (L = the tokenizer's
        model_max_length); "" is the unconditional branch. Each distinct caption is embedded once."""
        distinct = list(dict.fromkeys(captions))
        if len(distinct) < len(captions):
            row = {caption: i for i, caption in enumerate(distinct)}
            embedded = self.encode(distinct)
            return embedded[torch.tensor([row[caption] for caption in captions], device=embedded.device)]
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)

        def encode(chunk_ids: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
            return self.text_encoder(chunk_ids, attention_mask=chunk_mask if self.use_attention_mask else None)[0]

        with torch.no_grad():
            return in_fixed_chunks(encode, (ids, mask), self.batch_size).float()


def load_vae(location: str | Path, local_only: bool, vae_class: str = "AutoencoderKL") -> nn.Module:
    """The `AutoencoderKL` in `<location>/vae`, float32 on CPU."""
    from diffusers import AutoencoderKL

    if vae_class != "AutoencoderKL":
        raise MiaGenError(f"the pipeline's VAE is a {vae_class}; mia-gen computes x0 with an AutoencoderKL's "
                          "posterior mean only (Stable Diffusion 1.x / 2.x, DiT).")
    _require_folder(location, "vae", "config.json and diffusion_pytorch_model.safetensors (an AutoencoderKL)")
    try:
        return AutoencoderKL.from_pretrained(str(location), subfolder="vae", local_files_only=local_only,
                                             use_safetensors=True, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError) as err:
        raise MissingAssetError(
            f"could not load the VAE from {location}/vae ({str(err).splitlines()[0]}); it needs config.json and "
            "diffusion_pytorch_model.safetensors. Save the pipeline with `pipeline.save_pretrained(dir)`."
        ) from err


def load_text_encoder(location: str | Path, local_only: bool, text_class: str = "CLIPTextModel",
                      tokenizer_class: str = "CLIPTokenizer") -> TextEncoder:
    """The tokenizer in `<location>/tokenizer` and text encoder in `<location>/text_encoder` (float32, CPU)."""
    transformers = require("transformers", feature=T2I_FEATURE)
    _require_folder(location, "tokenizer", "the tokenizer's files (vocab.json, merges.txt and "
                    "tokenizer_config.json for CLIP, or tokenizer.json)")
    _require_folder(location, "text_encoder", "config.json and model.safetensors (the pipeline's CLIPTextModel)")
    folder = Path(location) / "tokenizer"
    if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise MissingAssetError(
            f"{folder} holds no vocabulary (neither tokenizer.json nor vocab.json + merges.txt): every caption would "
            "tokenize to unknown tokens and all captions would embed alike. Copy the tokenizer's files from the base "
            "model the pipeline was made from, or save the whole pipeline again with `pipeline.save_pretrained(dir)`."
        )
    tokenizer_cls = getattr(transformers, tokenizer_class, None) or transformers.AutoTokenizer
    text_cls = getattr(transformers, text_class, None)
    if text_cls is None:
        raise MiaGenError(f"the pipeline's text encoder class {text_class!r} is not in the installed transformers "
                          f"{transformers.__version__}; upgrade it (pip install -U transformers).")
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(location), subfolder="tokenizer", local_files_only=local_only)
    except (OSError, ValueError, TypeError) as err:
        raise MissingAssetError(
            f"could not load the tokenizer from {location}/tokenizer ({str(err).splitlines()[0]}); it must hold "
            "the tokenizer's files (vocab.json, merges.txt, tokenizer_config.json for CLIP), as "
            "`pipeline.save_pretrained(dir)` or a hub download writes them."
        ) from err
    try:
        text_encoder = text_cls.from_pretrained(str(location), subfolder="text_encoder", local_files_only=local_only,
                                                use_safetensors=True)
    except (OSError, ValueError) as err:
        raise MissingAssetError(
            f"could not load the text encoder from {location}/text_encoder ({str(err).splitlines()[0]}); it "
            "must hold config.json and model.safetensors."
        ) from err
    return TextEncoder(tokenizer, text_encoder)


def _require_folder(location: str | Path, name: str, holds: str) -> None:
    path = Path(location)
    if path.is_dir() and not (path / name).is_dir():
        raise MissingAssetError(
            f"{path} is a latent diffusion pipeline without its {name}/ folder; {name}/ must hold {holds}. Copy "
            f"it from the base model the pipeline was made from (e.g. `huggingface-cli download <base id> "
            f"--include '{name}/*' --local-dir {path}`), or save the whole pipeline with "
            "`pipeline.save_pretrained(dir)`."
        )


def apply_lora(network: nn.Module, lora: str | Path, base: str | Path, text_encoder: nn.Module | None = None) -> None:
    """Merge the LoRA adapter at `lora` into `network` in place (W + alpha / r * B A), so it becomes the
    fine-tuned model; an adapter that also changes the text encoder (DreamBooth-with-text-encoder, most kohya /
    A1111 LoRAs) is merged into `text_encoder` too (`merge_text_encoder_lora`).

    `lora`: a `.safetensors` file or a directory holding `pytorch_lora_weights.safetensors`
    (`StableDiffusionPipeline.save_lora_weights`, `unet.save_lora_adapter`; kohya keys are converted) or
    `adapter_model.safetensors` (+ `adapter_config.json`, peft's `save_pretrained`). Every adapter tensor
    must land in `network` with its shape: anything else is a `MiaGenError`, never a partial load. The
    scale alpha / r comes from the adapter's metadata (`lora_adapter_metadata`, `adapter_config.json`) or
    kohya alphas; without them alpha = r (scale 1), as diffusers assumes.
    """
    if not hasattr(network, "load_lora_adapter"):
        raise MiaGenError(f"model.lora: diffusers cannot load LoRA adapters into a {type(network).__name__}; "
                          "mia-gen merges adapters into UNets (Stable Diffusion).")
    require("peft", feature="model.lora (LoRA adapters)")
    from peft.utils import get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(lora).expanduser().resolve()
    file = _lora_file(path)
    try:
        state_dict = load_file(str(file), device="cpu")
        with safe_open(str(file), framework="pt") as handle:
            raw_metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CorruptStoreError(f"the LoRA adapter {file} could not be read ({err}); download or save it "
                                "again.") from err
    metadata = _json(raw_metadata["lora_adapter_metadata"], f"{file} (its lora_adapter_metadata)") \
        if "lora_adapter_metadata" in raw_metadata else None
    if any(k.startswith(_PEFT_PREFIX) for k in state_dict):  # peft's PeftModel.save_pretrained layout
        state_dict = {k.removeprefix(_PEFT_PREFIX): v for k, v in state_dict.items()}
        config_file = file.parent / "adapter_config.json"
        metadata = _json(config_file.read_text(), str(config_file)) if config_file.is_file() else metadata
    if not any(marker in k for k in state_dict for marker in _LORA_MARKERS):
        example = next(iter(state_dict), None)
        raise MiaGenError(f"model.lora={file} is not a LoRA adapter: none of its {len(state_dict)} tensors is a LoRA "
                          f"weight (lora_A / lora_B, lora_down / lora_up; e.g. {example!r}). Give the adapter's file "
                          "(a fine-tuned full model goes in model.checkpoint).")
    mismatch = f"the LoRA adapter at {path} does not match the base model at {base}"
    if any("dora_scale" in k for k in state_dict):
        raise MiaGenError(f"{mismatch}: it is a DoRA adapter (dora_scale), which mia-gen does not merge; use a "
                          "plain LoRA adapter.")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    # kohya / A1111 keys (lora_unet_..., lora_te_...) -> diffusers keys with their alphas
    state_dict, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state_dict)
    own = "unet"
    prefixes = {k.split(".", 1)[0] for k in state_dict}
    if "text_encoder_2" in prefixes:
        raise MiaGenError(f"the LoRA adapter at {path} changes a second text encoder (SDXL), which mia-gen does not "
                          "load; use a Stable Diffusion 1.x / 2.x adapter.")
    if "text_encoder" in prefixes:
        if text_encoder is None:
            raise MiaGenError(f"the LoRA adapter at {path} also changes a text encoder, but the base model at {base} "
                              "has none; use the base the adapter was trained on.")
        text_part = {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
        merge_text_encoder_lora(text_encoder, text_part, network_alphas, metadata, file)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder.")}
        network_alphas = {k: v for k, v in (network_alphas or {}).items() if not k.startswith("text_encoder.")} or None
        prefixes = {k.split(".", 1)[0] for k in state_dict}
        if not state_dict:  # an adapter of the text encoder alone
            return
    prefix = own if own in prefixes else None
    if prefix is not None and prefixes != {own}:
        raise MiaGenError(f"{mismatch}: it also holds keys outside {own}/ ({sorted(prefixes - {own})[:3]}).")
    if prefix is not None and metadata:
        metadata = {k: v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or None
    expected = {k.removeprefix(f"{prefix}.") if prefix else k: v for k, v in state_dict.items()}
    if expected and "lora_A" not in next(iter(expected)):
        from diffusers.utils import convert_unet_state_dict_to_peft

        expected = convert_unet_state_dict_to_peft(expected)
    kwargs = {"metadata": metadata} if metadata else {"network_alphas": network_alphas} if network_alphas else {}
    try:
        network.load_lora_adapter(state_dict, prefix=prefix, adapter_name=_ADAPTER, **kwargs)
    except TypeError as err:  # LoraConfig(**metadata) with keys this peft does not know
        from peft import LoraConfig

        unknown = sorted(set(metadata or {}) - set(LoraConfig.__dataclass_fields__)) if metadata else []
        raise MiaGenError(
            f"the LoRA adapter at {path}: its config ({'adapter_config.json' if (file.parent / 'adapter_config.json').is_file() else 'metadata'}) "
            f"has keys the installed peft does not know ({unknown[:5] or str(err)}); upgrade peft "
            "(pip install -U peft) or remove those keys.") from err
    except (ValueError, RuntimeError, KeyError, IndexError) as err:
        raise MiaGenError(f"{mismatch}: {str(err).strip().splitlines()[0][:300]}") from err
    loaded = get_peft_model_state_dict(network, adapter_name=_ADAPTER) if getattr(network, "peft_config", None) else {}
    missing = sorted(set(expected) - set(loaded))
    wrong = [k for k in expected if k in loaded and not torch.equal(loaded[k].float(), expected[k].float())]
    if missing or wrong or not expected:
        problem = (f"{len(missing)} of its {len(expected)} tensors name no layer of the base (e.g. {missing[0]})"
                   if missing else f"{len(wrong)} tensors did not load (e.g. {wrong[0]})" if wrong else "it is empty")
        raise MiaGenError(f"{mismatch}: {problem}. Use the base model the adapter was trained on.")
    network.fuse_lora(lora_scale=1.0, adapter_names=[_ADAPTER])
    network.unload_lora()  # drops the LoRA layers; the fused weights stay
    log.info("LoRA adapter %s merged into %s (%d tensors)", file, type(network).__name__, len(expected))


# kohya's attention keys, as diffusers' `lora_state_dict` converts them, -> the CLIP attention layer they adapt
_OLD_ATTENTION = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def _text_lora_modules(state_dict: dict) -> dict[str, tuple[str, str]]:
    """`{module path: (down / A key, up / B key)}` of a text-encoder LoRA in either layout diffusers gives:
    peft's `<module>.lora_A.weight` / `.lora_B.weight`, or the converted kohya `<path>.to_q_lora.down.weight` /
    `<module>.lora_linear_layer.down.weight`."""
    modules = {}
    for key in state_dict:
        rest = key.removeprefix("text_encoder.")
        if rest.endswith(".lora_A.weight"):
            modules[rest[: -len(".lora_A.weight")]] = (key, key.replace(".lora_A.weight", ".lora_B.weight"))
        elif rest.endswith(".lora_linear_layer.down.weight"):
            module = rest[: -len(".lora_linear_layer.down.weight")]
            modules[module] = (key, key.replace(".down.weight", ".up.weight"))
        elif rest.endswith(".down.weight") and rest.rsplit(".", 3)[-3] in _OLD_ATTENTION:
            path, name = rest.rsplit(".", 3)[0], rest.rsplit(".", 3)[1]
            modules[f"{path}.{_OLD_ATTENTION[name]}"] = (key, key.replace(".down.weight", ".up.weight"))
    return modules


def merge_text_encoder_lora(text_encoder: nn.Module, state_dict: dict, network_alphas: dict | None,
                            metadata: dict | None, file: Path) -> None:
    """W += (alpha / r) B A into each adapted linear layer of `text_encoder` (a `CLIPTextModel`), in place.

    alpha / r: the adapter config's `lora_alpha` / `r` (`text_encoder.*` keys of its metadata, with their per-module
    `alpha_pattern` / `rank_pattern`), or kohya's per-module alpha over the module's rank; alpha = r without either,
    as diffusers assumes. Every tensor must name a linear layer of the encoder with matching shapes.
    """
    modules = _text_lora_modules(state_dict)
    used = {key for pair in modules.values() for key in pair}
    stray = sorted(set(state_dict) - used)
    if stray or not modules:
        raise MiaGenError(f"the LoRA adapter {file}: text-encoder tensors mia-gen cannot pair into LoRA layers "
                          f"({stray[:3] or 'none found'}); use a diffusers, peft or kohya LoRA file.")
    config = {k.removeprefix("text_encoder."): v for k, v in (metadata or {}).items() if k.startswith("text_encoder.")}
    merged = 0
    for module_path, (down_key, up_key) in sorted(modules.items()):
        if up_key not in state_dict:
            raise MiaGenError(f"the LoRA adapter {file}: {down_key} has no partner {up_key}.")
        down, up = state_dict[down_key].float(), state_dict[up_key].float()
        layer = _submodule(text_encoder, module_path)
        if layer is None or not isinstance(layer, nn.Linear) or down.dim() != 2 or up.dim() != 2 \
                or tuple(layer.weight.shape) != (up.shape[0], down.shape[1]) or up.shape[1] != down.shape[0]:
            raise MiaGenError(f"the LoRA adapter {file} does not match the base's text encoder: {down_key} "
                              f"({tuple(down.shape)}, {tuple(up.shape)}) fits no linear layer {module_path!r} of it; "
                              "use the base model the adapter was trained on.")
        rank = down.shape[0]
        alpha = (network_alphas or {}).get(f"{down_key}.alpha")
        if config:
            rank = next((int(r) for pattern, r in (config.get("rank_pattern") or {}).items()
                         if module_path.endswith(pattern)), int(config.get("r", rank)))
            alpha = next((float(a) for pattern, a in (config.get("alpha_pattern") or {}).items()
                          if module_path.endswith(pattern)), float(config.get("lora_alpha", rank)))
        scale = (float(alpha) if alpha is not None else rank) / rank
        with torch.no_grad():
            layer.weight += (scale * up @ down).to(layer.weight.dtype)
        merged += 1
    log.info("LoRA adapter %s: %d text-encoder layers merged", file, merged)


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """`model`'s submodule at `path`, with or without CLIP's `text_model.` (transformers 4 nests the encoder in it,
    transformers 5 does not; adapters name it either way)."""
    for candidate in (path, f"text_model.{path}", path.removeprefix("text_model.")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _json(text: str, where: str) -> dict:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptStoreError(f"{where} is not valid JSON ({err}); save the adapter again.") from err
    if not isinstance(content, dict):
        raise CorruptStoreError(f"{where} must hold a JSON object (the adapter's LoRA config), got "
                                f"{type(content).__name__}; save the adapter again.")
    return content


def _lora_file(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MiaGenError(f"model.lora={path} is not a .safetensors file; mia-gen loads no pickles. Convert it "
                              "(safetensors.torch.save_file) or give the adapter's directory.")
        return path
    if path.is_dir():
        for name in LORA_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise MissingAssetError(
            f"model.lora={path} holds no single LoRA weights file: expected one of {list(LORA_FILES)} "
            f"(found {[p.name for p in found]}); give the .safetensors file itself."
        )
    raise MissingAssetError(f"model.lora={path} does not exist; point it at the adapter's directory or its "
                            ".safetensors file, or set model.lora=null to attack the base model.")
