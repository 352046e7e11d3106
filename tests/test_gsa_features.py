"""GSA's gradient features and classifier (attacks/gsa_features.py): the vmapped per-record gradient norms
against one backward pass per record, GSA1 vs GSA2 by definition, and the classifier end to end."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from mia_gen.attacks.gsa_features import fit_gsa_classifier, gradient_norms, gsa_features, gsa_scores
from mia_gen.errors import MiaGenError, MissingExtraError
from mia_gen.models.denoiser import Denoiser
from mia_gen.record_rng import record_generator

# diffusers' mid-block attention has no vmap batching rule on CPU yet: correct, only slower
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop"),
              pytest.mark.usefixtures("single_thread")]

T = 1000
TIMESTEPS = [5, 300, 700]
SEED = 3


def tiny_unet(**kwargs):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, dropout=0.5, **kwargs)  # dropout: GSA must run the model in eval mode


def alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), dim=0)


class PlainDenoiser(torch.nn.Module):
    """The Denoiser interface without the Denoiser class (a user's own network)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod()
        self.num_train_timesteps = T
        self.sample_shape = (1, 8, 8)

    def epsilon(self, x_t, t):
        return self.unet(x_t, t).sample


def records(n=5):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def loop_reference(unet, x0, record_ids, timesteps, variant, class_labels=None):
    """One backward pass per record (per timestep for GSA2), norms read from `.grad`."""
    unet.eval()
    a = alphas_cumprod()
    rows = []
    for n, (x, record_id) in enumerate(zip(x0, record_ids)):
        noise = torch.randn(len(timesteps), 1, 8, 8, generator=record_generator(SEED, int(record_id)))
        label = {} if class_labels is None else {"class_labels": class_labels[n:n + 1]}

        def loss_at(i):
            t = timesteps[i]
            x_t = (a[t].sqrt() * x + (1 - a[t]).sqrt() * noise[i]).float()[None]
            return ((unet(x_t, torch.tensor([t]), **label).sample[0] - noise[i]) ** 2).sum()

        def norms(loss):
            unet.zero_grad()
            loss.backward()
            return torch.stack([p.grad.double().norm() for p in unet.parameters()])

        if variant == "gsa1":
            rows.append(norms(sum(loss_at(i) for i in range(len(timesteps))) / len(timesteps)))
        else:
            rows.append(torch.stack([norms(loss_at(i)) for i in range(len(timesteps))]).mean(dim=0))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("variant", ["gsa1", "gsa2"])
def test_vmapped_gradient_norms_equal_one_backward_pass_per_record(variant):
    unet = tiny_unet()
    denoiser = Denoiser(unet, alphas_cumprod(), (1, 8, 8))
    x0, ids = records(), np.array([4, 9, 1, 30, 2])
    features, names = gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, variant, batch_size=2)
    assert names == [f"network.{name}" for name, _ in unet.named_parameters()]
    assert features.shape == (5, len(names)) and features.dtype == np.float64
    expected = loop_reference(unet, x0, ids, TIMESTEPS, variant)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-6)
    assert (features > 0).mean() > 0.9  # most layers get a gradient: the comparison is not vacuous


def test_any_model_with_the_denoiser_interface_works_and_batches_do_not_matter():
    unet = tiny_unet()
    x0, ids = records(), np.arange(5)
    plain, names = gsa_features(PlainDenoiser(unet), x0, ids, SEED, TIMESTEPS, batch_size=5)
    assert names == [f"unet.{name}" for name, _ in unet.named_parameters()]
    np.testing.assert_allclose(plain, loop_reference(unet, x0, ids, TIMESTEPS, "gsa1"), rtol=1e-4, atol=1e-6)
    alone, _ = gsa_features(PlainDenoiser(unet), x0[3:4], ids[3:4], SEED, TIMESTEPS, batch_size=1)
    np.testing.assert_allclose(alone[0], plain[3], rtol=1e-4, atol=1e-6)


def test_class_conditional_features_use_each_records_label():
    """Records are batched per class; each record's gradient is taken at its own label."""
    unet = tiny_unet(num_class_embeds=3)
    denoiser = Denoiser(unet, alphas_cumprod(), (1, 8, 8), condition_kind="class", num_classes=3)
    x0, ids, labels = records(), np.array([4, 9, 1, 30, 2]), torch.tensor([2, 0, 2, 1, 0])
    features, _ = gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, batch_size=1, conditions=labels)
    np.testing.assert_allclose(features, loop_reference(unet, x0, ids, TIMESTEPS, "gsa1", labels),
                               rtol=1e-4, atol=1e-6)
    as_zero, _ = gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, conditions=torch.zeros(5, dtype=torch.int64))
    np.testing.assert_allclose(as_zero[[1, 4]], features[[1, 4]], rtol=1e-4, atol=1e-6)  # label 0 already
    assert not np.allclose(as_zero[[0, 2, 3]], features[[0, 2, 3]], rtol=1e-3)
    with pytest.raises(MiaGenError, match="one condition per record"):
        gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, conditions=labels[:3])


def test_gsa1_and_gsa2_by_definition():
    """Same shapes; with one timestep they coincide; otherwise GSA2 (mean of norms) >= GSA1 (norm of the
    mean gradient) layer by layer, by the triangle inequality, and strictly for most layers."""
    denoiser = Denoiser(tiny_unet(), alphas_cumprod(), (1, 8, 8))
    x0, ids = records(3), np.arange(3)
    one = [gsa_features(denoiser, x0, ids, SEED, [200], variant)[0] for variant in ("gsa1", "gsa2")]
    np.testing.assert_allclose(one[0], one[1], rtol=1e-5, atol=1e-7)
    gsa1, _ = gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, "gsa1")
    gsa2, _ = gsa_features(denoiser, x0, ids, SEED, TIMESTEPS, "gsa2")
    assert gsa1.shape == gsa2.shape
    assert (gsa2 >= gsa1 * (1 - 1e-5) - 1e-7).all()
    assert (gsa2 > gsa1 * 1.01).mean() > 0.5


def test_bad_feature_inputs_are_refused():
    denoiser = Denoiser(tiny_unet(), alphas_cumprod(), (1, 8, 8))
    with pytest.raises(MiaGenError, match="variant"):
        gsa_features(denoiser, records(2), np.arange(2), SEED, TIMESTEPS, "gsa3")
    with pytest.raises(MiaGenError, match="noise"):
        gradient_norms(lambda *args: None, dict(denoiser.named_parameters()), records(2),
                       torch.tensor(TIMESTEPS), torch.zeros(2, 2, 1, 8, 8))


# ---- the classifier --------------------------------------------------------------------------------
def separable(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(n) < n // 2
    features = rng.lognormal(0, 0.3, size=(n, 6)) * np.where(labels[:, None], 0.6, 1.0)  # IN: smaller gradients
    return features, labels


def test_classifier_learns_in_from_out_on_shadow_features():
    train_features, train_labels = separable(400, 0)
    test_features, test_labels = separable(200, 1)
    with threadpool_limits(1):  # the trees' OpenMP threads crawl on 2 shared cores
        classifier = fit_gsa_classifier(train_features, train_labels, seed=0)
        shuffled = fit_gsa_classifier(train_features, np.random.default_rng(2).permutation(train_labels), seed=0)
        again = fit_gsa_classifier(train_features, train_labels, seed=0)
    assert isinstance(classifier, HistGradientBoostingClassifier) and classifier.max_iter == 200  # GSA's 200 trees
    scores = gsa_scores(classifier, test_features)
    assert scores.shape == (200,) and scores.dtype == np.float64
    assert roc_auc_score(test_labels, scores) > 0.95
    assert abs(roc_auc_score(test_labels, gsa_scores(shuffled, test_features)) - 0.5) < 0.15
    np.testing.assert_array_equal(scores, gsa_scores(again, test_features))  # seeded: the same scores again


def test_xgboost_backend_is_an_extra(monkeypatch):
    features, labels = separable(100, 0)
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(MissingExtraError, match=r'pip install "mia-gen\[gsa\]"'):
        fit_gsa_classifier(features, labels, backend="xgboost")
    fake = types.ModuleType("xgboost")
    fake.XGBClassifier = lambda n_estimators, random_state: HistGradientBoostingClassifier(
        max_iter=n_estimators, random_state=random_state)
    monkeypatch.setitem(sys.modules, "xgboost", fake)
    assert fit_gsa_classifier(features, labels, backend="xgboost", n_estimators=7).max_iter == 7
    assert fit_gsa_classifier(features, labels, backend="xgboost").max_iter == 200  # GSA's code: 200 trees


def test_bad_classifier_inputs_are_refused():
    features, labels = separable(50, 0)
    with pytest.raises(MiaGenError, match="backend"):
        fit_gsa_classifier(features, labels, backend="lightgbm")
    with pytest.raises(MiaGenError, match="both IN"):
        fit_gsa_classifier(features, np.ones(50, dtype=bool))
    with pytest.raises(MiaGenError, match="labels"):
        fit_gsa_classifier(features, labels[:10])
