"""Tiny diffusers pipelines with random (seeded) weights, saved with `save_pretrained` as a real download is.

Sizes: RGB records 16x16 px -> VAE latents 4x8x8 (one downsampling: factor 2); text embeddings
(L=16 tokens, D=32). Each builder takes well under 2 s on one CPU thread. Import from a test as
`from tiny_pipelines import tiny_sd_pipeline` (pytest puts tests/ on sys.path, as for conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 16
LATENT_SHAPE = (4, 8, 8)
TEXT_LENGTH = 16  # the tokenizer's model_max_length (77 for Stable Diffusion)
TEXT_WIDTH = 32  # the text encoder's hidden size = the UNet's cross_attention_dim
SCALING_FACTOR = 0.5  # not 1 and not SD's 0.18215: a test that forgets it fails
N_CLASSES = 10
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WORDS = ("a", "handwritten", "digit", "photo", "of", "the", "number")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion v1.x's schedule (its scheduler_config.json)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1, clip_sample=False)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_SHAPE[0], block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=SCALING_FACTOR).eval()


def tiny_tokenizer(directory: Path):
    """A CLIP BPE over every letter and digit with `WORDS` as whole tokens (`mia_gen.models.ldm`)."""
    from transformers import CLIPTokenizer

    from mia_gen.models.ldm import write_clip_vocabulary

    vocab_file, merges_file = write_clip_vocabulary(directory, WORDS)
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=TEXT_LENGTH)


def tiny_text_encoder(tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval()


def tiny_text_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SHAPE[1], in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0],
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH).eval()


def tiny_sd_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """A `StableDiffusionPipeline` directory: unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    tokenizer = tiny_tokenizer(directory / "tokenizer")
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        unet=tiny_text_unet(seed), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(str(directory))
    # tokenizer/ as in a Stable Diffusion v1.x download: vocab.json, merges.txt, tokenizer_config.json and
    # special_tokens_map.json, no tokenizer.json (newer transformers write one; the loader must not need it)
    (directory / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    (directory / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "pad_token": SPECIAL[1], "unk_token": SPECIAL[1]}))
    return directory


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_SHAPE[0], out_channels=2 * LATENT_SHAPE[0],
        num_layers=1, sample_size=LATENT_SHAPE[1], patch_size=2, num_embeds_ada_norm=N_CLASSES,
        norm_num_groups=1).eval()


def tiny_dit_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """A `DiTPipeline` directory: transformer/ (learned sigma, N_CLASSES classes + the null label), vae/, scheduler/."""
    from diffusers import DiTPipeline

    directory = Path(directory)
    DiTPipeline(transformer=tiny_dit(seed), vae=tiny_vae(seed), scheduler=_scheduler()).save_pretrained(str(directory))
    return directory


def tiny_class_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=N_CLASSES)
    with torch.no_grad():  # a visible class effect in an untrained net: large label embeddings
        unet.class_embedding.weight.mul_(5.0)
    return unet.eval()


def tiny_class_unet_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """A pixel-space `DDPMPipeline` whose UNet2DModel has `num_class_embeds` (1x8x8 records)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    directory = Path(directory)
    DDPMPipeline(unet=tiny_class_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        str(directory))
    return directory


def tiny_lora(directory: str | Path, base_dir: str | Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1,
              layout: str = "pipeline") -> Path:
    """A LoRA adapter (rank `rank`, scale alpha / rank) on the attention projections of the tiny SD UNet at
    `base_dir`, with random non-zero A and B.

    layout "pipeline": `StableDiffusionPipeline.save_lora_weights` (keys `unet.<module>.lora_A.weight`, as
    the diffusers training scripts save); "adapter": `unet.save_lora_adapter` (keys without the prefix).
    Both write `pytorch_lora_weights.safetensors` with the adapter's config in its metadata. "peft":
    `PeftModel.save_pretrained` (adapter_model.safetensors, keys `base_model.model.<module>...`, and
    adapter_config.json).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    unet = UNet2DConditionModel.from_pretrained(str(base_dir), subfolder="unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    torch.manual_seed(seed)
    if layout == "peft":
        peft_model = get_peft_model(unet, config)
    else:
        unet.add_adapter(config)
    with torch.no_grad():  # init_lora_weights=False gives random A and B; make B clearly visible too
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    if layout == "pipeline":
        StableDiffusionPipeline.save_lora_weights(
            str(directory), unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=config.to_dict())
    elif layout == "adapter":
        unet.save_lora_adapter(str(directory))
    elif layout == "peft":
        peft_model.save_pretrained(str(directory))
    else:
        raise ValueError(f"layout must be 'pipeline', 'adapter' or 'peft', got {layout!r}")
    return directory
