"""Latent text-to-image trainer (models/ldm_trainer.py): base pretraining, LoRA / full fine-tunes, resume, defenses.

Tiny sizes: 8 px grayscale records -> VAE latents 4x4x4 (two VAE blocks: one downsampling), a one-layer
text encoder of width 16, a UNet of widths 16/16. Every run here takes a few seconds on one thread.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mia_gen.errors import MiaGenError
from mia_gen.models.defense import Defense
from mia_gen.models.denoiser import load_denoiser
from mia_gen.models.ldm import build_tokenizer, caption_words
from mia_gen.models.ldm_trainer import FINETUNE_JSON, LORA_WEIGHTS, load_base, train_ldm_base, train_ldm_finetune

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = [f"a handwritten digit {k}" for k in range(10)]


def tiny_model(**training):
    return {
        "name": "ldm", "family": "diffusion", "prediction_type": "epsilon", "use_ema": False,
        "vae": {"in_channels": 1, "out_channels": 1, "latent_channels": 4, "block_out_channels": [8, 8],
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 8},
        "tokenizer": {"max_length": 8},
        "text_encoder": {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "projection_dim": 16},
        "unet": {"sample_size": 4, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 16],
                 "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
                 "attention_head_dim": 4, "norm_num_groups": 4},
        "betas": {"num_train_timesteps": 100, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012},
        "pretrain": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0,
                     "caption_dropout": 0.25, "checkpoint_every": 2, "sample_every": 4, "sample_steps": 2, "seed": 1,
                     "vae": {"steps": 3, "batch_size": 8, "lr": 1e-3, "kl_weight": 1e-4, "checkpoint_every": 2,
                             "sample_every": 3, "seed": 1}},
        "training": {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                     "steps": 4, "batch_size": 4, "optimizer": "adamw", "lr": 1e-2, "adam_betas": [0.9, 0.999],
                     "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0, "checkpoint_every": 2,
                     "sample_every": 4, "sample_steps": 2, "seed": 2, **training},
    }


def images(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def captions(n):
    return [CAPTIONS[i % 10] for i in range(n)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ldm") / "base"
    return train_ldm_base(tiny_model(), images(24), captions(24), directory, "cpu", progress=False)


def weights(path):
    return load_file(str(path))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_base_is_a_stable_diffusion_pipeline_with_a_unit_scale_latent(base_dir):
    index = json.loads((base_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base_dir / folder).is_dir(), folder
    assert sorted(p.name for p in (base_dir / "samples").iterdir()) == ["step_000004.png"]
    assert sorted(p.name for p in (base_dir / "vae_training" / "samples").iterdir()) == ["step_000003.png"]
    # scaling_factor = 1 / std of the public records' posterior means
    vae, *_ = load_base(base_dir, torch.device("cpu"))
    with torch.no_grad():
        means = vae.encode(images(24)).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(float(1 / means.std()), rel=1e-5)
    denoiser = load_denoiser({"use_ema": False}, base_dir)
    assert denoiser.condition_kind == "text"
    # the saved tokenizer is the one trained with: each caption word one token, captions embedded apart
    trained_with = build_tokenizer(base_dir / "check", caption_words(captions(24)), 8)
    assert denoiser.text.tokenizer(CAPTIONS[3]).input_ids == trained_with(CAPTIONS[3]).input_ids
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (base_dir / "tokenizer").iterdir()}
    embedded = denoiser.text_conditions([CAPTIONS[1], CAPTIONS[2], ""])
    assert not torch.allclose(embedded[0], embedded[1]) and not torch.allclose(embedded[0], embedded[2])
    latents = denoiser.to_x0(images(3))
    assert latents.shape == (3, 4, 4, 4)
    torch.testing.assert_close(latents, means[:3] * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)


def test_the_tokenizer_makes_each_caption_word_one_token(tmp_path):
    tokenizer = build_tokenizer(tmp_path, caption_words(CAPTIONS), 8)
    ids = tokenizer("a handwritten digit 7").input_ids
    assert len(ids) == 6  # start, 4 words, end
    assert tokenizer.convert_ids_to_tokens(ids[2]) == "handwritten</w>"
    assert len(tokenizer("an unseen word").input_ids) > 5  # unknown words letter by letter, never dropped


def finetune(base_dir, out_dir, stop_after=None, defense=None, **training):
    return train_ldm_finetune(tiny_model(**training), base_dir, images(8, seed=5), captions(8), out_dir, "cpu",
                              progress=False, stop_after=stop_after, defense=defense)


def lora_unet(base_dir, out_dir):
    """The base UNet with the saved adapter as live peft layers (not merged): the reference for merging."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    *_, unet, _ = load_base(base_dir, torch.device("cpu"))
    cfg = tiny_model()["training"]
    unet.add_adapter(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=cfg["target_modules"]))
    state = {k.removeprefix("unet."): v for k, v in weights(out_dir / LORA_WEIGHTS).items()}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state))
    return unet.eval()


def test_a_lora_fine_tune_trains_only_the_adapter_and_loads_as_the_merged_model(base_dir, tmp_path):
    out = tmp_path / "ft"
    finetune(base_dir, out)
    assert json.loads((out / FINETUNE_JSON).read_text()) == {"method": "lora", "base": str(base_dir)}
    adapter = weights(out / LORA_WEIGHTS)
    assert adapter and all("lora" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora.up" in k or "lora_B" in k)  # B left zero
    base_unet = weights(base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert (out / "samples" / "step_000004.png").is_file()

    merged = load_denoiser({"use_ema": False, "lora": str(out)}, base_dir)
    base = load_denoiser({"use_ema": False}, base_dir)
    reference = lora_unet(base_dir, out)
    x_t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 50, 95])
    cond = merged.text_conditions(captions(3))
    with torch.no_grad():
        expected = reference(x_t, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(merged.epsilon(x_t, t, cond), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base.epsilon(x_t, t, cond), expected, atol=1e-4)
    # the base's files are untouched by the fine-tune
    assert_same(base_unet, weights(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_an_interrupted_fine_tune_resumes_bit_identically(base_dir, tmp_path):
    finetune(base_dir, tmp_path / "straight")
    finetune(base_dir, tmp_path / "resumed", stop_after=2)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["step"] == 2
    finetune(base_dir, tmp_path / "resumed")
    assert_same(weights(tmp_path / "straight" / LORA_WEIGHTS), weights(tmp_path / "resumed" / LORA_WEIGHTS))


def test_an_interrupted_base_resumes_bit_identically(tmp_path, base_dir):
    from mia_gen.models import ldm_trainer

    model = tiny_model()
    partial = dict(model, pretrain=dict(model["pretrain"], steps=2))  # "steps" may grow between runs
    train_ldm_base(partial, images(24), captions(24), tmp_path / "base", "cpu", progress=False)
    assert json.loads((tmp_path / "base" / "trainer_state.json").read_text())["step"] == 2
    ldm_trainer.train_ldm_base(model, images(24), captions(24), tmp_path / "base", "cpu", progress=False)
    for part in ("unet", "vae", "text_encoder"):
        assert_same(weights(base_dir / part / next((base_dir / part).glob("*.safetensors")).name),
                    weights(tmp_path / "base" / part / next((base_dir / part).glob("*.safetensors")).name))


def test_a_full_fine_tune_writes_a_whole_pipeline(base_dir, tmp_path):
    out = tmp_path / "full"
    finetune(base_dir, out, method="full")
    assert json.loads((out / FINETUNE_JSON).read_text())["method"] == "full"
    assert (out / "model_index.json").is_file() and not (out / LORA_WEIGHTS).exists()
    changed = weights(out / "unet" / "diffusion_pytorch_model.safetensors")
    base = weights(base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert changed.keys() == base.keys() and any(not torch.equal(changed[k], base[k]) for k in base)
    assert_same(weights(out / "vae" / "diffusion_pytorch_model.safetensors"),
                weights(base_dir / "vae" / "diffusion_pytorch_model.safetensors"))


def test_dp_sgd_trains_the_adapter_privately_and_reports_epsilon(base_dir, tmp_path):
    pytest.importorskip("opacus")
    out = tmp_path / "dp"
    defense = Defense.from_config({"name": "dp_sgd", "target_epsilon": 10.0, "noise_multiplier": None,
                                   "max_grad_norm": 1.0, "delta": None, "accountant": "rdp"})
    finetune(base_dir, out, defense=defense)
    report = json.loads((out / "privacy.json").read_text())
    assert report["private_steps"] == 4 and 0 < report["epsilon"] <= 10.0
    assert all("lora" in k for k in weights(out / LORA_WEIGHTS))


@pytest.mark.parametrize("training, message", [
    ({"method": "none"}, "attacks the pretrained base"),
    ({"method": "prefix"}, r"lora \(an adapter"),
    ({"target_modules": ["no_such_layer"]}, "do not name layers of the base"),
    ({"rank": 0}, "rank must be a positive integer"),
])
def test_bad_fine_tune_settings_say_what_to_change(base_dir, tmp_path, training, message):
    with pytest.raises(MiaGenError, match=message):
        finetune(base_dir, tmp_path / "bad", **training)


def test_a_defense_that_cannot_apply_says_why(base_dir, tmp_path):
    with pytest.raises(MiaGenError, match="does not apply to a text-to-image fine-tune"):
        finetune(base_dir, tmp_path / "fed", defense=Defense.from_config({"name": "federated", "clients": 2,
                                                                           "rounds": 2}))


def test_records_that_do_not_fit_the_vae_or_lack_captions_are_refused(base_dir, tmp_path):
    with pytest.raises(MiaGenError, match="data.channels=1 data.resolution=8"):
        train_ldm_finetune(tiny_model(), base_dir, torch.zeros(4, 3, 8, 8), captions(4), tmp_path / "a", "cpu")
    with pytest.raises(MiaGenError, match="4 images but 3 captions"):
        train_ldm_finetune(tiny_model(), base_dir, images(4), captions(3), tmp_path / "b", "cpu")


# ---- through the pipeline: experiment=ldm_lora_digits, shrunk --------------------------------------
TINY_EXPERIMENT = [
    "experiment=ldm_lora_digits", "logger=none", "progress=false", "device=cpu", "evaluation.n_bootstrap=10",
    "data.resolution=8", "data.max_records=80", "split.n_members=8", "split.n_non_members=8",
    "model.vae.block_out_channels=[8,8]", "model.vae.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
    "model.vae.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]", "model.vae.norm_num_groups=4",
    "model.tokenizer.max_length=8", "model.text_encoder.hidden_size=16", "model.text_encoder.intermediate_size=16",
    "model.text_encoder.num_hidden_layers=1", "model.text_encoder.num_attention_heads=2",
    "model.text_encoder.projection_dim=16", "model.unet.sample_size=4", "model.unet.block_out_channels=[16,16]",
    "model.unet.cross_attention_dim=16", "model.unet.attention_head_dim=4", "model.unet.norm_num_groups=4",
    "model.pretrain.steps=3", "model.pretrain.batch_size=8", "model.pretrain.sample_every=0",
    "model.pretrain.vae.steps=2", "model.pretrain.vae.batch_size=8", "model.pretrain.vae.sample_every=0",
    "model.training.steps=3", "model.training.batch_size=4", "model.training.sample_every=0",
    "attack=[diffusion_loss,pia]",
]


def make_pipeline(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from mia_gen.experiments.common import CONFIG_DIR
    from mia_gen.experiments.pipeline import Pipeline

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY_EXPERIMENT, *overrides, f"cache_dir={tmp_path / 'cache'}"])
    return Pipeline(cfg, tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}")


def test_the_experiment_pretrains_a_base_on_public_records_only_and_attacks_the_fine_tune(tmp_path, monkeypatch):
    from mia_gen.experiments import api
    from mia_gen.models import ldm_trainer

    pipe = make_pipeline(tmp_path)
    split = pipe.split
    public = pipe.public_ids
    assert len(public) == 80 - 16 and not set(public) & (set(split.members) | set(split.non_members))
    seen = {}
    real_base = ldm_trainer.train_ldm_base

    def spy(model_cfg, images, captions, *args, **kwargs):
        seen["base"] = images.clone()
        return real_base(model_cfg, images, captions, *args, **kwargs)

    monkeypatch.setattr(ldm_trainer, "train_ldm_base", spy)
    results = {r["attack"]: r for r in pipe.run()}
    assert set(results) == {"diffusion_loss", "pia"}
    torch.testing.assert_close(seen["base"], pipe.records.get(public))  # the base saw the public records only
    assert pipe.base_dir.name.startswith("ldm-base-") and (pipe.base_dir / "model_index.json").is_file()
    assert json.loads((pipe.model_dir / FINETUNE_JSON).read_text())["base"] == str(pipe.base_dir)

    # the pipeline's scores are those of base + adapter through the public loader, per record
    ids = pipe.query_ids
    denoiser = api.load_denoiser(pipe.base_dir, lora=pipe.model_dir)
    expected = api.score("diffusion_loss", pipe.records.get(ids), denoiser=denoiser, record_ids=ids,
                         captions=pipe.records.captions(ids))
    import csv

    with open(pipe.run_dir / "scores.csv") as handle:
        got = {int(r["record_id"]): float(r["score"]) for r in csv.DictReader(handle) if r["attack"] == "diffusion_loss"}
    np.testing.assert_allclose([got[i] for i in ids], expected, rtol=1e-5)

    # method=none attacks the same cached base, training nothing
    for steps in (ldm_trainer.VAESteps, ldm_trainer.BaseSteps):
        monkeypatch.setattr(steps, "step", lambda *a, **k: pytest.fail("the base was trained again"))
    control = make_pipeline(tmp_path, "model.training.method=none")
    assert control.model_dir == pipe.base_dir
    control_results = {r["attack"]: r for r in control.run()}
    assert control_results["pia"]["auc"] != results["pia"]["auc"] or control.train_key != pipe.train_key


def test_the_experiment_without_captions_says_how_to_give_them(tmp_path):
    with pytest.raises(MiaGenError, match="data.captions=true"):
        make_pipeline(tmp_path, "data.captions=false").run()


def test_the_gpu_preset_fine_tunes_a_given_stable_diffusion_base_on_a_captioned_folder(tmp_path):
    """experiment=sd_lora_finetune on a tiny Stable Diffusion directory (the files a download gives) and a folder of
    images with metadata.jsonl: the LoRA is trained on the given base, which is never retrained or modified."""
    from PIL import Image
    from hydra import compose, initialize_config_dir

    from mia_gen.experiments.common import CONFIG_DIR
    from mia_gen.experiments.pipeline import Pipeline
    from tiny_pipelines import IMAGE_SIZE, tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "sd")
    before = weights(base / "unet" / "diffusion_pytorch_model.safetensors")
    folder = tmp_path / "images"
    (folder / "all").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "all" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"all/{i}.png", "text": f"a photo of the number {i % 3}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    overrides = ["experiment=sd_lora_finetune", f"model.base={base}", f"data.root={folder}",
                 f"data.resolution={IMAGE_SIZE}", "split.n_members=8", "split.n_non_members=8", "logger=none",
                 "progress=false", "device=cpu", "evaluation.n_bootstrap=10", "model.training.steps=2",
                 "model.training.sample_every=0", "attack=[diffusion_loss,clid]", "attack.clid.alpha=0.5",
                 f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pipe = Pipeline(cfg, tmp_path / "run")
    results = {r["attack"]: r for r in pipe.run()}
    assert set(results) == {"diffusion_loss", "clid"}
    assert pipe.base_dir == base.resolve()
    assert json.loads((pipe.model_dir / FINETUNE_JSON).read_text())["base"] == str(base.resolve())
    assert (pipe.model_dir / LORA_WEIGHTS).is_file()
    assert_same(before, weights(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not (base / "trainer_state.json").exists() and not (base / "vae_training").exists()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        missing = compose("config", overrides=[*overrides[:1], f"model.base={tmp_path / 'nowhere'}", *overrides[2:]])
    with pytest.raises(MiaGenError, match="huggingface-cli download"):
        Pipeline(missing, tmp_path / "run2").run()


def test_the_shipped_configs_validate_and_the_unet_fits_the_vaes_latent():
    from hydra import compose, initialize_config_dir

    from mia_gen.experiments.common import CONFIG_DIR
    from mia_gen.models.ldm import build_unet, build_vae
    from mia_gen.models.ldm_trainer import validate_finetune_config, validate_pretrain_config

    for experiment, given in (("ldm_lora_digits", []), ("sd_lora_finetune", ["model.base=/x", "data.root=/x"])):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}", *given])
        assert validate_finetune_config(cfg.model.training)["method"] == "lora"
        validate_pretrain_config(cfg.model.pretrain)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        model = compose("config", overrides=["experiment=ldm_lora_digits"]).model
    vae, unet = build_vae(model.vae), build_unet(model.unet)
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 1, 16, 16)).latent_dist.mean
    assert latent.shape[1:] == (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    assert model.unet.cross_attention_dim == model.text_encoder.hidden_size


def test_augmentation_changes_the_fine_tune_and_early_stopping_is_the_shorter_fine_tune(base_dir, tmp_path):
    from omegaconf import OmegaConf

    from mia_gen.models.factory import train_model

    def run(out, defense, steps=4):
        model = OmegaConf.create(tiny_model(steps=steps))
        train_model(model, images(8, seed=5), out, torch.device("cpu"), progress=False,
                    defense_cfg=OmegaConf.create(defense), captions=captions(8), base_dir=base_dir)
        return weights(out / LORA_WEIGHTS)

    plain = run(tmp_path / "plain", {"name": "none"})
    augmented = run(tmp_path / "augmented", {"name": "augmentation", "hflip": True, "crop_padding": 1,
                                             "randaugment_ops": 1, "randaugment_magnitude": 0.5,
                                             "augment_fakes": True})
    assert any(not torch.equal(plain[k], augmented[k]) for k in plain)
    stopped = run(tmp_path / "stopped", {"name": "early_stopping", "fraction": 0.5, "steps": None})
    assert json.loads((tmp_path / "stopped" / "trainer_state.json").read_text())["steps"] == 2
    assert_same(stopped, run(tmp_path / "two", {"name": "none"}, steps=2))


def test_a_model_config_diffusers_cannot_build_says_which_block_to_fix(tmp_path):
    model = tiny_model()
    model["unet"]["down_block_types"] = ["NoSuchBlock2D", "DownBlock2D"]
    with pytest.raises(MiaGenError, match="model.unet could not build a UNet2DConditionModel"):
        train_ldm_base(model, images(8), captions(8), tmp_path / "base", "cpu", progress=False)
