"""GAN attacks beyond samples: latent inversion (wb / pbb), calibration, co-membership, LOGAN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mia_gen.attacks.base import AttackContext, build_attack
from mia_gen.attacks.co_membership import train_encoder
from mia_gen.attacks.latent_inversion import ReconstructionObjective, invert
from mia_gen import latent_search
from mia_gen.errors import MiaGenError
from mia_gen.models.dcgan import DCGANDiscriminator, DCGANGenerator
from mia_gen.models.memorizer import NoisyCopyGenerator

pytestmark = pytest.mark.usefixtures("single_thread")

L2_ONLY = {"lambda_lpips": 0.0}


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8).eval()


@pytest.fixture(scope="module")
def generated_and_far(generator):
    """4 images G made (z known) and 4 uniform-noise images no generator of this kind makes."""
    with torch.no_grad():
        made = generator(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))
    far = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return torch.cat([made, far])


def context(queries, generator, **fields):
    return AttackContext(queries=queries, record_ids=np.arange(len(queries)), generator=generator, **fields)


@pytest.mark.parametrize("name, params", [
    ("latent_inversion", {"optimizer": "lbfgs", "iterations": 60}),
    ("latent_inversion", {"optimizer": "adam", "iterations": 300, "lr": 0.05}),
    ("latent_inversion_pbb", {"search": "es", "generations": 150, "population": 16}),
])
def test_inversion_recovers_what_the_generator_made_and_not_a_far_image(generator, generated_and_far, name, params):
    attack = build_attack(name, {**L2_ONLY, **params, "init": "random", "restarts": 3, "lambda_z": 0.0})
    distance = -attack(context(generated_and_far, generator)).scores
    # generated: reconstruction error near zero; far: the mean squared error of the best fit stays large
    assert distance[:4].max() < 2e-3, distance
    assert distance[4:].min() > 0.1, distance


def test_powell_is_the_slow_per_query_reference(generator, generated_and_far):
    attack = build_attack("latent_inversion_pbb", {**L2_ONLY, "search": "powell", "max_iterations": 3,
                                                   "init": "zero", "lambda_z": 0.0})
    output = attack(context(generated_and_far[[0, 4]], generator))
    distance = -output.scores
    assert distance[0] < 0.02 and distance[1] > 0.1
    assert output.info["generator_queries_per_start"] > 100


@pytest.mark.parametrize("optimizer, iterations", [("lbfgs", 15), ("adam", 40)])
def test_batched_inversion_equals_a_per_target_loop(generator, generated_and_far, optimizer, iterations):
    objective = ReconstructionObjective(generator, generated_and_far, 0.0, 0.001)
    z0 = torch.randn(len(generated_and_far), 16, generator=torch.Generator().manual_seed(3))
    batched, z_batched, _ = invert(objective, z0, optimizer, iterations, 0.05, batch_size=64)
    for i in range(len(z0)):
        single = ReconstructionObjective(generator, generated_and_far[i : i + 1], 0.0, 0.001)
        distance, z, _ = invert(single, z0[i : i + 1], optimizer, iterations, 0.05, batch_size=64)
        assert torch.allclose(distance, batched[i : i + 1], rtol=1e-3, atol=1e-6), (i, distance, batched[i])
        assert torch.allclose(z, z_batched[i : i + 1], rtol=1e-2, atol=1e-3)


def test_lbfgs_matches_scipy_on_a_quadratic_per_target():
    """Independent quadratics: per-target L-BFGS reaches each target's exact minimiser."""
    a = torch.tensor([[1.0, 10.0, 100.0], [2.0, 0.5, 7.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]], dtype=torch.float64)
    result = latent_search.lbfgs(lambda z, rows: 0.5 * (a[rows] * (z - b[rows]) ** 2).sum(1),
                                 torch.zeros(2, 3, dtype=torch.float64), 50)
    assert torch.allclose(result.z, b, atol=1e-6)


def test_the_evolution_strategy_never_asks_for_gradients(generator, generated_and_far):
    calls = []

    def loss_fn(z, rows):
        assert not torch.is_grad_enabled()
        calls.append(len(z))
        return (z - 1.0).square().sum(1)

    result = latent_search.evolution_strategy(loss_fn, torch.zeros(3, 5), generations=60, population=8,
                                              generators=[torch.Generator().manual_seed(i) for i in range(3)])
    assert calls == [3] + [24] * 60 and result.evaluations == 1 + 60 * 8
    assert (result.z - 1).abs().max() < 0.1


def test_score_is_reconstruction_error_at_the_optimum_without_the_prior(generator, generated_and_far):
    """GAN-Leaks scores L2 (+ LPIPS); the norm regulariser only shapes the search."""
    objective = ReconstructionObjective(generator, generated_and_far, 0.0, 0.5)
    z = torch.randn(8, 16)
    with torch.no_grad():
        full = objective(z, torch.arange(8))
        plain = ((generator(z) - generated_and_far) ** 2).flatten(1).mean(1)
    assert torch.allclose(full, plain + 0.5 * (z.square().sum(1) - 16) ** 2)
    assert torch.allclose(objective.distance(generator(z), torch.arange(8)), plain)


def test_lpips_term_goes_through_the_real_lpips_code(generator, generated_and_far):
    from mia_gen.lpips_embedding import LPIPSEmbedding, lpips_pairwise

    with pytest.warns(UserWarning, match="RANDOM backbone"):
        embedding = LPIPSEmbedding(net="alex", resize=64, allow_random_backbone=True)
        reference = lpips_pairwise(generated_and_far[:4], generated_and_far[4:], net="alex", resize=64,
                                   allow_random_backbone=True)
    objective = ReconstructionObjective(generator, generated_and_far[4:], 0.2, 0.0, lpips=embedding)
    distance = objective.distance(generated_and_far[:4], torch.arange(4))
    l2 = ((generated_and_far[:4] - generated_and_far[4:]) ** 2).flatten(1).mean(1)
    assert torch.allclose(distance, l2 + 0.2 * reference, rtol=1e-4)


def test_memorised_records_are_found_by_inversion_and_independent_ones_are_not(tmp_path):
    """A memorising generator: members reconstruct (AUC ~ 1); trained on other records: chance.
    Its record index is not differentiable in z, so the search starts at the nearest samples (init=nn)."""
    from sklearn.datasets import load_digits

    from mia_gen.sample_store import write_samples

    digits = torch.tensor(load_digits().images[:400, None], dtype=torch.float32) / 8 - 1
    members, non_members, other = digits[:50], digits[50:100], digits[200:250]
    queries, labels = torch.cat([members, non_members]), np.r_[np.ones(50), np.zeros(50)]
    for trained_on, expected in ((members, "leak"), (other, "none")):
        memorizer = NoisyCopyGenerator(trained_on, noise_std=0.05)

        def sample_fn(n, rng, memorizer=memorizer):
            z = memorizer.sample_latent(n, rng)
            return memorizer(z), z

        store = write_samples(tmp_path / expected, sample_fn, 1000, shard_size=500, seed=0, progress=False)
        attack = build_attack("latent_inversion", {**L2_ONLY, "init": "nn", "restarts": 2, "iterations": 20})
        scores = attack(context(queries, memorizer, samples=store)).scores
        value = roc_auc_score(labels, scores)
        if expected == "leak":
            assert value >= 0.95, value
        else:
            assert 0.35 <= value <= 0.65, value


def test_nn_initialisation_reads_the_latents_of_the_nearest_samples(tmp_path, generator, generated_and_far):
    from mia_gen.sample_store import write_samples

    z_all = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))

    def sample_fn(n, rng):
        z = torch.randn(n, 16, generator=rng)
        with torch.no_grad():
            return generator(z), z

    store = write_samples(tmp_path / "store", sample_fn, 300, shard_size=100, seed=0, progress=False)
    assert len(z_all) == len(store)
    queries = store.get(np.array([7, 123]))
    attack = build_attack("latent_inversion", {**L2_ONLY, "init": "nn", "iterations": 1, "optimizer": "adam", "lr": 1e-9})
    distance = -attack(context(queries, generator, samples=store)).scores
    # started at the stored latents of the queries themselves: already reconstructed (up to uint8 storage)
    assert distance.max() < 1e-4


def test_calibration_is_the_difference_of_the_two_models_scores(generator, generated_and_far):
    torch.manual_seed(9)
    reference_generator = DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8).eval()
    params = {**L2_ONLY, "init": "zero", "iterations": 5}
    target_context = context(generated_and_far, generator)
    target_context.reference_model = context(generated_and_far, reference_generator)
    calibrated = build_attack("calibration", {"attack": "latent_inversion", "params": params})(target_context)
    inner = build_attack("latent_inversion", params)
    expected = inner(context(generated_and_far, generator)).scores - inner(context(generated_and_far, reference_generator)).scores
    np.testing.assert_allclose(calibrated.scores, expected, rtol=1e-6)
    assert calibrated.info["target_scores"] and calibrated.info["reference_scores"]


def test_calibration_without_a_reference_model_says_how_to_get_one(generator, generated_and_far):
    attack = build_attack("calibration", {"attack": "latent_inversion", "params": L2_ONLY})
    with pytest.raises(MiaGenError, match="reference model"):
        attack(context(generated_and_far, generator))
    with pytest.raises(MiaGenError, match="cannot wrap itself"):
        build_attack("calibration", {"attack": "calibration"})


def test_the_encoder_learns_to_invert_the_generator(generator):
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        x = generator(z)
    untrained, _ = train_encoder(generator, (1, 16, 16), 1, 128, 1e-3, 0, torch.device("cpu"))
    trained, mse = train_encoder(generator, (1, 16, 16), 400, 128, 2e-3, 0, torch.device("cpu"))
    with torch.no_grad():
        before, after = (untrained(x) - z).square().mean(), (trained(x) - z).square().mean()
    assert after < 0.5 * before, (before, after)


class Flat(torch.nn.Module):
    """A generator without a latent interface (no latent_dim / sample_latent)."""

    def forward(self, z):
        return z


def test_inversion_needs_a_generator_with_a_latent_interface(generated_and_far):
    for name in ("latent_inversion", "latent_inversion_pbb", "co_membership"):
        params = {**L2_ONLY, **({} if name == "co_membership" else {"init": "zero"})}
        with pytest.raises(MiaGenError, match="no latent interface"):
            build_attack(name, params)(context(generated_and_far, Flat()))
        with pytest.raises(MiaGenError, match="needs a model"):
            build_attack(name, params)(context(generated_and_far, None))


def test_inversion_settings_are_checked(generator, generated_and_far):
    with pytest.raises(MiaGenError, match="restarts"):
        build_attack("latent_inversion", {"init": "zero", "restarts": 2})(context(generated_and_far, generator))
    with pytest.raises(MiaGenError, match="unknown init"):
        build_attack("latent_inversion", {**L2_ONLY, "init": "mean"})(context(generated_and_far, generator))
    with pytest.raises(MiaGenError, match="lambda_z"):
        build_attack("latent_inversion", {"lambda_z": -1, "init": "zero"})(context(generated_and_far, generator))
    with pytest.raises(MiaGenError, match="store of generated samples"):
        build_attack("latent_inversion", {**L2_ONLY, "init": "nn"})(context(generated_and_far, generator))
    wrong_size = torch.zeros(2, 1, 32, 32)
    with pytest.raises(MiaGenError, match="data.resolution"):
        build_attack("latent_inversion", {**L2_ONLY, "init": "zero"})(context(wrong_size, generator))


def test_logan_white_box_is_the_discriminators_output(generated_and_far):
    torch.manual_seed(0)
    discriminator = DCGANDiscriminator(resolution=16, channels=1, base_channels=8).eval()
    output = build_attack("logan", {"mode": "white_box", "batch_size": 3})(
        AttackContext(queries=generated_and_far, record_ids=np.arange(8), discriminator=discriminator))
    with torch.no_grad():
        expected = discriminator(generated_and_far).double().numpy()
    np.testing.assert_allclose(output.scores, expected, rtol=1e-6)
    with pytest.raises(MiaGenError, match="black_box"):
        build_attack("logan", {})(AttackContext(queries=generated_and_far, record_ids=np.arange(8)))
    with pytest.raises(MiaGenError, match="unknown mode"):
        build_attack("logan", {"mode": "grey"})


def test_logan_black_box_shadow_gan_finds_a_memorisers_members(tmp_path):
    """Samples of a memoriser are noisy copies of its members: a shadow GAN's discriminator,
    trained on those samples only, rates members as more real than non-members."""
    from sklearn.datasets import load_digits

    from mia_gen.sample_store import write_samples

    digits = torch.tensor(load_digits().images[:200, None], dtype=torch.float32) / 8 - 1
    digits = torch.nn.functional.interpolate(digits, size=(16, 16), mode="bilinear").clamp(-1, 1)
    members, non_members = digits[:40], digits[100:140]
    memorizer = NoisyCopyGenerator(members, noise_std=0.05)

    def sample_fn(n, rng):
        z = memorizer.sample_latent(n, rng)
        return memorizer(z), z

    store = write_samples(tmp_path / "store", sample_fn, 4000, shard_size=2000, seed=0, progress=False)
    attack = build_attack("logan", {"mode": "black_box", "shadow_steps": 600, "shadow_base_channels": 16})
    assert attack.uses_samples and attack.access.value == "samples"
    queries = torch.cat([members, non_members])
    output = attack(AttackContext(queries=queries, record_ids=np.arange(80), samples=store))
    assert roc_auc_score(np.r_[np.ones(40), np.zeros(40)], output.scores) >= 0.8
