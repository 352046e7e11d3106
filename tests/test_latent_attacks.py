"""White-box diffusion attacks on latent and conditional models, through the CLI and the pipeline.

Every expected score is a plain per-record loop written here with the raw components loaded straight from
the pipeline directory (diffusers / transformers `from_pretrained`): x0 = the VAE posterior mean times
`scaling_factor`, the caption embedded by the tokenizer + text encoder (last hidden state), the network
called as `unet(x_t, t, encoder_hidden_states=e).sample` (or with `class_labels=y`), the formulas written
from the scheduler's `alphas_cumprod`, and each record's noise drawn from its own generator
(`record_generator(seed, record id)`, as the attacks draw it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.datasets import load_dataset
from mia_gen.errors import MiaGenError
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.record_rng import record_generator
from tiny_pipelines import (IMAGE_SIZE, LATENT_SHAPE, N_CLASSES, SCALING_FACTOR, tiny_class_unet_pipeline,
                            tiny_dit_pipeline, tiny_lora, tiny_sd_pipeline)

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

MEMBERS = [3, 17, 40, 58, 71, 99, 120, 133, 150, 171]  # digits record ids the "fine-tune" trained on
SEED = 0
LOSS = {"timesteps": [100, 400], "n_draws": 2}
PIA = {"t": 200, "p": 4}
SECMI = {"t_sec": 40, "k": 20}  # reference convention: inversion 0 -> 20, then 20 -> 40 -> 20 is measured
SECMI_NN = {**SECMI, "classifier": "small_cnn", "nn_epochs": 2}
QUICK = ["logger=none", "progress=false", "device=cpu", "threads=1", "utility.metric=none",
         "evaluation.n_bootstrap=20", "evaluation.blind_baseline=false", "split.n_non_members=10",
         "split.n_reference=0", "evaluation.labelled_fraction=0.4", f"seed={SEED}"]
SD_DATA = ["data=digits", "data.captions=true", "data.channels=3", f"data.resolution={IMAGE_SIZE}"]


def attack_overrides(names):
    params = {"diffusion_loss": LOSS, "pia": PIA, "pian": PIA, "secmi_stat": SECMI, "secmi_nn": SECMI_NN}
    out = [f"attack=[{','.join(names)}]"]
    for name in names:
        out += [f"attack.{name}.{key}={json.dumps(value).replace(' ', '')}" for key, value in params[name].items()]
    return out


@pytest.fixture(scope="module")
def members_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "members.txt"
    path.write_text("\n".join(map(str, MEMBERS)) + "\n")
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


def raw_sd(path, unet=None):
    """The pipeline's components, loaded without mia-gen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(unet=unet or UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval(),
                vae=AutoencoderKL.from_pretrained(str(path), subfolder="vae").eval(),
                text_encoder=CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder").eval(),
                tokenizer=CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
                abar=DDPMScheduler.from_pretrained(str(path), subfolder="scheduler").alphas_cumprod.double().tolist())


def pipeline_config(overrides, cache_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache_dir}"])


def run_pipeline(overrides, tmp_path, name):
    """Scores by attack, {name: {record_id: score}}, of an in-process pipeline run."""
    pipe = Pipeline(pipeline_config(overrides, tmp_path / "cache"), tmp_path / name)
    return pipe, {n: dict(zip(e["record_ids"], e["scores"])) for n, e in pipe.attack().items()}


# ---- per-record references --------------------------------------------------------------------------------


class Reference:
    """eps and x0 of ONE record from raw components. `call(x, t, condition)` -> the network's epsilon (its
    first C channels), `to_x0(image)` -> x0 (the image itself for a pixel model)."""

    def __init__(self, call, abar, to_x0=lambda image: image):
        self.call, self.abar, self.to_x0 = call, abar, to_x0

    def eps(self, x, t, condition):
        with torch.no_grad():
            return self.call(x[None].float(), torch.tensor([t]), condition).double()[0]

    def loss(self, image, condition, record_id, timesteps, n_draws):
        x0 = self.to_x0(image)
        noise = torch.randn(n_draws, *x0.shape, generator=record_generator(SEED, record_id)).double()
        losses = [float(((eps - self.eps(math.sqrt(self.abar[t]) * x0 + math.sqrt(1 - self.abar[t]) * eps, t,
                                         condition)) ** 2).sum()) for t in timesteps for eps in noise]
        return -np.mean(losses)

    def pia(self, image, condition, t, p, normalize=False):
        x0 = self.to_x0(image)
        eps0 = self.eps(x0, 0, condition)
        if normalize:  # PIAN: eps0 at a standard Gaussian's mean absolute value
            eps0 = eps0 / eps0.abs().mean() * math.sqrt(2 / math.pi)
        x_t = math.sqrt(self.abar[t]) * x0 + math.sqrt(1 - self.abar[t]) * eps0
        return -float(((eps0 - self.eps(x_t, t, condition)).abs() ** p).sum() ** (1 / p))

    def ddim(self, x, condition, t_from, t_to):
        eps = self.eps(x, t_from, condition)
        x0_hat = (x - math.sqrt(1 - self.abar[t_from]) * eps) / math.sqrt(self.abar[t_from])
        return math.sqrt(self.abar[t_to]) * x0_hat + math.sqrt(1 - self.abar[t_to]) * eps

    def secmi_map(self, image, condition, t_sec, k):
        """|x~_t - x_t| at t = t_sec - k (the reference code's convention) after DDIM inversion 0 -> t."""
        x = self.to_x0(image)
        for t in range(0, t_sec - k, k):
            x = self.ddim(x, condition, t, t + k)
        t = t_sec - k
        return (self.ddim(self.ddim(x, condition, t, t + k), condition, t + k, t) - x).abs()


def sd_reference(raw):
    tokenizer = raw["tokenizer"]
    scaling = raw["vae"].config.scaling_factor
    assert scaling == SCALING_FACTOR

    def to_x0(image):
        with torch.no_grad():
            return raw["vae"].encode(image[None].float()).latent_dist.mean[0].double() * scaling

    def call(x, t, caption):
        ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        embedding = raw["text_encoder"](ids)[0]
        return raw["unet"](x, t, encoder_hidden_states=embedding).sample

    return Reference(call, raw["abar"], to_x0)


def expected_scores(reference, images, conditions, ids, names):
    out = {}
    for name in names:
        if name == "diffusion_loss":
            out[name] = [reference.loss(x, c, i, **LOSS) for x, c, i in zip(images, conditions, ids)]
        elif name in ("pia", "pian"):
            out[name] = [reference.pia(x, c, **PIA, normalize=name == "pian") for x, c in zip(images, conditions)]
        elif name == "secmi_stat":
            out[name] = [-float((reference.secmi_map(x, c, **SECMI) ** 2).sum()) for x, c in zip(images, conditions)]
    return {name: np.array(scores) for name, scores in out.items()}


def read_scores_csv(path):
    by_attack = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            by_attack.setdefault(row["attack"], {})[int(row["record_id"])] = float(row["score"])
    return by_attack


# ---- criterion 1: a tiny Stable Diffusion pipeline attacked through the CLI ------------------------------


def test_a_stable_diffusion_pipeline_is_attacked_through_the_cli_as_a_per_record_latent_loop(
        sd_dir, members_file, tmp_path):
    names = ["diffusion_loss", "secmi_stat", "secmi_nn", "pia", "pian"]
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mia-gen"), *QUICK, *SD_DATA, "model=diffusers",
         f"model.checkpoint={sd_dir}", f"split.members_file={members_file}", *attack_overrides(names),
         f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = read_scores_csv(run_dir / "scores.csv")
    assert set(scored) == set(names)

    records = load_dataset({"name": "digits", "captions": True, "channels": 3, "resolution": IMAGE_SIZE})
    ids = np.array(sorted(scored["pia"]))
    assert len(ids) == 20 and set(MEMBERS) <= set(ids.tolist())
    images, captions = records.get(ids), records.captions(ids)
    assert captions[0].startswith("a handwritten digit")
    reference = sd_reference(raw_sd(sd_dir))
    expected = expected_scores(reference, images, captions, ids, ["diffusion_loss", "pia", "pian", "secmi_stat"])
    for name, scores in expected.items():
        np.testing.assert_allclose([scored[name][i] for i in ids], scores, rtol=2e-4, err_msg=name)

    # secmi_nn: its classifier (the attack's own fit, same seed and labelled subset) learnt on the loop's
    # latent t-error maps gives the CLI's scores for every record
    entry = json.loads(next((tmp_path / "cache" / "scores").glob("secmi_nn-*.json")).read_text())
    assert entry["record_ids"] == ids.tolist()
    positions = np.array(entry["info"]["trained_on"])
    labels = np.isin(ids[positions], MEMBERS).astype(int)
    maps = torch.stack([reference.secmi_map(x, c, **SECMI) for x, c in zip(images, captions)]).float()
    assert maps.shape == (20, *LATENT_SHAPE)  # the maps are latent maps
    attack = build_attack("secmi_nn", SECMI_NN)
    context = AttackContext(queries=images, record_ids=ids, labelled_subset=(positions, labels), seed=SEED)
    loop_scores, _ = attack.score_maps(maps, context)
    np.testing.assert_allclose(entry["scores"], loop_scores, rtol=1e-3, atol=1e-5)
    evaluated = [i for p, i in enumerate(ids) if p not in set(positions.tolist())]
    assert sorted(scored["secmi_nn"]) == evaluated  # the records it learnt from are not evaluated


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over attention on the CPU
def test_gsa_features_of_a_text_model_are_gradient_norms_in_latent_space_one_backward_pass_per_record(sd_dir):
    from mia_gen.attacks.gsa_features import gsa_features
    from mia_gen.models.denoiser import load_denoiser

    raw = raw_sd(sd_dir)
    reference = sd_reference(raw)
    denoiser = load_denoiser({}, sd_dir)
    records = load_dataset({"name": "digits", "captions": True, "channels": 3, "resolution": IMAGE_SIZE})
    ids, timesteps = np.array([5, 9, 12]), [50, 300]
    images, captions = records.get(ids), records.captions(ids)
    features, names = gsa_features(denoiser, images, ids, SEED, timesteps, "gsa1", batch_size=2,
                                   conditions=denoiser.text_conditions(captions))
    unet = raw["unet"]
    assert names == [f"network.{name}" for name, _ in unet.named_parameters()]
    tokenizer = raw["tokenizer"]
    for row, (image, caption, record_id) in enumerate(zip(images, captions, ids)):
        x0 = reference.to_x0(image).float()
        noise = torch.randn(len(timesteps), *x0.shape, generator=record_generator(SEED, int(record_id)))
        tokens = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        with torch.no_grad():
            embedding = raw["text_encoder"](tokens)[0]
        unet.zero_grad()
        loss = sum(((noise[i] - unet((math.sqrt(raw["abar"][t]) * x0 + math.sqrt(1 - raw["abar"][t]) * noise[i])[None],
                                     torch.tensor([t]), encoder_hidden_states=embedding).sample[0]) ** 2).sum()
                   for i, t in enumerate(timesteps)) / len(timesteps)
        loss.backward()
        expected = [0.0 if p.grad is None else float(p.grad.double().norm()) for _, p in unet.named_parameters()]
        np.testing.assert_allclose(features[row], expected, rtol=2e-3, atol=1e-6)


# ---- criterion 2: a LoRA fine-tune is the merged-weights model ---------------------------------------------


def merged_pipeline(sd_dir, lora_dir, out_dir):
    """The base with the adapter merged by hand (W + alpha / r * B A), saved as a plain pipeline."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    scale = config["lora_alpha"] / config["r"]
    tensors = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet").eval()
    weights = unet.state_dict()
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight")}
    assert modules and 2 * len(modules) == len(tensors)
    for module in modules:
        weights[f"{module}.weight"] += scale * tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
    unet.load_state_dict(weights)
    shutil.copytree(sd_dir, out_dir)
    shutil.rmtree(out_dir / "unet")
    unet.save_pretrained(str(out_dir / "unet"))
    return out_dir


def test_a_lora_adapter_gives_the_scores_of_the_merged_weights_model_not_the_base(sd_dir, members_file, tmp_path):
    lora_dir = tiny_lora(tmp_path / "lora", sd_dir, rank=4, alpha=8.0)
    merged = merged_pipeline(sd_dir, lora_dir, tmp_path / "merged")
    common = [*QUICK, *SD_DATA, "model=diffusers", f"split.members_file={members_file}",
              *attack_overrides(["diffusion_loss", "pia", "secmi_stat"])]
    tuned_pipe, tuned = run_pipeline([*common, f"model.checkpoint={sd_dir}", f"model.lora={lora_dir}"], tmp_path, "a")
    _, by_hand = run_pipeline([*common, f"model.checkpoint={merged}"], tmp_path, "b")
    base_pipe, base = run_pipeline([*common, f"model.checkpoint={sd_dir}"], tmp_path, "c")
    for name in tuned:
        ids = sorted(tuned[name])
        np.testing.assert_allclose([tuned[name][i] for i in ids], [by_hand[name][i] for i in ids], rtol=1e-4,
                                   err_msg=name)
        assert not np.allclose([tuned[name][i] for i in ids], [base[name][i] for i in ids], rtol=1e-3), name
    assert tuned_pipe.train_key != base_pipe.train_key

    # an adapter overwritten at the same path is another model: its scores are not served from the cache
    key = tuned_pipe.train_key
    tiny_lora(lora_dir, sd_dir, rank=4, alpha=8.0, seed=2)
    again = Pipeline(pipeline_config([*common, f"model.checkpoint={sd_dir}", f"model.lora={lora_dir}"],
                                     tmp_path / "cache"), tmp_path / "d")
    assert again.train_key != key
    single_file = Pipeline(pipeline_config(
        [*common, f"model.checkpoint={sd_dir}", f"model.lora={lora_dir / 'pytorch_lora_weights.safetensors'}"],
        tmp_path / "cache"), tmp_path / "e")
    assert single_file.train_key == again.train_key  # the same adapter, named by its directory or its file


# ---- criterion 3: class-conditional models attacked under the records' class labels ---------------------


def class_reference(network, abar, vae=None):
    def to_x0(image):
        with torch.no_grad():
            return vae.encode(image[None].float()).latent_dist.mean[0].double() * vae.config.scaling_factor

    def call(x, t, label):
        out = network(x, t, class_labels=torch.tensor([label])).sample
        return out[:, : x.shape[1]]  # DiT's learned sigma: the first C channels are the noise prediction

    return Reference(call, abar, to_x0 if vae is not None else lambda image: image.double())


@pytest.mark.parametrize("kind", ["class_unet", "dit"])
def test_class_conditional_models_are_attacked_under_the_records_labels(kind, members_file, tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

    names = ["diffusion_loss", "pia", "secmi_stat"]
    if kind == "dit":
        model_dir = tiny_dit_pipeline(tmp_path / "dit")
        network = DiTTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer").eval()
        vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae").eval()
        data = ["data=digits", "data.channels=3", f"data.resolution={IMAGE_SIZE}"]
    else:
        model_dir = tiny_class_unet_pipeline(tmp_path / "unet")
        network, vae = UNet2DModel.from_pretrained(str(model_dir), subfolder="unet").eval(), None
        data = ["data=digits", "data.channels=1", "data.resolution=8"]
    abar = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler").alphas_cumprod.double().tolist()
    pipe, scored = run_pipeline([*QUICK, *data, "model=diffusers", f"model.checkpoint={model_dir}",
                                 f"split.members_file={members_file}", *attack_overrides(names)], tmp_path, "run")
    assert pipe.denoiser.condition_kind == "class" and pipe.denoiser.num_classes == N_CLASSES
    ids = np.array(sorted(scored["pia"]))
    records = pipe.records
    labels = records.labels[torch.as_tensor(ids)].tolist()
    assert len(set(labels)) > 3  # several classes, so a label mix-up would show
    expected = expected_scores(class_reference(network, abar, vae), records.get(ids), labels, ids, names)
    for name in names:
        np.testing.assert_allclose([scored[name][i] for i in ids], expected[name], rtol=2e-4, err_msg=name)


# ---- errors through the pipeline ---------------------------------------------------------------------------


def test_a_text_model_on_records_without_captions_says_how_to_give_them(sd_dir, members_file, tmp_path):
    cfg = pipeline_config([*QUICK, "data=digits", "data.channels=3", f"data.resolution={IMAGE_SIZE}",
                           "model=diffusers", f"model.checkpoint={sd_dir}", f"split.members_file={members_file}",
                           "attack=pia"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match=r"text-conditioned .* needs a caption per record.*data.captions=true"):
        Pipeline(cfg, tmp_path / "run").attack()


def test_records_of_the_wrong_size_for_the_vae_are_refused_with_the_size_to_set(sd_dir, members_file, tmp_path):
    cfg = pipeline_config([*QUICK, "data=digits", "data.captions=true", "data.channels=3", "data.resolution=8",
                           "model=diffusers", f"model.checkpoint={sd_dir}", f"split.members_file={members_file}",
                           "attack=pia"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match=rf"\(3, 8, 8\).*\(3, {IMAGE_SIZE}, {IMAGE_SIZE}\).*data.resolution"):
        Pipeline(cfg, tmp_path / "run").attack()
