"""White-box diffusion attacks on class-conditional models: the records' class labels are the condition.

Each attack's batched scores are checked against a plain per-record loop that calls the diffusers
network directly (`unet(x_t, t, class_labels=y).sample`) with the same noise (`record_noise`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.attacks.timesteps import record_noise
from mia_gen.errors import MiaGenError
from mia_gen.models.denoiser import Denoiser, load_denoiser
from tiny_pipelines import N_CLASSES, tiny_class_unet_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 8  # tiny_class_unet_pipeline's 1x8x8 records


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny_class_unet_pipeline(tmp_path_factory.mktemp("class_ddpm") / "pipeline")


@pytest.fixture(scope="module")
def denoiser(pipeline_dir):
    return load_denoiser({}, pipeline_dir)


@pytest.fixture(scope="module")
def records():
    x = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([3, 0, 9, 3, 7, 1])
    return x, labels


def context(denoiser, queries, conditions, record_ids=None, seed=0):
    ids = np.arange(len(queries)) if record_ids is None else np.asarray(record_ids)
    return AttackContext(queries=queries, record_ids=ids, denoiser=denoiser, conditions=conditions, seed=seed)


# ---- plain per-record loops, calling the network itself ------------------------------------------


def eps_of(network, x, t, y, guidance=1.0, null=None):
    """The network's epsilon for one image, its first C channels; classifier-free guidance written out."""
    with torch.no_grad():
        def call(label):
            out = network(x[None].float(), torch.tensor([t]), class_labels=torch.tensor([label])).sample
            return out[:, : x.shape[0]].double()[0]

        cond = call(y)
        return cond if guidance == 1.0 else call(null) + guidance * (cond - call(null))


def loss_loop(network, abar, queries, labels, record_ids, seed, t, n_draws):
    scores = []
    for x0, y, record_id in zip(queries.double(), labels.tolist(), record_ids):
        noise = record_noise(np.array([record_id]), seed, n_draws, x0.shape)[0].double()
        losses = [float(((eps - eps_of(network, math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps, t, y))
                         ** 2).sum()) for eps in noise]
        scores.append(-np.mean(losses))
    return np.array(scores)


def pia_loop(network, abar, queries, labels, t, p, **guidance):
    scores = []
    for x0, y in zip(queries.double(), labels.tolist()):
        eps0 = eps_of(network, x0, 0, y, **guidance)
        x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps0
        scores.append(-float(((eps0 - eps_of(network, x_t, t, y, **guidance)).abs() ** p).sum() ** (1 / p)))
    return np.array(scores)


def secmi_loop(network, abar, queries, labels, t_sec, k):
    def ddim(x, y, t_from, t_to):
        eps = eps_of(network, x, t_from, y)
        x0_hat = (x - math.sqrt(1 - abar[t_from]) * eps) / math.sqrt(abar[t_from])
        return math.sqrt(abar[t_to]) * x0_hat + math.sqrt(1 - abar[t_to]) * eps

    scores, path = [], list(range(0, t_sec, k))
    for x, y in zip(queries.double(), labels.tolist()):
        for t_from, t_to in zip(path[:-1], path[1:]):
            x = ddim(x, y, t_from, t_to)
        t = path[-1]
        x_back = ddim(ddim(x, y, t, t + k), y, t + k, t)
        scores.append(-float(((x_back - x) ** 2).sum()))
    return np.array(scores)


# ---- the class-conditional UNet2DModel pipeline --------------------------------------------------


def test_a_ddpm_pipeline_with_num_class_embeds_loads_as_a_class_conditional_denoiser(denoiser):
    assert (denoiser.condition_kind, denoiser.num_classes, denoiser.null_class) == ("class", N_CLASSES, None)
    assert denoiser.guidance_scale == 1.0


def test_loss_equals_a_per_record_loop_with_the_records_labels(denoiser, records):
    x, labels = records
    ids = np.array([7, 3, 11, 5, 2, 4])
    output = build_attack("diffusion_loss", {"timesteps": [100], "n_draws": 3, "batch_size": 12})(
        context(denoiser, x, labels, ids, seed=5))
    abar = denoiser.alphas_cumprod.tolist()
    expected = loss_loop(denoiser.network, abar, x, labels, ids, 5, 100, 3)
    np.testing.assert_allclose(output.scores, expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["pia", "pian"])
def test_pia_equals_a_per_record_loop_with_the_records_labels(denoiser, records, name):
    x, labels = records
    output = build_attack(name, {"t": 200, "p": 4, "sweep_timesteps": [50], "batch_size": 8})(
        context(denoiser, x, labels))
    expected = pia_loop(denoiser.network, denoiser.alphas_cumprod.tolist(), x, labels, 200, 4)
    if name == "pia":  # two timesteps per record: the labels are repeated as the jobs are
        np.testing.assert_allclose(output.scores, expected, rtol=1e-4)
        np.testing.assert_allclose(output.info["sweep"]["50"], pia_loop(
            denoiser.network, denoiser.alphas_cumprod.tolist(), x, labels, 50, 4), rtol=1e-4)
    else:  # PIAN rescales eps0; it still uses the labels (checked against PIA's loop: it differs)
        assert not np.allclose(output.scores, expected)


def test_secmi_stat_equals_a_per_record_loop_with_the_records_labels(denoiser, records):
    x, labels = records
    output = build_attack("secmi_stat", {"t_sec": 40, "k": 20, "sweep_timesteps": [60], "batch_size": 8})(
        context(denoiser, x, labels))
    abar = denoiser.alphas_cumprod.tolist()
    np.testing.assert_allclose(output.scores, secmi_loop(denoiser.network, abar, x, labels, 40, 20), rtol=1e-3)
    np.testing.assert_allclose(output.info["sweep"]["60"], secmi_loop(denoiser.network, abar, x, labels, 60, 20),
                               rtol=1e-3)


def test_secmi_nn_uses_the_labels_too(denoiser, records):
    """SecMI-NNs learns from the same t-error maps: changing labels changes the maps it learns from."""
    x, labels = records
    attack = build_attack("secmi_nn", {"t_sec": 40, "k": 20, "classifier": "small_cnn", "nn_epochs": 1})
    subset = (np.array([0, 1, 2, 3]), np.array([1, 0, 1, 0]))
    maps = attack.t_error_maps(context(denoiser, x, labels), [20])
    other = attack.t_error_maps(context(denoiser, x, (labels + 1) % N_CLASSES), [20])
    assert not torch.allclose(maps, other)
    ctx = context(denoiser, x, labels)
    ctx.labelled_subset = subset
    assert attack(ctx).scores.shape == (6,)


@pytest.mark.parametrize("name", ["diffusion_loss", "pia", "secmi_stat"])
def test_a_records_label_is_really_used(denoiser, records, name):
    x, labels = records
    params = {"t_sec": 40, "k": 20} if name == "secmi_stat" else {}
    attack = build_attack(name, params)
    scores = attack(context(denoiser, x, labels)).scores
    changed = labels.clone()
    changed[2] = (changed[2] + 4) % N_CLASSES
    other = attack(context(denoiser, x, changed)).scores
    assert other[2] != scores[2]
    np.testing.assert_array_equal(np.delete(other, 2), np.delete(scores, 2))  # per record: the rest is untouched


def test_scores_do_not_depend_on_batch_or_company(denoiser, records):
    x, labels = records
    full = build_attack("pia", {"batch_size": 7})(context(denoiser, x, labels)).scores
    part = build_attack("pia", {"batch_size": 256})(context(denoiser, x[[4, 1]], labels[[4, 1]], [4, 1])).scores
    np.testing.assert_allclose(part, full[[4, 1]], rtol=1e-5)


def test_conditions_are_required_checked_and_refused_where_they_do_not_belong(denoiser, records):
    x, labels = records
    t = torch.full((len(x),), 10)
    with pytest.raises(MiaGenError, match="class-conditional .*10 classes.*conditions=labels"):
        denoiser.epsilon(x, t)
    with pytest.raises(MiaGenError, match="class-conditional"):
        build_attack("pia")(context(denoiser, x, None))
    with pytest.raises(MiaGenError, match=r"shape \(6,\)"):
        denoiser.epsilon(x, t, labels.float())
    with pytest.raises(MiaGenError, match=r"\[0, 10\)"):
        denoiser.epsilon(x, t, labels + 5)
    with pytest.raises(MiaGenError, match="one condition per query record"):
        build_attack("pia")(context(denoiser, x, labels[:3]))
    unconditional = Denoiser(torch.nn.Conv2d(1, 1, 1), denoiser.alphas_cumprod, (1, SIZE, SIZE))
    with pytest.raises(MiaGenError, match="unconditional"):
        unconditional.epsilon(x, t, labels)


def test_guidance_needs_a_null_class_or_a_conditional_model(pipeline_dir):
    with pytest.raises(MiaGenError, match="no null class"):
        load_denoiser({"guidance_scale": 3.0}, pipeline_dir)
    with pytest.raises(MiaGenError, match="needs a conditional model"):
        Denoiser(torch.nn.Conv2d(1, 1, 1), torch.linspace(0.99, 0.1, 10), (1, SIZE, SIZE), guidance_scale=2.0)


# ---- DiT (diffusers' DiTTransformer2DModel): learned sigma, a null class, guidance -----------------


@pytest.fixture(scope="module")
def dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(1)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=1,
        sample_size=SIZE, patch_size=2, num_embeds_ada_norm=N_CLASSES, norm_num_groups=1).eval()


def dit_denoiser(dit, guidance_scale=1.0):
    from diffusers import DDPMScheduler

    return Denoiser.from_unet(dit, DDPMScheduler(num_train_timesteps=1000), guidance_scale=guidance_scale)


def test_a_dit_is_class_conditional_with_num_classes_as_its_null_label(dit):
    denoiser = dit_denoiser(dit)
    assert (denoiser.condition_kind, denoiser.num_classes, denoiser.null_class) == ("class", N_CLASSES, N_CLASSES)
    eps = denoiser.epsilon(torch.zeros(2, 1, SIZE, SIZE), torch.tensor([5, 5]), torch.tensor([0, 1]))
    assert eps.shape == (2, 1, SIZE, SIZE)  # the learned-sigma half is dropped


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pia_on_a_dit_equals_a_per_record_loop_with_guidance_written_out(dit, records, guidance_scale):
    x, labels = records
    denoiser = dit_denoiser(dit, guidance_scale)
    output = build_attack("pia", {"t": 200, "p": 2, "batch_size": 4})(context(denoiser, x, labels))
    expected = pia_loop(dit, denoiser.alphas_cumprod.tolist(), x, labels, 200, 2,
                        guidance=guidance_scale, null=N_CLASSES)
    np.testing.assert_allclose(output.scores, expected, rtol=1e-4)
    if guidance_scale != 1.0:  # guidance changes the prediction
        plain = build_attack("pia", {"t": 200, "p": 2})(context(dit_denoiser(dit), x, labels)).scores
        assert not np.allclose(plain, output.scores)


def test_a_dit_pipeline_directory_loads_as_a_latent_class_model_and_is_attacked_in_its_latent_space(
        tmp_path, dit, records):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline

    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(4,), latent_channels=1,
                        norm_num_groups=2, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), scaling_factor=0.5).eval()
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path))
    denoiser = load_denoiser({}, tmp_path)
    assert (denoiser.condition_kind, denoiser.num_classes, denoiser.null_class) == ("class", N_CLASSES, N_CLASSES)
    assert denoiser.latent is not None and denoiser.image_shape == denoiser.sample_shape == (1, SIZE, SIZE)
    x, labels = records
    with torch.no_grad():  # x0: the VAE posterior mean times scaling_factor, one record at a time
        latents = torch.cat([vae.encode(x[i : i + 1]).latent_dist.mean * 0.5 for i in range(len(x))])
    assert not torch.allclose(latents, x, atol=1e-2)  # a test that attacked the pixels would fail
    output = build_attack("pia", {"t": 200, "p": 4, "batch_size": 4})(context(denoiser, x, labels))
    expected = pia_loop(dit, denoiser.alphas_cumprod.tolist(), latents, labels, 200, 4)
    np.testing.assert_allclose(output.scores, expected, rtol=1e-4)


# ---- the Python API and the whole pipeline ---------------------------------------------------------


def test_the_api_passes_conditions(denoiser, records):
    from mia_gen.experiments import api

    x, labels = records
    scores = api.score("pia", x, denoiser=denoiser, conditions=labels.tolist())
    expected = pia_loop(denoiser.network, denoiser.alphas_cumprod.tolist(), x, labels, 200, 4)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_the_pipeline_conditions_a_class_model_on_the_records_labels(tmp_path):
    import csv

    from hydra import compose, initialize_config_dir

    from mia_gen.datasets import load_dataset
    from mia_gen.experiments.common import CONFIG_DIR
    from mia_gen.experiments.pipeline import Pipeline

    model_dir = tiny_class_unet_pipeline(tmp_path / "model")
    overrides = ["logger=none", "progress=false", "device=cpu", "utility.metric=none", "data.resolution=8",
                 "split.n_members=8", "split.n_non_members=8", "split.n_reference=0", "evaluation.n_bootstrap=20",
                 "model=diffusers", f"model.checkpoint={model_dir}", "attack=pia", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pipe = Pipeline(cfg, tmp_path / "run")
    pipe.run()
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "scores.csv")) if r["attack"] == "pia"]
    ids = np.array([int(r["record_id"]) for r in rows])
    records = load_dataset(cfg.data)
    denoiser = load_denoiser({}, model_dir)
    expected = pia_loop(denoiser.network, denoiser.alphas_cumprod.tolist(), records.get(ids),
                        records.labels[torch.as_tensor(ids)], 200, 4)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-4)

    # the queries' labels are part of the score key: relabelled records are never served cached scores
    attack = pipe.attacks()["pia"]
    key = pipe.attack_key("pia", attack)
    relabelled = Pipeline(cfg, tmp_path / "run-relabelled")
    relabelled.records.labels = (relabelled.records.labels + 1) % 10
    assert relabelled.attack_key("pia", attack) != key

    # a dataset without class labels cannot condition it
    images = tmp_path / "images.npy"
    np.save(images, (records.data[:40].numpy()))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        unlabelled = compose("config", overrides=[o for o in overrides if not o.startswith(("data.", "cache_dir"))]
                             + ["data=array", f"data.path={images}", f"cache_dir={tmp_path / 'cache2'}"])
    with pytest.raises(MiaGenError, match="class-conditional .* has no class labels"):
        Pipeline(unlabelled, tmp_path / "run2").run()
