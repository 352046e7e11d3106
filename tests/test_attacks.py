"""Each sample-based attack against a plain per-record reference, and against real signal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from mia_gen.attacks import ATTACKS, Access, AttackContext, build_attack
from mia_gen.errors import MiaGenError
from mia_gen.datasets import load_dataset
from mia_gen.kde import GaussianKDE
from mia_gen.sample_store import write_samples
from mia_gen.models.memorizer import NoisyCopyGenerator


def store_from(path, generator, n_samples, seed=0, storage_dtype="float32"):
    def sample_fn(n, rng):
        z = generator.sample_latent(n, rng)
        with torch.no_grad():
            return generator(z), z

    return write_samples(path, sample_fn, n_samples, shard_size=max(n_samples // 3, 1), seed=seed,
                         storage_dtype=storage_dtype, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits", "resolution": 16, "channels": 1})


@pytest.fixture(scope="module")
def partition(digits):
    """Disjoint members / non-members / reference / records only an independent model saw."""
    order = np.random.default_rng(0).permutation(len(digits))
    return {"members": order[:150], "non_members": order[150:300], "reference": order[300:800],
            "independent": order[800:1300]}


def context_for(digits, partition, samples, reference=True):
    ids = np.sort(np.concatenate([partition["members"], partition["non_members"]]))
    return AttackContext(queries=digits.get(ids), record_ids=ids, samples=samples,
                         reference=digits.get(partition["reference"]) if reference else None)


def auc_of(output, context, partition):
    labels = np.isin(context.record_ids, partition["members"]).astype(int)
    return roc_auc_score(labels, output.scores)


# ---- plain references ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """12 queries, 300 generated samples, 40 reference records of dimension 6 (tabular)."""
    rng = torch.Generator().manual_seed(3)
    data = torch.randn(400, 6, generator=rng)
    generator = NoisyCopyGenerator(data[:30], noise_std=0.3, clip=False)
    store = store_from(tmp_path_factory.mktemp("small") / "store", generator, 300)
    queries = torch.cat([data[:6], data[100:106]])
    return AttackContext(queries=queries, record_ids=np.arange(12), samples=store,
                         reference=data[200:240])


def all_distances(context):
    samples = context.samples.get(np.arange(len(context.samples))).double()
    queries = context.queries.double()
    return np.array([[float(torch.sqrt(((q - s) ** 2).sum())) for s in samples] for q in queries])


@pytest.mark.parametrize("k,aggregate", [(1, "min"), (5, "min"), (5, "mean")])
def test_sample_distance_equals_a_loop(small_case, k, aggregate):
    output = build_attack("sample_distance", {"k": k, "aggregate": aggregate})(small_case)
    distances = np.sort(all_distances(small_case), axis=1)[:, :k]
    expected = -(distances[:, 0] if aggregate == "min" else distances.mean(axis=1))
    np.testing.assert_allclose(output.scores, expected, rtol=1e-5, atol=1e-6)
    assert output.neighbour_indices.shape == (12, k)


@pytest.mark.parametrize("variant", ["eps", "log", "frac"])
@pytest.mark.parametrize("eps_method", ["median", "percentile", "fixed"])
def test_monte_carlo_equals_a_loop(small_case, variant, eps_method):
    params = {"variant": variant, "eps_method": eps_method, "eps": 2.0, "eps_percentile": 5.0, "eps_samples": 100}
    output = build_attack("monte_carlo", params)(small_case)
    distances = all_distances(small_case)
    # the heuristics read generated samples only: each of the first eps_samples against the other samples
    samples = small_case.samples.get(np.arange(len(small_case.samples))).double()
    between = torch.cdist(samples[:100], samples).numpy()
    others = ~np.eye(100, len(samples), dtype=bool)
    eps = {"median": np.median(np.where(others, between, np.inf).min(axis=1)), "fixed": 2.0,
           "percentile": np.percentile(between[others], 5.0)}[eps_method]
    assert output.info["eps"] == pytest.approx(eps, rel=1e-5)
    expected = []
    for row in distances:
        total = 0.0
        for d in row:
            if d <= eps:
                total += {"eps": 1.0, "log": -np.log(max(d, 1e-12) / eps), "frac": 1 - d / eps}[variant]
        expected.append(total / len(row))
    np.testing.assert_allclose(output.scores, expected, rtol=1e-4, atol=1e-6)


def test_monte_carlo_pca_features_fitted_on_reference(small_case):
    output = build_attack("monte_carlo", {"features": "pca", "n_components": 3, "eps": 1.0,
                                          "eps_method": "fixed"})(small_case)
    pca = PCA(3, svd_solver="full").fit(small_case.reference.numpy())
    q = pca.transform(small_case.queries.numpy())
    s = pca.transform(small_case.samples.get(np.arange(len(small_case.samples))).numpy())
    d = np.linalg.norm(q[:, None, :] - s[None, :, :], axis=2)
    np.testing.assert_allclose(output.scores, (d <= 1.0).mean(axis=1), atol=1e-9)


def test_domias_equals_scipy_kde_ratio(small_case):
    output = build_attack("domias", {"features": "pixels"})(small_case)
    generated = small_case.samples.get(np.arange(len(small_case.samples))).numpy().astype(np.float64)
    p_g = scipy.stats.gaussian_kde(generated.T).logpdf(small_case.queries.numpy().T)
    p_r = scipy.stats.gaussian_kde(small_case.reference.numpy().T.astype(np.float64)).logpdf(
        small_case.queries.numpy().T)
    np.testing.assert_allclose(output.scores, p_g - p_r, rtol=1e-6, atol=1e-6)


def test_kde_matches_scipy_far_in_the_tails():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3))
    queries = np.vstack([rng.normal(size=(5, 3)), [[8.0, 8.0, 8.0]]])  # last: density ~ 1e-40
    ours = GaussianKDE(torch.from_numpy(points)).log_density(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(ours, scipy.stats.gaussian_kde(points.T).logpdf(queries.T), rtol=1e-9)


# ---- bad input -------------------------------------------------------------------------------


def test_singular_covariance_is_a_clear_error_and_regularization_is_explicit(small_case):
    flat = torch.cat([small_case.reference, small_case.reference[:, :1]], dim=1)  # duplicate column
    context = AttackContext(queries=torch.cat([small_case.queries, small_case.queries[:, :1]], 1),
                            record_ids=np.arange(12), samples=None, reference=flat)
    with pytest.raises(MiaGenError, match="singular.*kde_regularization"):
        GaussianKDE(context.reference, label="reference records")
    scores = GaussianKDE(flat, regularization=1e-3).log_density(context.queries)
    assert torch.isfinite(scores).all()


def test_attack_errors_say_what_to_do(small_case):
    with pytest.raises(MiaGenError, match="no parameter.*colour"):
        build_attack("sample_distance", {"colour": "red"})
    with pytest.raises(MiaGenError, match="unknown attack 'nope'.*available"):
        build_attack("nope")
    no_reference = AttackContext(queries=small_case.queries, record_ids=np.arange(12),
                                 samples=small_case.samples)
    with pytest.raises(MiaGenError, match="n_reference"):
        build_attack("domias")(no_reference)
    with pytest.raises(MiaGenError, match="n_components.*at most"):
        build_attack("domias", {"n_components": 100})(small_case)
    with pytest.raises(MiaGenError, match="k=500"):
        build_attack("sample_distance", {"k": 500})(small_case)
    wrong_shape = AttackContext(queries=torch.zeros(3, 5), record_ids=np.arange(3),
                                samples=small_case.samples)
    with pytest.raises(MiaGenError, match="data.resolution"):
        build_attack("sample_distance")(wrong_shape)


def test_every_attack_declares_its_access():
    assert {"sample_distance", "monte_carlo", "domias"} <= set(ATTACKS)
    for cls in ATTACKS.values():
        # a fixed class attribute, or (calibration, logan) one that follows the settings
        assert isinstance(cls().access, Access), cls
        assert "labels" not in AttackContext.__dataclass_fields__
    assert build_attack("logan", {"mode": "black_box"}).access is Access.SAMPLES
    assert build_attack("calibration", {"attack": "latent_inversion_pbb"}).access is Access.QUERY


# ---- real signal -----------------------------------------------------------------------------

SIGNAL_ATTACKS = [
    ("sample_distance", {}),
    ("monte_carlo", {}),
    ("monte_carlo", {"variant": "log", "features": "pca", "n_components": 20}),
    ("domias", {}),
]


@pytest.fixture(scope="module")
def memorizing_store(digits, partition, tmp_path_factory):
    generator = NoisyCopyGenerator(digits.get(partition["members"]), noise_std=0.1)
    return store_from(tmp_path_factory.mktemp("memo") / "store", generator, 6000, storage_dtype="uint8")


@pytest.fixture(scope="module")
def independent_store(digits, partition, tmp_path_factory):
    generator = NoisyCopyGenerator(digits.get(partition["independent"]), noise_std=0.1)
    return store_from(tmp_path_factory.mktemp("indep") / "store", generator, 6000, storage_dtype="uint8")


@pytest.mark.parametrize("name,params", SIGNAL_ATTACKS)
def test_memorizing_generator_is_caught(digits, partition, memorizing_store, name, params):
    context = context_for(digits, partition, memorizing_store)
    assert auc_of(build_attack(name, params)(context), context, partition) >= 0.95


@pytest.mark.parametrize("name,params", SIGNAL_ATTACKS)
def test_independent_generator_is_not_accused(digits, partition, independent_store, name, params):
    context = context_for(digits, partition, independent_store)
    assert 0.40 <= auc_of(build_attack(name, params)(context), context, partition) <= 0.60
