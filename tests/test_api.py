"""The Python API (`mia_gen.score`, `evaluate`, `load_denoiser`, the in-memory sample store) against
direct `Attack` calls, on-disk stores, brute-force distances and the README's own example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import mia_gen
from mia_gen.attacks import Access, Attack, AttackContext, AttackOutput, build_attack
from mia_gen.errors import MiaGenError
from mia_gen.experiments import api
from mia_gen.sample_store import InMemorySampleStore, SampleStore, import_samples, write_samples

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = (1, 8, 8)

pytestmark = pytest.mark.usefixtures("single_thread")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def world():
    """40 queries (the first 20 copied, with noise, into 300 samples), 60 reference records."""
    queries, reference = images(40, 0), images(60, 1)
    noise = torch.randn(300, *SHAPE, generator=torch.Generator().manual_seed(2))
    samples = (queries[:20].repeat(15, 1, 1, 1) + 0.2 * noise).clamp(-1, 1)
    return queries, samples, reference


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, dropout=0.5)


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    """A tiny random UNet + DDPM scheduler, in memory and saved as a diffusers pipeline directory."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    path = tmp_path_factory.mktemp("pipeline")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return unet, scheduler, path


# ---- the in-memory sample store equals an on-disk store of the same samples ---------------------------


@pytest.mark.parametrize("storage_dtype", ["float32", "uint8"])
def test_in_memory_store_reads_like_the_store_on_disk(world, tmp_path, storage_dtype):
    _, samples, _ = world
    latents = torch.randn(len(samples), 5, generator=torch.Generator().manual_seed(3))
    on_disk = write_samples(tmp_path, lambda n, g: (samples[:n], latents[:n]), len(samples), shard_size=len(samples),
                            storage_dtype=storage_dtype, progress=False)
    memory = InMemorySampleStore(samples, latents, storage_dtype=storage_dtype)
    assert isinstance(memory, SampleStore)
    assert (len(memory), memory.sample_shape, memory.latent_dim) == (len(on_disk), on_disk.sample_shape, 5)
    order = np.array([299, 0, 17, 17, 150])
    assert torch.equal(memory.get(order), on_disk.get(order))
    assert torch.equal(memory.get_latents(order), on_disk.get_latents(order))
    for (s1, x1, z1), (s2, x2, z2) in zip(memory.iter_chunks(64, with_latents=True),
                                          on_disk.iter_chunks(64, with_latents=True), strict=True):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(z1, z2)


@pytest.mark.parametrize("name,params", [
    ("sample_distance", {}),
    ("sample_distance", {"k": 3, "aggregate": "mean", "chunk_size": 70}),
    ("monte_carlo", {"eps_samples": 50}),
    ("domias", {"n_components": 4}),
])
def test_attack_scores_from_memory_equal_scores_from_disk(world, tmp_path, name, params):
    queries, samples, reference = world
    on_disk = import_samples(tmp_path, samples, shard_size=128, storage_dtype="float32", progress=False)
    attack = build_attack(name, params)

    def direct(store):
        return attack.score(AttackContext(queries=queries, record_ids=np.arange(len(queries)), samples=store,
                                          reference=reference)).scores

    expected = direct(on_disk)
    np.testing.assert_array_equal(direct(InMemorySampleStore(samples)), expected)
    np.testing.assert_array_equal(api.score(attack, queries, samples=samples, reference=reference), expected)
    np.testing.assert_array_equal(api.score(attack, queries.numpy(), samples=str(tmp_path),
                                            reference=reference.numpy()), expected)


def test_in_memory_store_refuses_what_a_store_cannot_hold():
    with pytest.raises(MiaGenError, match="uint8"):
        InMemorySampleStore(torch.full((3, 1, 2, 2), 3.0), storage_dtype="uint8")
    with pytest.raises(MiaGenError, match="non-finite"):
        InMemorySampleStore(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(MiaGenError, match="leading axis"):
        InMemorySampleStore(torch.zeros(4))
    with pytest.raises(MiaGenError, match="one row per sample"):
        InMemorySampleStore(torch.zeros(4, 2), latents=torch.zeros(3, 2))
    with pytest.raises(MiaGenError, match="no latents"):
        InMemorySampleStore(torch.zeros(4, 2)).get_latents([0])


# ---- score: the same as a direct attack call --------------------------------------------------------


def test_score_is_the_attack_on_the_context_the_pipeline_would_build(world):
    queries, samples, _ = world
    attack = build_attack("sample_distance")
    expected = attack.score(AttackContext(queries=queries, record_ids=np.arange(40),
                                          samples=InMemorySampleStore(samples))).scores
    got = api.score("sample_distance", queries, samples=samples)
    assert got.dtype == np.float64 and got.shape == (40,)
    np.testing.assert_array_equal(got, expected)
    # brute force: minus the L2 distance to the nearest sample
    brute = -torch.cdist(queries.flatten(1).double(), samples.flatten(1).double()).min(dim=1).values.numpy()
    np.testing.assert_allclose(got, brute, rtol=1e-5)


@pytest.mark.parametrize("name,params", [("diffusion_loss", {"timesteps": [50, 200], "n_draws": 2}),
                                         ("pia", {})])
def test_white_box_score_through_load_denoiser_equals_the_unet_wrapped_directly(diffusion, name, params):
    from mia_gen.models.denoiser import Denoiser

    unet, scheduler, path = diffusion
    queries = images(12, 4)
    attack = build_attack(name, params)
    direct = Denoiser.from_unet(tiny_unet(), scheduler)
    expected = attack.score(AttackContext(queries=queries, record_ids=np.arange(12), denoiser=direct)).scores
    denoiser = api.load_denoiser(path, device="cpu")
    assert isinstance(denoiser, Denoiser) and not denoiser.training
    np.testing.assert_array_equal(api.score(attack, queries, denoiser=denoiser), expected)
    np.testing.assert_array_equal(mia_gen.score(attack, queries.numpy(), denoiser=denoiser, samples=images(3, 9)),
                                  expected)  # samples are not handed to a white-box attack


def test_record_ids_default_to_positions_and_seed_each_records_draws(diffusion):
    from mia_gen.models.denoiser import Denoiser

    _, scheduler, _ = diffusion
    denoiser = Denoiser.from_unet(tiny_unet(), scheduler)
    queries = images(8, 5)
    attack = build_attack("diffusion_loss", {"n_draws": 2})
    default = api.score(attack, queries, denoiser=denoiser)
    np.testing.assert_array_equal(default, api.score(attack, queries, denoiser=denoiser, record_ids=np.arange(8)))
    shifted = api.score(attack, queries, denoiser=denoiser, record_ids=np.arange(100, 108))
    assert not np.array_equal(default, shifted)
    expected = attack.score(AttackContext(queries=queries, record_ids=np.arange(100, 108), denoiser=denoiser)).scores
    np.testing.assert_array_equal(shifted, expected)
    # a record's score is its own: scoring it alone, under its id, gives the same number
    np.testing.assert_allclose(api.score(attack, queries[5:6], denoiser=denoiser, record_ids=[105]), shifted[5:6],
                               rtol=1e-6)  # float32 batch kernels


class SeesItsContext(Attack):
    """An unregistered query attack that keeps the context it was given."""

    name, access = "sees_its_context", Access.QUERY

    def score(self, context):
        self.context = context
        return AttackOutput(scores=np.zeros(len(context.queries)))


def test_score_runs_on_the_models_device_and_hands_only_what_the_access_allows(world):
    queries, samples, reference = world
    attack = SeesItsContext()
    on_meta = torch.nn.Linear(2, 2, device="meta")  # a device that is neither the default nor CPU
    api.score(attack, queries, generator=on_meta, samples=samples, reference=reference,
              denoiser=torch.nn.Linear(2, 2), record_ids=np.arange(5, 45))
    context = attack.context
    assert context.device == torch.device("meta") and context.generator is on_meta
    assert context.samples is None and context.reference is None and context.denoiser is None
    np.testing.assert_array_equal(context.record_ids, np.arange(5, 45))
    api.score(attack, queries, generator=torch.nn.Linear(2, 2), device="cpu")
    assert attack.context.device == torch.device("cpu")
    with pytest.raises(MiaGenError, match="generator="):
        api.score(attack, queries)


# ---- errors name the Python argument -----------------------------------------------------------------


@pytest.mark.parametrize("call,argument,hydra", [
    (lambda q, s, r: api.score("sample_distance", q), "samples=", "sampling.store"),
    (lambda q, s, r: api.score("domias", q, samples=s), "reference=", "split.n_reference"),
    (lambda q, s, r: api.score("diffusion_loss", q, samples=s), "denoiser=", "model.checkpoint"),
    (lambda q, s, r: api.score("pia", q, generator=torch.nn.Linear(1, 1)), "denoiser=", "model.checkpoint"),
    (lambda q, s, r: api.score("latent_inversion_pbb", q, samples=s), "generator=", "model.checkpoint"),
    (lambda q, s, r: api.score(build_attack("logan", {"mode": "white_box"}), q), "discriminator=", "model.checkpoint"),
    (lambda q, s, r: api.score("secmi_nn", q, denoiser=torch.nn.Linear(1, 1)), "labelled_subset=",
     "evaluation.labelled_fraction"),
    (lambda q, s, r: api.score(build_attack("co_membership", {"group_sizes": [2]}), q, generator=torch.nn.Linear(1, 1)),
     "groups=", "group_sizes"),
    (lambda q, s, r: api.score("calibration", q, samples=s), "subtract", "reference_checkpoint"),
])
def test_a_missing_input_names_the_keyword_argument_and_the_hydra_key(world, call, argument, hydra):
    queries, samples, reference = world
    with pytest.raises(MiaGenError) as error:
        call(queries, samples, reference)
    assert argument in str(error.value) and hydra in str(error.value)


def test_bad_inputs_are_refused_with_the_fix(world):
    queries, samples, _ = world
    with pytest.raises(MiaGenError, match="record_ids must be 40 integers"):
        api.score("sample_distance", queries, samples=samples, record_ids=np.arange(39))
    with pytest.raises(MiaGenError, match="distinct"):
        api.score("sample_distance", queries, samples=samples, record_ids=np.zeros(40, dtype=int))
    with pytest.raises(MiaGenError, match="leading axis"):
        api.score("sample_distance", queries[0, 0, 0], samples=samples)
    with pytest.raises(MiaGenError, match="127.5"):
        api.score("sample_distance", (queries * 127.5 + 127.5).to(torch.uint8), samples=samples)
    with pytest.raises(MiaGenError, match="127.5"):
        api.score("sample_distance", queries, samples=(samples * 127.5 + 127.5).to(torch.uint8).numpy())
    with pytest.raises(MiaGenError, match="samples must be a tensor"):
        api.score("sample_distance", queries, samples=[1, 2])
    with pytest.raises(MiaGenError, match="unknown attack 'nope'"):
        api.score("nope", queries)
    with pytest.raises(MiaGenError, match="has no parameter"):
        api.build_attack("pia", timestep_typo=3)


def test_a_bare_unet_directory_needs_betas(diffusion, tmp_path):
    unet, _, _ = diffusion
    unet.save_pretrained(tmp_path)
    with pytest.raises(MiaGenError, match="betas="):
        api.load_denoiser(tmp_path, device="cpu")
    betas = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    denoiser = api.load_denoiser(tmp_path, device="cpu", betas=betas)
    assert denoiser.num_train_timesteps == 1000 and denoiser.sample_shape == SHAPE


def test_load_generator_rebuilds_a_saved_gan(tmp_path):
    from mia_gen.models.checkpoint import save_module
    from mia_gen.models.dcgan import DCGANGenerator

    torch.manual_seed(0)
    generator = DCGANGenerator(8, 16, 1, 8).eval()
    save_module(generator, tmp_path, "generator")
    loaded = api.load_generator(tmp_path, device="cpu")
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z), generator(z))


# ---- evaluate --------------------------------------------------------------------------------------


def test_evaluate_is_auc_and_tpr_at_low_fpr():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(200)]
    scores = labels + rng.normal(size=250)
    result = api.evaluate(torch.from_numpy(scores), labels, alphas=(0.1, 0.01), n_bootstrap=200)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    low, high = result["ci95"]["auc"]
    assert low < result["auc"] < high
    # largest TPR among thresholds with FPR <= 10%: count members above the 21st highest non-member
    threshold = np.sort(scores[labels == 0])[::-1][20]
    assert result["tpr_at_fpr"]["0.1"] == pytest.approx(np.mean(scores[labels == 1] > threshold))
    assert set(result["tpr_at_fpr"]) == {"0.1", "0.01"}


# ---- the README's "Use from Python" runs as written ---------------------------------------------------


def readme_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Use from Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_use_from_python_runs_and_finds_the_leak(tmp_path, monkeypatch, capsys):
    blocks = readme_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    queries, samples, is_member = namespace["queries"], namespace["samples"], namespace["is_member"]
    # the leak, measured without mia-gen: minus the distance to the nearest generated sample
    nearest = torch.cdist(queries.flatten(1).double(), samples.flatten(1).double()).min(dim=1).values
    auc = roc_auc_score(is_member, -nearest.numpy())
    assert auc > 0.9
    assert namespace["results"]["sample_distance"]["auc"] == pytest.approx(auc)
    assert f"sample_distance: AUC {auc:.3f}" in printed
    assert namespace["results"]["domias"]["auc"] > 0.9
    assert "diffusion_loss: AUC" in printed
    assert not list(tmp_path.iterdir())  # writes nothing into the working directory


# ---- import mia_gen stays cheap -------------------------------------------------------------------


def test_import_mia_gen_imports_no_higher_layer_and_resolves_the_api_lazily():
    code = (
        "import sys, mia_gen\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('mia_gen.attacks', 'mia_gen.experiments',"
        " 'mia_gen.models')) or m in ('torch', 'diffusers', 'hydra'))\n"
        "assert not loaded, loaded\n"
        "assert {'score', 'evaluate', 'load_denoiser', 'InMemorySampleStore'} <= set(dir(mia_gen))\n"
        "score = mia_gen.score\n"
        "import mia_gen.experiments.api as api\n"
        "assert score is api.score and mia_gen.build_attack is api.build_attack\n"
        "from mia_gen import InMemorySampleStore, SampleStore, MiaGenError\n"
        "import mia_gen.sample_store as store, mia_gen.errors as errors\n"
        "assert InMemorySampleStore is store.InMemorySampleStore and MiaGenError is errors.MiaGenError\n"
        "assert all(getattr(mia_gen, name) is not None for name in mia_gen.__all__)\n"
        "try:\n    mia_gen.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_text_to_image_model_is_scored_under_the_records_captions(tmp_path):
    from tiny_pipelines import tiny_sd_pipeline

    from mia_gen.experiments.api import load_denoiser, score

    denoiser = load_denoiser(tiny_sd_pipeline(tmp_path / "sd"))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"a handwritten digit {k}" for k in range(4)]
    embedded = score("diffusion_loss", images, denoiser=denoiser, conditions=denoiser.text_conditions(captions))
    np.testing.assert_array_equal(score("diffusion_loss", images, denoiser=denoiser, captions=captions), embedded)
    other = score("diffusion_loss", images, denoiser=denoiser, captions=captions[::-1])
    assert not np.allclose(other, embedded)  # the caption is the model's input
    with pytest.raises(MiaGenError, match="one caption per record"):
        score("diffusion_loss", images, denoiser=denoiser, captions=captions[:3])


def test_shadow_attacks_are_refused_with_where_to_run_them():
    from mia_gen.experiments.api import score

    with pytest.raises(MiaGenError, match="zoo of shadow models.*zoo.n_shadows"):
        score("lira", torch.zeros(2, 1, 8, 8), denoiser=torch.nn.Identity())


def test_inputs_a_hostile_caller_gives_are_refused_before_any_scoring(world):
    """Each was a traceback, a silent split into characters or a silently biased score."""
    queries, samples, reference = world
    with pytest.raises(MiaGenError, match="seed must be an integer"):
        mia_gen.score("sample_distance", queries, samples=samples, seed="x")
    with pytest.raises(MiaGenError, match="not a single string"):
        mia_gen.score("sample_distance", queries, samples=samples, captions="a digit")
    with pytest.raises(MiaGenError, match="reference records have shape"):
        mia_gen.score("domias", queries, samples=samples, reference=reference[:, :, :4])
    with pytest.raises(MiaGenError, match="NaN or infinite"):
        mia_gen.score("domias", queries, samples=samples, reference=torch.full_like(reference, float("nan")))
    with pytest.raises(MiaGenError, match=r"in \[-1, 1\].*2 \* x - 1"):
        mia_gen.score("sample_distance", (queries + 1) * 127.5, samples=samples)
    with pytest.raises(MiaGenError, match="equal scored records"):
        mia_gen.score("domias", queries, samples=samples, reference=torch.cat([reference, queries[:3]]))
    table = queries.flatten(1)[:, :6] * 10  # a table: any range; a shared row is a warning (may be two people)
    with pytest.warns(UserWarning, match="identical table rows"):
        mia_gen.score(build_attack("domias", {"n_components": 3}), table, samples=samples.flatten(1)[:, :6] * 10,
                      reference=torch.cat([reference.flatten(1)[:, :6] * 10, table[:1]]))
