"""Text-to-image black-box: conditional sampling, a sample store drawn per caption, sample_distance per caption.

The samples are checked against a plain per-row DDIM loop written here on the Denoiser (its epsilon and the
DDIM update from `alphas_cumprod`), a latent model's output decoded by the raw diffusers VAE; the scores against
a plain loop: for each record, the smallest L2 distance to the samples of its own caption.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.datasets import load_dataset
from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.hashing import config_hash
from mia_gen.models.denoiser import Denoiser, load_denoiser
from mia_gen.models.diffusion_sampling import DiffusionSampler
from mia_gen.sample_store import InMemorySampleStore, SampleStore, write_samples
from tiny_pipelines import IMAGE_SIZE, N_CLASSES, tiny_class_unet, tiny_class_unet_pipeline, tiny_sd_pipeline

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

MEMBERS = [3, 17, 40, 58, 71, 99, 120, 133, 150, 171]
QUICK = ["logger=none", "progress=false", "device=cpu", "threads=1", "utility.metric=none",
         "evaluation.n_bootstrap=20", "evaluation.blind_baseline=false", "split.n_non_members=10",
         "split.n_reference=0", "seed=0"]
SD_DATA = ["data=digits", "data.captions=true", "data.channels=3", f"data.resolution={IMAGE_SIZE}"]
T2I = ["attack=sample_distance", "sampling.per_caption=2", "model.sampler.steps=2", "sampling.batch_size=3",
       "sampling.shard_size=4"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def members_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "members.txt"
    path.write_text("\n".join(map(str, MEMBERS)) + "\n")
    return path


def pipeline_config(overrides, cache_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache_dir}"])


def ddim_loop(denoiser, z_row, condition_row, steps):
    """x_0 of ONE row: DDIM (eta = 0, Song et al. eq. 12) from x_T = z_row, timesteps (steps-1)k, ..., k, 0."""
    abar = denoiser.alphas_cumprod.tolist()
    stride = len(abar) // steps
    timesteps = [(steps - 1 - i) * stride for i in range(steps)]
    x = z_row.double().view(1, *denoiser.sample_shape)
    for i, t in enumerate(timesteps):
        a_t, a_prev = abar[t], abar[timesteps[i + 1]] if i + 1 < steps else 1.0
        eps = denoiser.epsilon(x.float(), torch.tensor([t]), condition_row[None]).double()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x.float()


# ---- conditional sampling -----------------------------------------------------------------------------------


def test_text_samples_are_per_row_ddim_loops_in_latent_space_decoded_by_the_vae(sd_dir):
    from diffusers import AutoencoderKL

    denoiser = load_denoiser({"name": "diffusers"}, sd_dir, "cpu")
    vae = AutoencoderKL.from_pretrained(str(sd_dir), subfolder="vae").eval()
    sampler = DiffusionSampler(denoiser, "ddim", steps=4)
    captions = ["a handwritten digit 1", "a handwritten digit 7", "a handwritten digit 1", "a photo of the number 3"]
    z = sampler.sample_latent(4, torch.Generator().manual_seed(0))
    conditions = denoiser.text_conditions(captions)
    images = sampler(z, conditions)
    assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and sampler.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = torch.cat([vae.decode(ddim_loop(denoiser, z[r], conditions[r], 4) / vae.config.scaling_factor)
                              .sample.clamp(-1, 1) for r in range(4)])
    assert (expected.abs() < 0.99).float().mean() > 0.2  # not all saturated: the comparison means something
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)
    # the caption is really used: the same z under another caption is another image
    assert not torch.allclose(images[0], sampler(z[:1], denoiser.text_conditions(["a handwritten digit 7"]))[0],
                              atol=1e-3)


def test_class_samples_are_per_row_ddim_loops_under_each_rows_label():
    # a gentle schedule (abar >= 0.5): under Stable Diffusion's, the untrained network's samples all clip to +-1
    abar = torch.linspace(0.999, 0.5, 1000, dtype=torch.float64)
    denoiser = Denoiser(tiny_class_unet(), abar, (1, 8, 8), condition_kind="class", num_classes=N_CLASSES)
    sampler = DiffusionSampler(denoiser, "ddim", steps=5)
    labels = torch.tensor([0, 3, 3, 9, N_CLASSES - 1])
    z = sampler.sample_latent(5, torch.Generator().manual_seed(1))
    images = sampler(z, labels)
    expected = torch.cat([ddim_loop(denoiser, z[r], labels[r], 5).clamp(-1, 1) for r in range(5)])
    assert (expected.abs() < 0.99).float().mean() > 0.2
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(images[1], sampler(z[1:2], torch.tensor([4]))[0], atol=1e-3)


def test_a_conditional_ddpm_sample_depends_on_its_own_row_only(sd_dir):
    denoiser = load_denoiser({"name": "diffusers"}, sd_dir, "cpu")
    sampler = DiffusionSampler(denoiser, "ddpm", steps=3)
    z = sampler.sample_latent(5, torch.Generator().manual_seed(2))
    conditions = denoiser.text_conditions([f"a handwritten digit {k}" for k in (0, 1, 1, 4, 9)])
    whole = sampler(z, conditions)
    torch.testing.assert_close(torch.cat([sampler(z[:2], conditions[:2]), sampler(z[2:], conditions[2:])]), whole,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler(z.flip(0), conditions.flip(0)), whole.flip(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole, DiffusionSampler(denoiser, "ddim", steps=3)(z, conditions), atol=1e-3)


def test_a_text_model_sampled_without_captions_says_what_it_needs(sd_dir):
    sampler = DiffusionSampler(load_denoiser({"name": "diffusers"}, sd_dir, "cpu"), "ddim", steps=2)
    with pytest.raises(MiaGenError, match="text-conditioned"):
        sampler(sampler.sample_latent(2, torch.Generator().manual_seed(0)))


# ---- the store keeps each sample's caption ---------------------------------------------------------------------

CAPTIONS = ["b", "a", "a", "c", "b", "b", "a"]  # per sample, on purpose not sorted


def caption_sample_fn(calls):
    """x encodes the caption (its letter) and the shard's generator, so a wrong caption per row shows."""

    def sample_fn(n, generator, captions):
        calls.append(list(captions))
        noise = torch.rand(n, 1, 2, 2, generator=generator) * 0.1
        code = torch.tensor([(ord(c) - ord("a")) * 0.4 - 0.5 for c in captions]).view(n, 1, 1, 1)
        return code + noise, None

    return sample_fn


def test_a_store_drawn_from_captions_keeps_each_samples_caption_and_resumes_byte_for_byte(tmp_path):
    calls = []
    store = write_samples(tmp_path / "a", caption_sample_fn(calls), len(CAPTIONS), shard_size=3,
                          storage_dtype="float32", progress=False, captions=CAPTIONS)
    assert calls == [CAPTIONS[0:3], CAPTIONS[3:6], CAPTIONS[6:7]]  # each shard gets its rows' captions
    assert store.captions == ["a", "b", "c"]
    assert [store.captions[i] for i in store.caption_index()] == CAPTIONS
    x = store.get(np.arange(len(CAPTIONS)))
    codes = torch.tensor([(ord(c) - ord("a")) * 0.4 - 0.5 for c in CAPTIONS])
    assert torch.all((x.amin(dim=(1, 2, 3)) >= codes) & (x.amax(dim=(1, 2, 3)) <= codes + 0.1))
    assert sorted(p.name for p in store.path.glob("*.captions.npy")) == [f"shard_{i:05d}.captions.npy" for i in range(3)]

    # killed after the first shard, then resumed: the same bytes as the uninterrupted run
    class Killed(Exception):
        pass

    def killed_after_one(n, generator, captions, budget=[1]):
        if budget[0] == 0:
            raise Killed
        budget[0] -= 1
        return caption_sample_fn([])(n, generator, captions)

    with pytest.raises(Killed):
        write_samples(tmp_path / "b", killed_after_one, len(CAPTIONS), shard_size=3, storage_dtype="float32",
                      progress=False, captions=CAPTIONS)
    resumed = write_samples(tmp_path / "b", caption_sample_fn([]), len(CAPTIONS), shard_size=3,
                            storage_dtype="float32", progress=False, captions=CAPTIONS)
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert resumed.caption_index().tolist() == store.caption_index().tolist()


def test_a_damaged_caption_file_is_caught_and_rewritten(tmp_path):
    path = tmp_path / "store"
    write_samples(path, caption_sample_fn([]), len(CAPTIONS), shard_size=3, storage_dtype="float32",
                  progress=False, captions=CAPTIONS)
    original = (path / "shard_00001.captions.npy").read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 1  # same size: only the sha256 can tell
    (path / "shard_00001.captions.npy").write_bytes(bytes(damaged))
    with pytest.raises(CorruptStoreError, match="shard 1"):
        SampleStore.open(path).verify()
    (path / "shard_00001.captions.npy").unlink()
    with pytest.raises(CorruptStoreError, match="shard 1"):
        SampleStore.open(path)
    calls = []
    write_samples(path, caption_sample_fn(calls), len(CAPTIONS), shard_size=3, storage_dtype="float32",
                  progress=False, captions=CAPTIONS)
    assert calls == [CAPTIONS[3:6]]  # only the damaged shard is drawn again
    assert (path / "shard_00001.captions.npy").read_bytes() == original


def test_a_caption_store_is_not_resumed_with_other_captions_nor_without(tmp_path):
    path = tmp_path / "store"
    write_samples(path, caption_sample_fn([]), len(CAPTIONS), shard_size=3, storage_dtype="float32",
                  progress=False, captions=CAPTIONS)
    with pytest.raises(MiaGenError, match="different settings.*captions_hash"):
        write_samples(path, caption_sample_fn([]), len(CAPTIONS), shard_size=3, storage_dtype="float32",
                      progress=False, captions=CAPTIONS[::-1])
    with pytest.raises(MiaGenError, match="different settings.*captions_hash"):
        write_samples(path, lambda n, g: (torch.zeros(n, 1, 2, 2), None), len(CAPTIONS), shard_size=3,
                      storage_dtype="float32", progress=False)
    with pytest.raises(MiaGenError, match=r"one string per sample \(7 strings\), got 2"):
        write_samples(tmp_path / "other", caption_sample_fn([]), len(CAPTIONS), captions=["a", "b"], progress=False)


def test_a_store_without_captions_keeps_its_old_layout(tmp_path):
    store = write_samples(tmp_path / "store", lambda n, g: (torch.rand(n, 1, 2, 2, generator=g), None), 5,
                          shard_size=2, progress=False)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert "captions" not in manifest and "captions_hash" not in manifest
    assert all("captions" not in shard for shard in manifest["shards"])
    assert store.captions is None
    with pytest.raises(MiaGenError, match="not drawn from captions"):
        store.caption_index()


def test_an_in_memory_store_with_captions_reads_like_a_written_one(tmp_path):
    written = write_samples(tmp_path / "store", caption_sample_fn([]), len(CAPTIONS), shard_size=3,
                            storage_dtype="float32", progress=False, captions=CAPTIONS)
    memory = InMemorySampleStore(written.get(np.arange(len(CAPTIONS))), captions=CAPTIONS)
    assert memory.captions == written.captions
    assert memory.caption_index().tolist() == written.caption_index().tolist()


# ---- sample_distance per caption -------------------------------------------------------------------------------


def per_caption_loop(queries, query_captions, samples, sample_captions):
    """For each record: minus the smallest L2 distance to a sample of its own caption, and that sample's index."""
    scores, nearest = [], []
    for query, caption in zip(queries, query_captions):
        best = min((float(((query.double() - samples[j].double()) ** 2).sum().sqrt()), j)
                   for j in range(len(samples)) if sample_captions[j] == caption)
        scores.append(-best[0])
        nearest.append(best[1])
    return np.array(scores), np.array(nearest)


def caption_case(seed=0):
    rng = torch.Generator().manual_seed(seed)
    sample_captions = ["cat", "dog", "cat", "cow", "dog", "cat", "cow", "dog", "cat"]
    samples = torch.rand(len(sample_captions), 3, 4, 4, generator=rng) * 2 - 1
    query_captions = ["dog", "cat", "cow", "cat", "dog", "dog"]
    queries = torch.rand(len(query_captions), 3, 4, 4, generator=rng) * 2 - 1
    queries[0] = samples[0] + 0.01  # closest overall to a "cat" sample, but it is a "dog" record
    return queries, query_captions, samples, sample_captions


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_sample_distance_compares_each_record_with_the_samples_of_its_own_caption(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    queries, query_captions, samples, sample_captions = caption_case()
    store = InMemorySampleStore(samples, captions=sample_captions)
    context = AttackContext(queries=queries, record_ids=np.arange(len(queries)), samples=store,
                            captions=query_captions)
    out = build_attack("sample_distance", {"backend": backend})(context)
    expected, nearest = per_caption_loop(queries, query_captions, samples, sample_captions)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert out.neighbour_indices[:, 0].tolist() == nearest.tolist()  # indices into the whole store
    assert sample_captions[int(out.neighbour_indices[0, 0])] == "dog"
    # a record's score does not depend on which records are scored with it
    alone = build_attack("sample_distance", {"backend": backend})(AttackContext(
        queries=queries[2:3], record_ids=np.arange(1), samples=store, captions=query_captions[2:3]))
    np.testing.assert_allclose(alone.scores, expected[2:3], rtol=1e-6)


def test_the_python_api_matches_records_with_their_captions_samples():
    from mia_gen.experiments import api

    queries, query_captions, samples, sample_captions = caption_case()
    store = InMemorySampleStore(samples, captions=sample_captions)
    scores = api.score("sample_distance", queries, samples=store, captions=query_captions)
    np.testing.assert_allclose(scores, per_caption_loop(queries, query_captions, samples, sample_captions)[0],
                               rtol=1e-5, atol=1e-6)


def test_sample_distance_with_k_neighbours_per_caption_and_its_limits():
    queries, query_captions, samples, sample_captions = caption_case(1)
    store = InMemorySampleStore(samples, captions=sample_captions)
    context = AttackContext(queries=queries, record_ids=np.arange(len(queries)), samples=store,
                            captions=query_captions)
    out = build_attack("sample_distance", {"k": 2, "aggregate": "mean"})(context)
    for q, caption in enumerate(query_captions):
        rows = [j for j, c in enumerate(sample_captions) if c == caption]
        d = sorted(float((queries[q] - samples[j]).pow(2).sum().sqrt()) for j in rows)
        assert out.scores[q] == pytest.approx(-(d[0] + d[1]) / 2, rel=1e-5)
        assert set(out.neighbour_indices[q].tolist()) <= set(rows)
    with pytest.raises(MiaGenError, match="k=3 .* 2 samples"):  # "cow" has 2 samples
        build_attack("sample_distance", {"k": 3})(context)


def test_sample_distance_on_a_caption_store_needs_the_records_captions_and_samples_for_each():
    queries, query_captions, samples, sample_captions = caption_case()
    store = InMemorySampleStore(samples, captions=sample_captions)
    with pytest.raises(MiaGenError, match="records have no captions.*data.captions=true"):
        build_attack("sample_distance")(AttackContext(queries=queries, record_ids=np.arange(len(queries)),
                                                      samples=store))
    with pytest.raises(MiaGenError, match="1 record caption.*no samples.*'horse'"):
        build_attack("sample_distance")(AttackContext(queries=queries, record_ids=np.arange(len(queries)),
                                                      samples=store, captions=[*query_captions[:-1], "horse"]))


def test_sample_distance_on_a_store_without_captions_ignores_the_records_captions():
    queries, query_captions, samples, _ = caption_case()
    out = build_attack("sample_distance")(AttackContext(
        queries=queries, record_ids=np.arange(len(queries)), samples=InMemorySampleStore(samples),
        captions=query_captions))
    expected = [-min(float((q - s).pow(2).sum().sqrt()) for s in samples) for q in queries]
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5)


# ---- through the pipeline and the CLI --------------------------------------------------------------------------


def read_scores_csv(path):
    with open(path) as handle:
        return {int(row["record_id"]): float(row["score"]) for row in csv.DictReader(handle)
                if row["attack"] == "sample_distance"}


def test_the_cli_samples_a_text_to_image_model_per_caption_and_scores_each_record_against_its_own(
        sd_dir, members_file, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mia-gen"), *QUICK, *SD_DATA, "model=diffusers",
         f"model.checkpoint={sd_dir}", f"split.members_file={members_file}", *T2I, "sampling.n_samples=5",
         f"hydra.run.dir={run_dir}", f"cache_dir={cache}"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampling.n_samples=5 is ignored" in result.stdout + result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    (entry,) = results["attacks"]
    assert entry["attack"] == "sample_distance" and entry["n_members"] == 10 and entry["n_non_members"] == 10

    scored = read_scores_csv(run_dir / "scores.csv")
    ids = np.array(sorted(scored))
    assert len(ids) == 20 and set(MEMBERS) <= set(ids.tolist())
    records = load_dataset({"name": "digits", "captions": True, "channels": 3, "resolution": IMAGE_SIZE})
    captions = records.captions(ids)
    distinct = sorted(set(captions))
    assert len(distinct) > 3  # several captions, so a caption mix-up would show

    (store_dir,) = (cache / "samples").iterdir()
    store = SampleStore.open(store_dir)
    store.verify()
    assert len(store) == 2 * len(distinct) and store.n_shards == math.ceil(len(store) / 4)
    assert store.captions == distinct
    assert store.caption_index().tolist() == [i for i in range(len(distinct)) for _ in range(2)]
    samples = store.get(np.arange(len(store)))
    assert samples.shape == (len(store), 3, IMAGE_SIZE, IMAGE_SIZE)

    # the stored samples are the model's: row i drawn from its caption with the z the store kept
    denoiser = load_denoiser({"name": "diffusers"}, sd_dir, "cpu")
    sampler = DiffusionSampler(denoiser, "ddim", steps=2)
    for i in (0, len(store) - 1):
        z = store.get_latents([i])
        image = sampler(z, denoiser.text_conditions([store.captions[i // 2]]))
        assert (image - samples[i : i + 1]).abs().max() <= 0.5 / 127.5 + 1e-4  # the store keeps uint8

    assert results["metadata"]["samples"]["n_samples"] == len(store)
    sample_captions = [store.captions[i // 2] for i in range(len(store))]
    expected, _ = per_caption_loop(records.get(ids), captions, samples, sample_captions)
    np.testing.assert_allclose([scored[i] for i in ids], expected, rtol=1e-5, atol=1e-6)


def test_per_caption_sample_keys(sd_dir, members_file, tmp_path):
    base = [*QUICK, *SD_DATA, "model=diffusers", f"model.checkpoint={sd_dir}", f"split.members_file={members_file}",
            "attack=sample_distance"]
    unconditional = Pipeline(pipeline_config(base, tmp_path / "cache"), tmp_path / "run")
    cfg = unconditional.cfg.sampling
    # as before per_caption existed: the key of an unconditional store does not change
    assert unconditional.sample_key == config_hash({"train": unconditional.train_key, "sampling": {
        "n_samples": cfg.n_samples, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
        "storage_dtype": cfg.storage_dtype, "store": cfg.store}})

    def key(*overrides, captions=None):
        pipeline = Pipeline(pipeline_config([*base, *overrides], tmp_path / "cache"), tmp_path / "run")
        if captions is not None:
            pipeline.__dict__["prompt_captions"] = captions
        return pipeline.sample_key

    two = key("sampling.per_caption=2")
    assert two not in (unconditional.sample_key, key("sampling.per_caption=3"))
    assert two == key("sampling.per_caption=2", "sampling.n_samples=7")  # n_samples is ignored
    assert two != key("sampling.per_caption=2", captions=["a handwritten digit 1"])  # other captions, other store


@pytest.mark.parametrize("case,overrides,message", [
    ("no captions", ["data=digits", "data.channels=3", f"data.resolution={IMAGE_SIZE}", "sampling.per_caption=2"],
     r"sampling.per_caption=2 needs a caption per record.*data.captions=true"),
    ("not a count", [*SD_DATA, "sampling.per_caption=0"], r"sampling.per_caption must be a positive integer.*got 0"),
    ("a GAN", [*SD_DATA, "model=dcgan", "sampling.per_caption=2"], r"model=dcgan is a gan model without text"),
])
def test_per_caption_errors_say_what_to_do(case, overrides, message, sd_dir, members_file, tmp_path):
    model = [] if case == "a GAN" else ["model=diffusers", f"model.checkpoint={sd_dir}"]
    cfg = pipeline_config([*QUICK, *overrides, *model, f"split.members_file={members_file}",
                           "attack=sample_distance"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match=message):
        Pipeline(cfg, tmp_path / "run").sample()
    assert not (tmp_path / "cache" / "models").exists()  # refused before anything was trained or sampled


def test_per_caption_on_a_class_conditional_model_is_refused(members_file, tmp_path):
    model_dir = tiny_class_unet_pipeline(tmp_path / "unet")
    cfg = pipeline_config([*QUICK, "data=digits", "data.captions=true", "data.channels=1", "data.resolution=8",
                           "model=diffusers", f"model.checkpoint={model_dir}", f"split.members_file={members_file}",
                           "attack=sample_distance", "sampling.per_caption=2"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match=r"class-conditional; use a text-conditioned one.*per_caption=null"):
        Pipeline(cfg, tmp_path / "run").sample()
