"""Utility beside privacy: the Fréchet distance against hand computations and torch-fidelity, the
offline classifier-feature FID on real digits, and the InceptionV3 path on a weights file written here."""

import numpy as np
import pytest
import torch
from scipy import linalg

from mia_gen.datasets import RecordSet, load_dataset
from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.utility import (
    INCEPTION_WEIGHTS,
    ClassifierFeatures,
    InceptionFeatures,
    UtilityConfig,
    choose_metric,
    fid_from_features,
    frechet_distance,
    measure_utility,
)


class Store:
    """The slice of a SampleStore that utility reads: len() and get(indices) in [-1, 1]."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def get(self, indices):
        return self.images[torch.as_tensor(np.asarray(indices))]


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu1, s1, mu2, s2 = real.mean(0), np.cov(real.T), fake.mean(0), np.cov(fake.T)
    by_hand = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    ours = fid_from_features(real, fake)
    assert ours == pytest.approx(by_hand, rel=1e-8)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_frechet_distance_stays_finite_with_fewer_images_than_features():
    rng = np.random.default_rng(2)
    value = fid_from_features(rng.normal(size=(5, 20)), rng.normal(size=(5, 20)))
    assert np.isfinite(value) and value > 0


def test_the_classifier_feature_fid_tells_digits_from_noise(digits, tmp_path, single_thread):
    config = UtilityConfig(metric="fid_classifier", classifier_epochs=8, n_real=1797)
    features = ClassifierFeatures(digits, tmp_path, config, torch.device("cpu"))
    assert features.accuracy > 0.7  # the feature space knows digits (10 classes, chance 0.1)
    half = digits.get(np.arange(0, 1797, 2))
    same = measure_utility(digits, Store(half), config, tmp_path, torch.device("cpu"))
    noise = measure_utility(digits, Store(torch.rand(900, 1, 16, 16) * 2 - 1), config, tmp_path, torch.device("cpu"))
    blurred = torch.nn.functional.avg_pool2d(half, 3, stride=1, padding=1)
    worse = measure_utility(digits, Store(blurred), config, tmp_path, torch.device("cpu"))
    assert same["metric"] == "fid_classifier" and "offline fallback" in same["label"]
    assert same["value"] < worse["value"] < noise["value"] and noise["value"] > 20 * same["value"]
    assert same["n_samples"] == 899 and same["n_real"] == 1797
    # Cached: a second extractor loads the same weights and gives the same features.
    again = ClassifierFeatures(digits, tmp_path, config, torch.device("cpu"))
    assert again.accuracy == features.accuracy
    assert np.array_equal(again(half[:20]), features(half[:20]))


def _random_inception_weights(path, monkeypatch):
    """A state dict of torch-fidelity's InceptionV3 with random weights (the real ones are not
    bundled): the real feature-extraction code then runs end to end."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)
    return path


def test_inception_fid_runs_torch_fidelity_on_given_weights(digits, tmp_path, monkeypatch):
    weights = _random_inception_weights(tmp_path / INCEPTION_WEIGHTS, monkeypatch)
    extractor = InceptionFeatures(weights, torch.device("cpu"))
    features = extractor(digits.get(np.arange(3)))
    assert features.shape == (3, 2048) and features.dtype == np.float64
    config = UtilityConfig(metric="fid_inception", inception_weights=str(weights), n_samples=6, n_real=6, batch_size=6)
    result = measure_utility(digits, Store(digits.get(np.arange(6))), config, tmp_path, torch.device("cpu"))
    assert result["metric"] == "fid_inception" and result["weights"] == str(weights) and result["value"] >= 0
    # auto finds torch-fidelity's file in the torch hub cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert choose_metric(UtilityConfig(), digits) == "fid_classifier"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    weights.rename(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS)
    assert choose_metric(UtilityConfig(), digits) == "fid_inception"


def test_missing_or_unsafe_inception_weights_fail_with_the_fix(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    store = Store(digits.get(np.arange(4)))
    with pytest.raises(MissingAssetError, match="never|not bundled"):
        measure_utility(digits, store, UtilityConfig(metric="fid_inception"), tmp_path, torch.device("cpu"))
    with pytest.raises(MissingAssetError, match="does not exist"):
        measure_utility(digits, store, UtilityConfig(metric="fid_inception", inception_weights=str(tmp_path / "x.pth")),
                        tmp_path, torch.device("cpu"))
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": object()}, pickled)  # not a plain state dict: refused before torch-fidelity unpickles it
    with pytest.raises(MiaGenError, match="not a plain"):
        InceptionFeatures(pickled, torch.device("cpu"))


def test_data_without_labels_has_no_classifier_fid(tmp_path):
    images = RecordSet.from_tensor("array", "image", torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8))
    with pytest.raises(MiaGenError, match="has none"):
        ClassifierFeatures(images, tmp_path, UtilityConfig(), torch.device("cpu"))
    assert measure_utility(images, Store(images.get(np.arange(20))), UtilityConfig(), tmp_path,
                           torch.device("cpu")) is None  # auto: nothing to measure with, says so in the log


def test_bad_utility_settings_are_refused():
    with pytest.raises(MiaGenError, match="is not one of"):
        UtilityConfig.from_config({"metric": "fid"})
    with pytest.raises(MiaGenError, match="no setting"):
        UtilityConfig.from_config({"n_sample": 3})
    with pytest.raises(MiaGenError, match="integer >= 2"):
        UtilityConfig.from_config({"n_samples": 1})
