"""A small latent text-to-image model built from configs: the Stable Diffusion architecture at CPU size.

- `write_clip_vocabulary` / `build_tokenizer`: a CLIP BPE tokenizer (vocab.json + merges.txt) whose
  vocabulary is every lowercase letter and digit plus whole-word merges for the given words, so any
  lowercase caption tokenizes (unknown words letter by letter) and the captions' own words are one token.
- `build_vae`, `build_text_encoder`, `build_unet`: diffusers `AutoencoderKL`, transformers `CLIPTextModel`
  and diffusers `UNet2DConditionModel` from the kwargs in configs/model/ldm.yaml.
- `save_pipeline`: the five components as a `StableDiffusionPipeline` directory (`save_pretrained`), the
  layout a Stable Diffusion download has, which `mia_gen.models.denoiser.load_denoiser` reads.

transformers is the [t2i] extra; diffusers is a core dependency.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from mia_gen.errors import MiaGenError
from mia_gen.extras import require
from mia_gen.models.denoiser import _plain

T2I_FEATURE = "model=ldm (text-to-image training)"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def caption_words(captions: Iterable[str]) -> list[str]:
    """The distinct lowercase words (letters and digits) of `captions`, sorted."""
    return sorted({word for caption in captions for word in re.findall(r"[a-z0-9]+", caption.lower())})


def write_clip_vocabulary(directory: str | Path, words: Iterable[str]) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a small CLIP BPE in `directory`: every lowercase letter and digit (alone and
    word-final, `</w>`), left-to-right merges that make each of `words` one token, and the two special tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # "h a" -> "ha", "ha n" -> "han", ...
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += list(SPECIAL_TOKENS)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab_file, merges_file


def build_tokenizer(directory: str | Path, words: Iterable[str], max_length: int):
    """A `CLIPTokenizer` over `write_clip_vocabulary(directory, words)`, padding to `max_length` tokens."""
    transformers = require("transformers", T2I_FEATURE)
    vocab_file, merges_file = write_clip_vocabulary(directory, words)
    return transformers.CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=int(max_length),
                                      bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                                      pad_token=SPECIAL_TOKENS[1], unk_token=SPECIAL_TOKENS[1])


def _diffusers_module(class_name: str, kwargs: Any, where: str):
    """diffusers' `class_name(**kwargs)` (lists of block types / channels as tuples); bad kwargs: `MiaGenError`."""
    import diffusers

    cfg = _plain(kwargs)
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    try:
        return getattr(diffusers, class_name)(**cfg)
    except (TypeError, ValueError) as err:
        raise MiaGenError(f"{where} could not build a {class_name} ({str(err).splitlines()[0]}); fix its kwargs "
                          "in the model config (configs/model/ldm.yaml).") from err


def build_vae(vae_cfg: Any):
    """An untrained `AutoencoderKL` from its kwargs (configs/model/ldm.yaml `vae`)."""
    return _diffusers_module("AutoencoderKL", vae_cfg, "model.vae")


def build_text_encoder(text_cfg: Any, tokenizer):
    """An untrained `CLIPTextModel` from its kwargs (configs/model/ldm.yaml `text_encoder`), its vocabulary and
    special tokens the tokenizer's."""
    transformers = require("transformers", T2I_FEATURE)
    try:
        config = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **_plain(text_cfg))
        return transformers.CLIPTextModel(config)
    except (TypeError, ValueError) as err:
        raise MiaGenError(f"model.text_encoder could not build a CLIPTextModel ({str(err).splitlines()[0]}); fix "
                          "its kwargs in the model config (configs/model/ldm.yaml).") from err


def build_unet(unet_cfg: Any):
    """An untrained `UNet2DConditionModel` from its kwargs (configs/model/ldm.yaml `unet`)."""
    return _diffusers_module("UNet2DConditionModel", unet_cfg, "model.unet")


VOCABULARY_FILES = ("vocab.json", "merges.txt")


def save_pipeline(directory: str | Path, vae, text_encoder, tokenizer, unet, scheduler, vocabulary: str | Path) -> None:
    """The components as a `StableDiffusionPipeline` directory (no safety checker, no feature extractor).

    vocabulary: the folder holding the tokenizer's vocab.json and merges.txt, copied into tokenizer/ beside
    what transformers writes (recent versions write tokenizer.json only), as a Stable Diffusion v1.x download has.
    """
    import shutil

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    for name in VOCABULARY_FILES:
        shutil.copyfile(Path(vocabulary) / name, Path(directory) / "tokenizer" / name)


def set_seed_for(module_builder, seed: int, *args):
    """`module_builder(*args)` with its initial weights drawn from `seed` (the caller's RNG left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return module_builder(*args)
