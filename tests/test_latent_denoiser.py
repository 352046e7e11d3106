"""Latent and text-conditioned Denoisers (Stable Diffusion, DiT, LoRA fine-tunes) against their raw components.

Every expected value is computed here, one record at a time, with the components loaded straight from the
pipeline directory (diffusers / transformers `from_pretrained`) and the formulas written out: the VAE
posterior mean times scaling_factor, the tokenizer + text encoder's last hidden state, the UNet called
with `encoder_hidden_states`, classifier-free guidance, and a LoRA merged by hand (W + alpha / r * B A).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.models.denoiser import Denoiser, load_denoiser, resolve_dtype
from tiny_pipelines import (IMAGE_SIZE, LATENT_SHAPE, LORA_TARGETS, N_CLASSES, SCALING_FACTOR, TEXT_LENGTH,
                            TEXT_WIDTH, tiny_class_unet_pipeline, tiny_dit_pipeline, tiny_lora, tiny_sd_pipeline)

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a handwritten digit 3", "a handwritten digit 7", "photo of the number 42", "a digit", "of"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_denoiser({}, sd_dir, "cpu")


@pytest.fixture(scope="module")
def raw(sd_dir):
    """The pipeline's components, loaded without mia-gen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(unet=UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet").eval(),
                vae=AutoencoderKL.from_pretrained(str(sd_dir), subfolder="vae").eval(),
                text_encoder=CLIPTextModel.from_pretrained(str(sd_dir), subfolder="text_encoder").eval(),
                tokenizer=CLIPTokenizer.from_pretrained(str(sd_dir), subfolder="tokenizer"))


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def embed(raw, caption):
    """StableDiffusionPipeline.encode_prompt (clip_skip=None) for one caption: (L, D)."""
    tokenizer = raw["tokenizer"]
    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return raw["text_encoder"](ids)[0][0]


def unet_eps(unet, x, t, cond):
    with torch.no_grad():
        return unet(x[None], torch.tensor([t]), encoder_hidden_states=cond[None]).sample[0]


def noised(denoiser, images, ts):
    x0 = denoiser.to_x0(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    a = denoiser.alphas_cumprod[ts].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---- Stable Diffusion: x0, text conditions, epsilon, guidance ---------------------------------------------


def test_a_stable_diffusion_directory_loads_as_a_latent_text_model(sd):
    assert sd.condition_kind == "text" and sd.text_dim == TEXT_WIDTH
    assert sd.sample_shape == LATENT_SHAPE and sd.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert sd.guidance_scale == 1.0 and sd.unconditional_text.shape == (TEXT_LENGTH, TEXT_WIDTH)
    # parameters() are the denoising network's only: gradient attacks (GSA) and DP see the UNet
    assert all(name.startswith("network.") for name, _ in sd.named_parameters())


def test_x0_is_the_vae_posterior_mean_times_scaling_factor_one_record_at_a_time(sd, raw, images):
    x0 = sd.to_x0(images)
    assert x0.shape == (5, *LATENT_SHAPE) and x0.dtype == torch.float32 and not x0.requires_grad
    for i in range(len(images)):
        with torch.no_grad():
            expected = raw["vae"].encode(images[i : i + 1]).latent_dist.mean[0] * raw["vae"].config.scaling_factor
        torch.testing.assert_close(x0[i], expected, rtol=1e-5, atol=1e-6)
    assert raw["vae"].config.scaling_factor == SCALING_FACTOR
    # batch invariance: a record's latent does not depend on the records beside it
    assert torch.equal(sd.to_x0(images[[3, 1]]), x0[[3, 1]])
    assert torch.equal(sd.to_x0(images[4:]), x0[4:])
    assert sd.to_x0(images[:0]).shape == (0, *LATENT_SHAPE)


def test_to_images_decodes_latents_with_the_vae(sd, raw, images):
    z = sd.to_x0(images) + 0.3 * torch.randn(5, *LATENT_SHAPE, generator=torch.Generator().manual_seed(2))
    decoded = sd.to_images(z)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    for i in range(5):
        with torch.no_grad():
            expected = raw["vae"].decode(z[i : i + 1] / SCALING_FACTOR).sample[0].clamp(-1, 1)
        torch.testing.assert_close(decoded[i], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(sd.to_images(z[[2]]), decoded[[2]])
    with pytest.raises(MiaGenError, match=r"x0 of shape \(N, 4, 8, 8\)"):
        sd.to_images(images)


def test_text_conditions_are_the_tokenizer_and_text_encoder_per_caption(sd, raw):
    cond = sd.text_conditions(CAPTIONS)
    assert cond.shape == (len(CAPTIONS), TEXT_LENGTH, TEXT_WIDTH) and cond.dtype == torch.float32
    for i, caption in enumerate(CAPTIONS):
        torch.testing.assert_close(cond[i], embed(raw, caption), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sd.unconditional_text, embed(raw, ""), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond[0], cond[1])  # "3" vs "7": the digit is in the embedding
    assert torch.equal(sd.text_conditions(CAPTIONS[2:3]), cond[2:3])  # batch invariant
    assert sd.text_conditions([]).shape == (0, TEXT_LENGTH, TEXT_WIDTH)


def test_epsilon_is_the_unet_with_encoder_hidden_states_per_record(sd, raw, images):
    ts = torch.tensor([0, 10, 250, 600, 999])
    x_t, cond = noised(sd, images, ts), sd.text_conditions(CAPTIONS)
    eps = sd.epsilon(x_t, ts, cond)
    assert eps.shape == (5, *LATENT_SHAPE)
    for i in range(5):
        torch.testing.assert_close(eps[i], unet_eps(raw["unet"], x_t[i], int(ts[i]), embed(raw, CAPTIONS[i])),
                                   rtol=1e-4, atol=1e-5)
    # the caption matters
    assert not torch.allclose(eps[1], sd.epsilon(x_t[1:2], ts[1:2], sd.text_conditions([CAPTIONS[0]]))[0])


def test_guidance_mixes_in_the_empty_caption(sd_dir, raw, images):
    guided = load_denoiser({"guidance_scale": 3.0}, sd_dir)
    ts = torch.tensor([5, 100, 400, 700, 900])
    x_t = noised(guided, images, ts)
    eps = guided.epsilon(x_t, ts, guided.text_conditions(CAPTIONS))
    for i in range(5):
        cond = unet_eps(raw["unet"], x_t[i], int(ts[i]), embed(raw, CAPTIONS[i]))
        uncond = unet_eps(raw["unet"], x_t[i], int(ts[i]), embed(raw, ""))
        torch.testing.assert_close(eps[i], uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_a_text_model(sd, images):
    x_t = sd.to_x0(images[:2]).requires_grad_(True)
    sd.epsilon(x_t, 50, sd.text_conditions(CAPTIONS[:2]), grad=True).square().sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


# ---- LoRA --------------------------------------------------------------------------------------------------


def merged_by_hand(sd_dir, lora_dir):
    """The base UNet with W <- W + alpha / r * B @ A for every adapted projection, read from the file."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    if (lora_dir / "adapter_model.safetensors").is_file():  # peft's layout
        file = lora_dir / "adapter_model.safetensors"
        config = json.loads((lora_dir / "adapter_config.json").read_text())
    else:
        file = lora_dir / "pytorch_lora_weights.safetensors"
        with safe_open(str(file), framework="pt") as handle:
            config = json.loads(handle.metadata()["lora_adapter_metadata"])
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    scale = config["lora_alpha"] / config["r"]
    assert scale == 2.0
    tensors = {k.removeprefix("base_model.model.").removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet").eval()
    weights = unet.state_dict()
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    assert modules and 2 * len(modules) == len(tensors) and all(m.endswith(LORA_TARGETS) for m in modules)
    for module in modules:
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + scale * b @ a
    unet.load_state_dict(weights)
    return unet


@pytest.mark.parametrize("layout", ["pipeline", "adapter", "peft"])
def test_a_lora_fine_tune_is_the_merged_weights_model(sd_dir, sd, images, tmp_path, layout):
    lora_dir = tiny_lora(tmp_path / "lora", sd_dir, rank=4, alpha=8.0, layout=layout)
    tuned = load_denoiser({"lora": str(lora_dir)}, sd_dir)
    by_hand = merged_by_hand(sd_dir, lora_dir)
    ts = torch.tensor([3, 80, 300, 500, 950])
    x_t, cond = noised(sd, images, ts), sd.text_conditions(CAPTIONS)
    eps = tuned.epsilon(x_t, ts, cond)
    for i in range(5):
        torch.testing.assert_close(eps[i], unet_eps(by_hand, x_t[i], int(ts[i]), cond[i]), rtol=1e-4, atol=1e-5)
    assert (eps - sd.epsilon(x_t, ts, cond)).abs().max() > 1e-2  # not the base
    # a plain model: no LoRA layers left, the same parameter names as the base
    assert [n for n, _ in tuned.named_parameters()] == [n for n, _ in sd.named_parameters()]
    # the single-file form names the same adapter
    file = next(lora_dir.glob("*.safetensors"))
    if layout != "peft":  # peft's alpha is in adapter_config.json beside the file
        assert torch.equal(load_denoiser({"lora": str(file)}, sd_dir).epsilon(x_t, ts, cond), eps)


def test_a_kohya_lora_file_is_converted_with_its_alphas(sd_dir, sd, images, tmp_path):
    """kohya / A1111 keys: lora_unet_<module with _>.lora_down / lora_up / alpha (scale alpha / rank)."""
    from safetensors.torch import load_file, save_file

    lora_dir = tiny_lora(tmp_path / "lora", sd_dir, rank=4, alpha=8.0, layout="adapter")
    tensors = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    kohya = {}
    for key, value in tensors.items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    tuned = load_denoiser({"lora": str(tmp_path / "kohya.safetensors")}, sd_dir)
    ts = torch.tensor([3, 80, 300, 500, 950])
    x_t, cond = noised(sd, images, ts), sd.text_conditions(CAPTIONS)
    expected = load_denoiser({"lora": str(lora_dir)}, sd_dir).epsilon(x_t, ts, cond)
    torch.testing.assert_close(tuned.epsilon(x_t, ts, cond), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # peft, on the renamed key
def test_a_lora_that_does_not_match_the_base_is_refused(sd_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lora_dir = tiny_lora(tmp_path / "lora", sd_dir)
    file = lora_dir / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()

    def variant(name, change):
        (tmp_path / name).mkdir()
        save_file(change(dict(tensors)), str(tmp_path / name / file.name), metadata=metadata)
        return tmp_path / name

    key = next(k for k in tensors if k.endswith("attn1.to_q.lora_A.weight"))
    renamed = variant("renamed", lambda t: {**{k: v for k, v in t.items() if not k.startswith(key[:-14])},
                                             **{k.replace("attn1.to_q", "attn1.to_nowhere"): v for k, v in t.items()
                                                if k.startswith(key[:-14])}})
    with pytest.raises(MiaGenError, match=r"does not match the base model at .*pipeline: .*name no layer"):
        load_denoiser({"lora": str(renamed)}, sd_dir)
    reshaped = variant("reshaped", lambda t: {**t, key: torch.randn(t[key].shape[0], t[key].shape[1] + 3)})
    with pytest.raises(MiaGenError, match=r"LoRA adapter at .*reshaped does not match the base model"):
        load_denoiser({"lora": str(reshaped)}, sd_dir)
    with pytest.raises(MissingAssetError, match="model.lora=null"):
        load_denoiser({"lora": str(tmp_path / "nowhere")}, sd_dir)
    with_text = variant("with_text", lambda t: {
        **t, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, TEXT_WIDTH),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(TEXT_WIDTH, 4)})
    text_base = encoder_layers(load_denoiser({}, sd_dir).text.text_encoder)[0].self_attn.q_proj.weight
    merged = load_denoiser({"lora": str(with_text)}, sd_dir).text.text_encoder  # merged now, alpha = r without metadata
    a, b = (load_file(str(with_text / file.name))[f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{x}.weight"]
            for x in "AB")
    torch.testing.assert_close(encoder_layers(merged)[0].self_attn.q_proj.weight, text_base + b @ a)
    wrong_text = variant("wrong_text", lambda t: {
        **t, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, TEXT_WIDTH + 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(TEXT_WIDTH, 4)})
    with pytest.raises(MiaGenError, match=r"does not match the base's text encoder: .*q_proj"):
        load_denoiser({"lora": str(wrong_text)}, sd_dir)


def encoder_layers(text_encoder):
    """A CLIPTextModel's transformer layers (transformers 4 nests them under `text_model`, 5 does not)."""
    return getattr(text_encoder, "text_model", text_encoder).encoder.layers


def parameter_name(names, path: str) -> str:
    """`path` as the loaded CLIPTextModel names it, with or without `text_model.`."""
    return next(p for p in (path, f"text_model.{path}", path.removeprefix("text_model.")) if p in names)


def test_a_lora_that_also_adapts_the_text_encoder_is_merged_into_it(sd_dir, tmp_path):
    """DreamBooth-with-text-encoder and most community (kohya / A1111) LoRAs adapt the text encoder too: W + alpha / r
    B A in each adapted layer, against the weights merged by hand (diffusers' layout with its adapter config, and
    kohya's with per-module alphas)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    base = load_denoiser({}, sd_dir)
    base_text = {n: p.detach().clone() for n, p in base.text.text_encoder.named_parameters()}
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(sd_dir), subfolder="text_encoder")
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    torch.manual_seed(3)
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    text_layers = get_peft_model_state_dict(text)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "diffusers"), unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    merged = load_denoiser({"lora": str(tmp_path / "diffusers")}, sd_dir)
    expected = dict(base_text)
    for key, a in text_layers.items():  # peft keys "<module>.lora_A.weight", relative to the CLIPTextModel
        if key.endswith("lora_A.weight"):
            weight = parameter_name(expected, key.replace(".lora_A.weight", ".weight"))
            expected[weight] = expected[weight] + 6 / 2 * text_layers[key.replace("lora_A", "lora_B")] @ a
    adapted = {n for n in expected if not torch.equal(expected[n], base_text[n])}
    assert len(adapted) == 3 * 2  # q_proj, v_proj and fc1 of both layers
    for name, parameter in merged.text.text_encoder.named_parameters():
        torch.testing.assert_close(parameter, expected[name], msg=name)
    assert not torch.equal(merged.text_conditions(["a digit"]), base.text_conditions(["a digit"]))

    kohya = {}  # kohya / A1111 names, rank 2, alpha 1: scale 0.5
    for module, (rows, columns) in {"self_attn_k_proj": (TEXT_WIDTH, TEXT_WIDTH), "mlp_fc2": (TEXT_WIDTH, 37)}.items():
        stem = f"lora_te_text_model_encoder_layers_1_{module}"
        kohya.update({f"{stem}.lora_down.weight": torch.randn(2, columns), f"{stem}.lora_up.weight": torch.randn(rows, 2),
                      f"{stem}.alpha": torch.tensor(1.0)})
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    merged = load_denoiser({"lora": str(tmp_path / "kohya.safetensors")}, sd_dir).text.text_encoder
    layer = encoder_layers(merged)[1]
    for module, got in (("self_attn_k_proj", layer.self_attn.k_proj.weight), ("mlp_fc2", layer.mlp.fc2.weight)):
        stem = f"lora_te_text_model_encoder_layers_1_{module}"
        name = parameter_name(base_text, "text_model.encoder.layers.1."
                              + module.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.") + ".weight")
        torch.testing.assert_close(got, base_text[name] + 0.5 * kohya[f"{stem}.lora_up.weight"] @ kohya[f"{stem}.lora_down.weight"])


# ---- DiT: a class-conditional latent transformer ------------------------------------------------------------


def test_a_dit_pipeline_is_a_class_conditional_latent_model(tmp_path, images):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    path = tiny_dit_pipeline(tmp_path / "dit")
    transformer = DiTTransformer2DModel.from_pretrained(str(path), subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae").eval()
    labels, ts = torch.tensor([3, 0, 9, 3, 7]), torch.tensor([1, 99, 420, 610, 998])
    for guidance in (1.0, 3.0):
        dit = load_denoiser({"guidance_scale": guidance}, path)
        assert (dit.condition_kind, dit.num_classes, dit.null_class) == ("class", N_CLASSES, N_CLASSES)
        assert dit.sample_shape == LATENT_SHAPE and dit.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        x0 = dit.to_x0(images)
        x_t = noised(dit, images, ts)
        eps = dit.epsilon(x_t, ts, labels)
        for i in range(5):
            with torch.no_grad():
                torch.testing.assert_close(x0[i], vae.encode(images[i : i + 1]).latent_dist.mean[0] * SCALING_FACTOR,
                                           rtol=1e-5, atol=1e-6)

                def call(label):  # learned sigma: the first C channels are the noise prediction
                    out = transformer(x_t[i : i + 1], torch.tensor([int(ts[i])]),
                                      class_labels=torch.tensor([label])).sample
                    return out[0, : LATENT_SHAPE[0]]

                expected = call(int(labels[i]))
                if guidance != 1.0:
                    expected = call(N_CLASSES) + guidance * (expected - call(N_CLASSES))
            torch.testing.assert_close(eps[i], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(MiaGenError, match="cannot load LoRA adapters into a DiTTransformer2DModel"):
        load_denoiser({"lora": str(path)}, path)


def test_a_pixel_class_pipeline_keeps_x0_the_images(tmp_path):
    denoiser = load_denoiser({}, tiny_class_unet_pipeline(tmp_path / "pixel"))
    assert denoiser.condition_kind == "class" and denoiser.image_shape == denoiser.sample_shape == (1, 8, 8)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(denoiser.to_x0(x), x) and torch.equal(denoiser.to_images(x), x)
    with pytest.raises(MiaGenError, match="data.resolution=8"):
        denoiser.to_x0(torch.zeros(3, 1, 16, 16))
    with pytest.raises(MiaGenError, match="not text-conditioned"):
        denoiser.text_conditions(["a digit"])


# ---- errors that teach --------------------------------------------------------------------------------------


def copy_without(sd_dir, tmp_path, folder):
    copy = tmp_path / f"without_{folder}"
    shutil.copytree(sd_dir, copy)
    shutil.rmtree(copy / folder)
    return copy


@pytest.mark.parametrize("folder, holds", [("tokenizer", "vocab.json, merges.txt"),
                                           ("text_encoder", "model.safetensors"), ("vae", "AutoencoderKL")])
def test_a_pipeline_missing_a_component_says_which_and_what_it_holds(sd_dir, tmp_path, folder, holds):
    with pytest.raises(MissingAssetError, match=f"without its {folder}/ folder; {folder}/ must hold .*{holds}"):
        load_denoiser({}, copy_without(sd_dir, tmp_path, folder))


def test_a_tokenizer_folder_without_a_vocabulary_is_refused(sd_dir, tmp_path):
    """Loaded anyway, such a tokenizer maps every caption to unknown tokens: all captions would embed alike."""
    copy = copy_without(sd_dir, tmp_path, "tokenizer")
    (copy / "tokenizer").mkdir()
    shutil.copy(sd_dir / "tokenizer" / "tokenizer_config.json", copy / "tokenizer")
    with pytest.raises(MissingAssetError, match="holds no vocabulary"):
        load_denoiser({}, copy)


def test_records_of_the_wrong_size_for_the_vae(sd, images):
    with pytest.raises(MiaGenError, match=r"32x32 px but this latent model's VAE turns 16x16 px .*data.resolution=16"):
        sd.to_x0(torch.zeros(2, 3, 32, 32))
    with pytest.raises(MiaGenError, match="data.channels=3"):
        sd.to_x0(torch.zeros(2, 1, 16, 16))
    with pytest.raises(MiaGenError, match=r"latent space.*to_x0"):  # images where latents belong
        sd.epsilon(images, 5, sd.text_conditions(CAPTIONS))


def test_a_text_model_without_captions(sd, images):
    x_t = sd.to_x0(images)
    with pytest.raises(MiaGenError, match="text-conditioned: give each record's caption .*data.captions=true.*"
                                          "metadata.jsonl"):
        sd.epsilon(x_t, 5)
    with pytest.raises(MiaGenError, match="got no captions: .*data.captions=true"):
        sd.text_conditions(None)
    with pytest.raises(MiaGenError, match="1 missing caption"):
        sd.text_conditions(["a digit", None])
    with pytest.raises(MiaGenError, match="not the captions"):
        sd.epsilon(x_t, 5, CAPTIONS)


def test_text_conditions_of_the_wrong_shape_dtype_or_count(sd, images):
    x_t, cond = sd.to_x0(images), sd.text_conditions(CAPTIONS)
    for wrong in (cond[:3], cond[..., :8], cond.to(torch.int64), cond[0]):
        with pytest.raises(MiaGenError, match=rf"shape \(5, L, {TEXT_WIDTH}\)"):
            sd.epsilon(x_t, 5, wrong)


def test_half_precision_on_the_cpu_and_sdxl_are_refused(sd_dir, tmp_path):
    with pytest.raises(MiaGenError, match="float32"):
        load_denoiser({"dtype": "float16"}, sd_dir, "cpu")
    with pytest.raises(MiaGenError, match="model.dtype=half is not supported"):
        load_denoiser({"dtype": "half"}, sd_dir, "cpu")
    sdxl = tmp_path / "sdxl"
    shutil.copytree(sd_dir, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MiaGenError, match="text_encoder_2, SDXL.*not built"):
        load_denoiser({}, sdxl)


def test_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32  # CPU runs in float32
    assert resolve_dtype(None, cuda, torch.float16) == torch.float16  # the weights' own dtype on CUDA
    assert resolve_dtype("bfloat16", cuda, torch.float32) == torch.bfloat16
    assert resolve_dtype("float32", cuda, torch.float16) == torch.float32
    with pytest.raises(MiaGenError, match="bfloat16 on the CPU"):
        resolve_dtype("bfloat16", cpu, torch.float32)


def test_fp16_weights_load_as_float32_on_the_cpu(sd_dir, raw, tmp_path, images):
    import copy

    half = tmp_path / "half"
    shutil.copytree(sd_dir, half)
    rounded = copy.deepcopy(raw["unet"]).half()
    rounded.save_pretrained(str(half / "unet"))
    rounded.float()
    denoiser = load_denoiser({}, half, "cpu")
    assert next(denoiser.network.parameters()).dtype == torch.float32
    x_t, cond = denoiser.to_x0(images[:2]), denoiser.text_conditions(CAPTIONS[:2])
    eps = denoiser.epsilon(x_t, 7, cond)
    for i in range(2):
        torch.testing.assert_close(eps[i], unet_eps(rounded, x_t[i], 7, cond[i]), rtol=1e-4, atol=1e-5)


def test_a_hub_id_in_the_local_cache_loads_offline(sd_dir, tmp_path, monkeypatch, images):
    """A Stable Diffusion hub id already in the Hugging Face cache loads with downloads off."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(sd_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub, from_dir = load_denoiser({}, "someone/tiny-sd"), load_denoiser({}, sd_dir)
    assert from_hub.condition_kind == "text"
    x_t, cond = from_dir.to_x0(images), from_dir.text_conditions(CAPTIONS)
    assert torch.equal(from_hub.to_x0(images), x_t)
    assert torch.equal(from_hub.epsilon(x_t, 11, cond), from_dir.epsilon(x_t, 11, cond))


def test_without_the_t2i_extra_a_text_pipeline_names_the_install_line(sd_dir, monkeypatch):
    import sys

    from mia_gen.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r'text-to-image models needs transformers.*pip install "mia-gen\[t2i\]"'):
        load_denoiser({}, sd_dir)
