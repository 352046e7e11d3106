"""Batch invariance (DESIGN.md): a record's score never depends on which records share its batch.

Every registered attack scores the same eight records all in one call, and again in two disjoint
calls (each record with other neighbours), at two settings of its batch size; each record's score
must be the same. Per-record randomness is a function of (seed, record id), so the record ids, not
the positions in a call, travel with the records. Attacks that learn from a labelled subset get the
same labelled records (by id) in every call.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from mia_gen.attacks import ATTACKS, AttackContext, build_attack
from mia_gen.sample_store import write_samples
from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator
from mia_gen.models.denoiser import Denoiser
from test_diffusion_attacks import UNetDenoiser

pytestmark = pytest.mark.usefixtures("single_thread")

RECORD_IDS = np.array([2, 5, 11, 17, 23, 30, 41, 58])  # dataset ids of the eight query records
CALLS = ([0, 3, 4, 6], [1, 2, 5, 7])  # the split batching: positions scored in each call
LABELLED, LABELS = [1, 2, 5, 6], [1, 0, 1, 0]  # the labelled subset, for attacks that learn (in every call)
SEED = 7
CONTEXT_FIELDS = {f.name for f in dataclasses.fields(AttackContext)} - {"captions"}  # the rest of a World's fields build views
# A zoo of 4 shadows over the eight records, each record IN two of them (balanced, as mia_gen.zoo draws it).
SHADOW_MEMBERSHIP = np.array([[1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0],
                              [0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0, 1, 1]], dtype=bool)
POPULATION_IDS = np.array([100, 101, 102, 103, 104])


class World:
    """The queries and what the attacks may see of one model; `context(positions)` holds the records at
    those positions (in record-id order, as the pipeline gives them) and everything else unchanged."""

    def __init__(self, queries, **fields):
        self.queries, self.fields = queries, fields

    def context(self, positions, attack) -> AttackContext:
        positions = np.asarray(positions)
        context = AttackContext(queries=self.queries[positions], record_ids=RECORD_IDS[positions], seed=SEED,
                                **{k: v for k, v in self.fields.items() if k in CONTEXT_FIELDS})
        if "captions" in self.fields:  # a caption travels with its record
            context.captions = [self.fields["captions"][p] for p in positions]
        if attack.needs_labelled_subset:
            where = [int(np.flatnonzero(positions == p)[0]) for p in LABELLED]
            context.labelled_subset = (np.array(where), np.array(LABELS))
        if attack.group_draw() is not None:  # co-membership: its per-record scores are tested here
            sizes, _ = attack.group_draw()
            context.groups = {n: np.arange(len(positions) // n * n).reshape(-1, n) for n in sizes}
        if "reference_generator" in self.fields:
            context.reference_model = AttackContext(queries=context.queries, record_ids=context.record_ids,
                                                    generator=self.fields["reference_generator"], seed=SEED)
        if attack.needs_shadow_models:  # the same records through each shadow, with the zoo's IN/OUT columns
            shadows = self.fields["shadows"]
            context.shadow_models = [AttackContext(queries=context.queries, record_ids=context.record_ids,
                                                   denoiser=shadow, seed=SEED) for shadow in shadows]
            context.shadow_membership = SHADOW_MEMBERSHIP[:, positions]
            context.shadow_indices = list(range(len(shadows)))
            if attack.needs_population:  # the population records z stay the same in every call
                context.population = self.population(self.fields["denoiser"])
                for view, shadow in zip(context.shadow_models, shadows):
                    view.population = self.population(shadow)
        return context

    def population(self, denoiser) -> AttackContext:
        return AttackContext(queries=self.fields["population"], record_ids=POPULATION_IDS, denoiser=denoiser,
                             seed=SEED)


def tiny_dcgan(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=4).eval(),
                DCGANDiscriminator(resolution=16, channels=1, base_channels=4).eval())


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    """A tiny DCGAN, a reference DCGAN, 200 generated samples with latents, 40 reference records;
    queries: four images the generator made and four it did not."""
    generator, discriminator = tiny_dcgan(0)
    reference_generator, _ = tiny_dcgan(1)

    def sample_fn(n, rng):
        z = generator.sample_latent(n, rng)
        with torch.no_grad():
            return generator(z), z

    store = write_samples(tmp_path_factory.mktemp("gan") / "store", sample_fn, 200, shard_size=100, seed=0,
                          storage_dtype="float32", progress=False)
    with torch.no_grad():
        made = generator(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
        reference = generator(torch.randn(40, 8, generator=torch.Generator().manual_seed(3)))
    other = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    reference = (reference + 0.1 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(4)))
    return World(torch.cat([made, other])[[0, 4, 1, 5, 2, 6, 3, 7]], generator=generator,
                 discriminator=discriminator, samples=store, reference=reference.clamp(-1, 1),
                 reference_generator=reference_generator)


def as_denoiser(unet: UNetDenoiser) -> Denoiser:
    """The tiny UNet behind the real `Denoiser`, which calls its network on batches of one fixed shape: CPU
    kernels take other paths for other batch shapes (an AMD EPYC below 16 rows, an Intel Xeon for one row),
    and the t-error's cancellation, a classifier trained on t-error maps or LiRA's Gaussian fit amplify that
    rounding far beyond any tolerance (secmi_nn: 2.5% relative)."""
    return Denoiser(unet.unet, unet.alphas_cumprod, unet.sample_shape)


def perturbed_unet(seed: int) -> UNetDenoiser:
    """The tiny UNet with its weights moved by seeded noise: another model of the same kind (a shadow)."""
    denoiser = UNetDenoiser()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return denoiser


@pytest.fixture(scope="module")
def diffusion():
    """A tiny, untrained diffusers UNet (8 px), four shadows of it, eight random images and five population
    records."""
    queries = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    population = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    return World(queries, denoiser=as_denoiser(UNetDenoiser()), population=population,
                 shadows=[as_denoiser(perturbed_unet(seed)) for seed in range(4)])


@pytest.fixture(scope="module")
def diffusion_gradients():
    """The same world with the bare UNets: GSA differentiates the model's parameters (its vmapped calls hold
    one record's timesteps, never a batch of one when it scores two or more timesteps)."""
    queries = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return World(queries, denoiser=UNetDenoiser(), shadows=[perturbed_unet(seed) for seed in range(4)])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A tiny Stable Diffusion pipeline (random weights, 16 px RGB records, 4x8x8 latents) and eight captioned
    random images."""
    from tiny_pipelines import tiny_sd_pipeline

    from mia_gen.models.denoiser import load_denoiser

    denoiser = load_denoiser({}, tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline"), "cpu")
    queries = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    captions = [f"a handwritten digit {i}" for i in range(8)]
    return World(queries, denoiser=denoiser, captions=captions)


L2 = {"lambda_lpips": 0.0}
RANDOM_STARTS = {**L2, "init": "random", "restarts": 2}
# (attack, parameters, world, the batch-size setting or None, its two values)
CASES = [
    ("latent_inversion", {**RANDOM_STARTS, "iterations": 4}, "gan", "batch_size", (64, 3)),
    ("latent_inversion", {**L2, "init": "nn", "restarts": 2, "optimizer": "adam", "iterations": 4}, "gan",
     "batch_size", (64, 5)),
    ("latent_inversion_pbb", {**RANDOM_STARTS, "generations": 6, "population": 6}, "gan", "batch_size", (64, 3)),
    ("latent_inversion_pbb", {**L2, "init": "nn", "generations": 6, "population": 4}, "gan", "batch_size", (64, 5)),
    ("calibration", {"attack": "latent_inversion_pbb",
                     "params": {**RANDOM_STARTS, "generations": 4, "population": 4}}, "gan", "batch_size", (64, 3)),
    ("co_membership", {**L2, "group_sizes": [1], "n_groups": 4, "encoder_steps": 3, "encoder_batch_size": 16,
                       "refine_steps": 1, "iterations": 3}, "gan", "batch_size", (64, 3)),
    ("logan", {"mode": "white_box"}, "gan", "batch_size", (64, 3)),
    ("logan", {"mode": "black_box", "shadow_samples": 64, "shadow_steps": 2, "shadow_batch_size": 16,
               "shadow_latent_dim": 8, "shadow_base_channels": 4}, "gan", "batch_size", (64, 3)),
    ("sample_distance", {"k": 3, "aggregate": "mean"}, "gan", "chunk_size", (256, 7)),
    ("monte_carlo", {"variant": "log"}, "gan", "chunk_size", (256, 7)),
    ("monte_carlo", {"eps_method": "percentile", "eps_percentile": 5.0, "eps_samples": 50}, "gan", "chunk_size",
     (256, 7)),
    ("monte_carlo", {"features": "pca", "n_components": 4}, "gan", "chunk_size", (256, 7)),
    ("domias", {"n_components": 3}, "gan", None, ()),
    ("diffusion_loss", {"timesteps": [10, 50], "n_draws": 2}, "diffusion", "batch_size", (64, 3)),
    ("pia", {"t": 20}, "diffusion", "batch_size", (64, 3)),
    ("pian", {"t": 20}, "diffusion", "batch_size", (64, 3)),
    ("secmi_stat", {"t_sec": 20, "k": 10}, "diffusion", "batch_size", (64, 3)),
    ("secmi_nn", {"t_sec": 20, "k": 10, "nn_epochs": 2, "nn_batch_size": 4}, "diffusion", "batch_size", (64, 3)),
    ("lira", {"attack": "diffusion_loss", "params": {"timesteps": [10, 50], "n_draws": 2}}, "diffusion",
     "batch_size", (64, 3)),
    # (global_variance pools one variance over the records scored together, as LiRA's code does: not per record)
    ("lira", {"attack": "pia", "params": {"t": 20}, "mode": "offline"}, "diffusion", "batch_size", (64, 3)),
    ("rmia", {"attack": "diffusion_loss", "params": {"timesteps": [10, 50], "n_draws": 2}}, "diffusion",
     "batch_size", (64, 3)),
    ("gsa", {"timesteps": [10, 50], "n_estimators": 5}, "diffusion_gradients", "batch_size", (16, 3)),
    # (a given alpha scales the features over the records scored together, as CLiD's code does; chosen on the
    # labelled subset, which every call holds, the score is the record's own)
    ("clid", {}, "text", "batch_size", (64, 3)),
]


# Scores held to a tolerance instead of bit-equality, with the reason. Every network call runs on batches of one
# fixed shape (mia_gen/fixed_batches.py), so every other attack's scores are bit-identical however the records are
# batched; Monte Carlo counts samples within eps of squared distances from a BLAS matrix product whose blocking
# follows the number of queries in a chunk (1e-6 relative, log weights near eps; nothing learns from them).
TOLERANCES = {"monte_carlo": {"rtol": 1e-5, "atol": 1e-7}}
# Attacks that learn from every record scored together, as their reference code does: GSA's classifier trains on
# the shadows' rows of the scored records (the pipeline scores all evaluated records in one call), so scoring
# other records changes what it learns. What `batch_size` (records per vmapped gradient) can change is each
# record's features, from which the classifier is deterministic (eight records are too few rows for the trees to
# split: its scores are flat). Every vmapped call holds exactly `batch_size` records, so at one batch size a
# record's features are bit-identical in every split of the records; across batch sizes the vmapped kernels'
# shapes differ and the features agree to float rounding (up to ~1e-6 relative, measured on an AMD EPYC).
POOLED = {"gsa": lambda attack, context: attack.features(context, [10, 50], "target", scaled=False)}


def with_batch_size(name: str, params: dict, key, value) -> dict:
    """The parameters with the batch-size setting at `value` (a wrapping attack's inner one for calibration)."""
    if key is None:
        return params
    if name in ("calibration", "lira", "rmia"):  # wrapping attacks: the wrapped attack's batch size
        return {**params, "params": {**params["params"], key: value}}
    return {**params, key: value}


def test_every_registered_attack_is_checked():
    assert {case[0] for case in CASES} == set(ATTACKS)


@pytest.mark.parametrize("name, params, world, key, sizes", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_records_score_does_not_depend_on_its_batch(request, name, params, world, key, sizes):
    world = request.getfixturevalue(world)
    attacks = [build_attack(name, with_batch_size(name, params, key, size)) for size in sizes or (None,)]
    everything = np.arange(len(RECORD_IDS))
    if name in POOLED:  # the per-record part: bit-identical in any split at one batch size, to rounding across
        for attack in attacks:
            per_record = POOLED[name](attack, world.context(everything, attack))
            for call in CALLS:
                np.testing.assert_array_equal(POOLED[name](attack, world.context(np.asarray(call), attack)),
                                              per_record[np.asarray(call)], err_msg=f"{name} {attack.config}")
            # (atol: the attention key bias's gradient is zero in exact arithmetic, its value rounding noise)
            np.testing.assert_allclose(per_record, POOLED[name](attacks[0], world.context(everything, attacks[0])),
                                       rtol=1e-5, atol=1e-6 * np.abs(per_record).max(),
                                       err_msg=f"{name}: batch sizes {sizes}")
        return
    together = attacks[0](world.context(everything, attacks[0])).scores
    assert len(np.unique(together)) > 1, f"{name}: every record scored alike; the check would be vacuous"
    for attack in attacks:
        for call in CALLS:
            positions = np.union1d(call, LABELLED) if attack.needs_labelled_subset else np.asarray(call)
            scores = attack(world.context(positions, attack)).scores
            message = f"{name} {attack.config}: records {RECORD_IDS[positions]}"
            if name in TOLERANCES:
                np.testing.assert_allclose(scores, together[positions], **TOLERANCES[name], err_msg=message)
            else:
                np.testing.assert_array_equal(scores, together[positions], err_msg=message)
