"""The GSA attack (attacks/gsa.py) against a plain reference: one backward pass per record and model,
`sklearn.preprocessing.scale` per model, the same classifier; real signal on briefly trained tiny
denoisers; its refusals; GSA2, explicit timesteps, the xgboost backend."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import scale
from threadpoolctl import threadpool_limits
from torch import nn

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.attacks.gsa import GSA, reference_timesteps, spread_timesteps
from mia_gen.errors import MiaGenError, MissingExtraError
from mia_gen.models.denoiser import Denoiser
from mia_gen.record_rng import record_generator

pytestmark = pytest.mark.usefixtures("single_thread")

T = 1000
N_RECORDS = 32  # the zoo's population = the queries; every model trains on a random half
N_SHADOWS = 4
TRAIN_STEPS = 300


def alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), dim=0)


class TinyEpsilonNet(nn.Module):
    """A DDPM-like epsilon network on 8x8 images: an MLP with a sinusoidal timestep embedding (and a class
    embedding when `num_classes`); small enough to train a zoo in seconds on a CPU."""

    def __init__(self, width: int = 128, num_classes: int | None = None):
        super().__init__()
        self.time = nn.Linear(16, width)
        self.label = nn.Embedding(num_classes, width) if num_classes else None
        self.inp = nn.Linear(64, width)
        self.hidden = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, 64)

    def forward(self, x_t, t, class_labels=None):
        angle = t.float()[:, None] * torch.exp(-math.log(1000) * torch.arange(8, dtype=torch.float32) / 8)
        h = self.inp(x_t.flatten(1)) + self.time(torch.cat([angle.sin(), angle.cos()], dim=1))
        if class_labels is not None:
            h = h + self.label(class_labels)
        return self.out(self.hidden(h)).view(x_t.shape)


def records(n: int = N_RECORDS, seed: int = 0) -> torch.Tensor:
    """Smooth random 8x8 images in [-1, 1]."""
    x = nn.functional.avg_pool2d(torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)), 2)
    return x / x.abs().amax(dim=(1, 2, 3), keepdim=True)


def trained_denoiser(members: torch.Tensor, seed: int) -> Denoiser:
    """The DDPM objective (Ho et al.), full batch, a few hundred Adam steps."""
    torch.manual_seed(seed)
    net = TinyEpsilonNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    a = alphas_cumprod()
    for _ in range(TRAIN_STEPS):
        t = torch.randint(0, T, (len(members),))
        eps = torch.randn_like(members)
        abar = a[t].float().view(-1, 1, 1, 1)
        loss = ((net(abar.sqrt() * members + (1 - abar).sqrt() * eps, t) - eps) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Denoiser(net, a, (1, 8, 8))


def context(denoiser, queries, record_ids, seed=0, **fields) -> AttackContext:
    return AttackContext(queries=queries, record_ids=np.asarray(record_ids), denoiser=denoiser, seed=seed, **fields)


def zoo_context(target, shadows, membership, queries, record_ids, conditions=None, seed=0) -> AttackContext:
    return context(target, queries, record_ids, seed, conditions=conditions,
                   shadow_models=[context(s, queries, record_ids, seed, conditions=conditions) for s in shadows],
                   shadow_membership=np.asarray(membership), shadow_indices=list(range(len(shadows))))


@pytest.fixture(scope="module")
def zoo():
    """A target and N_SHADOWS shadows, each trained on its own random half of the same 32 records."""
    x = records()
    rng = np.random.default_rng(0)
    membership = np.stack([rng.permutation(N_RECORDS) < N_RECORDS // 2 for _ in range(N_SHADOWS + 1)])
    models = [trained_denoiser(x[np.flatnonzero(row)], seed) for seed, row in enumerate(membership)]
    return {"queries": x, "record_ids": np.arange(100, 100 + N_RECORDS), "target": models[0],
            "target_members": membership[0], "shadows": models[1:], "membership": membership[1:]}


def zoo_of(zoo, **overrides) -> AttackContext:
    parts = {k: zoo[k] for k in ("target", "shadows", "membership", "queries", "record_ids")}
    return zoo_context(**{**parts, **overrides})


# ---- the plain reference ---------------------------------------------------------------------------
def reference_features(net, x0, record_ids, seed, timesteps, variant, conditions=None) -> np.ndarray:
    """Per record: its noises from (seed, record id), the summed-over-pixels loss, ONE backward pass
    (GSA2: one per timestep), the L2 norm of each parameter's `.grad`."""
    a = alphas_cumprod()
    rows = []
    for n, (x, record_id) in enumerate(zip(x0, record_ids)):
        noise = torch.randn(len(timesteps), *x.shape, generator=record_generator(seed, int(record_id)))
        labels = {} if conditions is None else {"class_labels": conditions[n:n + 1]}

        def loss_at(i):
            t = timesteps[i]
            x_t = (a[t].sqrt() * x + (1 - a[t]).sqrt() * noise[i]).float()[None]
            return ((net(x_t, torch.tensor([t]), **labels)[0] - noise[i]) ** 2).sum()

        def norms(loss):
            net.zero_grad()
            loss.backward()
            return np.array([p.grad.double().norm().item() for p in net.parameters()])

        if variant == "gsa1":
            rows.append(norms(sum(loss_at(i) for i in range(len(timesteps))) / len(timesteps)))
        else:
            rows.append(np.mean([norms(loss_at(i)) for i in range(len(timesteps))], axis=0))
    return np.array(rows)


def reference_scores(target, shadows, membership, x0, record_ids, seed, timesteps, variant, standardize="pooled",
                     test_size=0.3, n_estimators=200, conditions=None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and the target's raw features: `reference_features`, then GSA's `test_attack_accuracy.py`
    (py85252876/GSA@494ce8c) transcribed: `load_shadow_data` concatenates every shadow's member rows and every
    shadow's non-member rows, `preprocess` cuts the members to the non-members' count, stacks them and
    `preprocessing.scale`s the stack, `train_test_split(test_size=0.3)` (seeded here) and a boosted classifier
    (HistGradientBoosting here, the attack's `classifier=sklearn`). The target's rows are scaled by their own
    mean / std (its `preprocess`, without cutting evaluated records). standardize="per_model" / "none" are
    mia-gen's version-1 options: each shadow's features scaled alone / not at all, no pooled scaling."""
    features = [reference_features(s.network, x0, record_ids, seed, timesteps, variant, conditions) for s in shadows]
    if standardize == "per_model":
        features = [scale(f) for f in features]
    membership = np.asarray(membership)
    shadow_member = np.concatenate([f[m] for f, m in zip(features, membership)])
    shadow_non_member = np.concatenate([f[~m] for f, m in zip(features, membership)])
    train_np = shadow_member[0:shadow_non_member.shape[0]]
    x = np.vstack((train_np, shadow_non_member))
    y = np.concatenate((np.ones(train_np.shape[0]), np.zeros(shadow_non_member.shape[0])))
    if standardize == "pooled":
        x = scale(x)
    if test_size:
        x, _, y, _ = train_test_split(x, y, test_size=test_size, random_state=seed)
    target_raw = reference_features(target.network, x0, record_ids, seed, timesteps, variant, conditions)
    classifier = HistGradientBoostingClassifier(max_iter=n_estimators, early_stopping=False, random_state=seed)
    classifier.fit(x, y.astype(int))
    return classifier.predict_proba(target_raw if standardize == "none" else scale(target_raw))[:, 1], target_raw


def test_timesteps_are_gsa_codes():
    """GSA's code (gen_l2_gradients_DDPM.py): `[x - 1 for x in range(int(T/k), T+1, int(T/k))]`, k = 10."""
    assert reference_timesteps(10, 1000) == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    for k, steps in ((10, 1500), (15, 1000), (7, 100), (3, T)):
        assert reference_timesteps(k, steps) == [x - 1 for x in range(int(steps / k), steps + 1, int(steps / k))]
    assert len(reference_timesteps(15, 1000)) == 15 and reference_timesteps(15, 1000)[-1] == 989


def test_rounded_timesteps_are_version_1s():
    assert spread_timesteps(15, 1500) == [100 * i for i in range(1, 15)] + [1499]
    expected = [min(int(np.floor((i + 1) * T / 15 + 0.5)), T - 1) for i in range(15)]
    assert spread_timesteps(15, T) == expected and expected[:3] == [67, 133, 200]
    assert spread_timesteps(16, T)[:2] == [63, 125]  # 62.5 rounds up
    assert spread_timesteps(T, T) == list(range(1, T)) + [T - 1]


@pytest.mark.parametrize("variant,timesteps,standardize,train_fraction", [
    ("gsa1", None, "pooled", 0.7),  # the defaults: GSA's reference pipeline
    ("gsa2", [10, 400, 900], "pooled", 0.7),
    ("gsa1", None, "per_model", 1.0),  # version 1's scaling, every row
    ("gsa1", [250, 600], "none", 1.0),
])
def test_scores_equal_a_per_record_backward_reference(zoo, variant, timesteps, standardize, train_fraction):
    attack = build_attack("gsa", {"variant": variant, "timesteps": timesteps, "standardize": standardize,
                                  "train_fraction": train_fraction, "classifier": "sklearn", "batch_size": 5})
    ctx = zoo_of(zoo, seed=7)
    with threadpool_limits(1):
        output = attack(ctx)
    steps = timesteps or reference_timesteps(10, T)
    expected, target_raw = reference_scores(zoo["target"], zoo["shadows"], zoo["membership"], zoo["queries"],
                                            zoo["record_ids"], 7, steps, variant, standardize,
                                            test_size=round(1 - train_fraction, 12))
    # features first (the attack's own function for one model), then the scores end to end
    raw_attack = GSA(**{**attack.config, "standardize": "none"}).features(ctx, steps, "target model")
    np.testing.assert_allclose(raw_attack, target_raw, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(output.scores, expected, rtol=1e-6, atol=1e-9)
    assert len(np.unique(expected)) > 5  # not a constant classifier: the comparison is not vacuous
    assert output.info["timesteps"] == steps and output.info["n_timesteps"] == len(steps)
    assert output.info["n_shadows"] == N_SHADOWS and output.info["shadow_indices"] == list(range(N_SHADOWS))
    assert output.info["variant"] == variant and output.info["classifier"] == "sklearn"
    assert output.info["n_features"] == len(list(zoo["target"].parameters()))
    assert 0.5 <= output.info["shadow_train_auc"] <= 1.0
    assert (output.info["shadow_test_auc"] is None) == (train_fraction == 1.0)
    assert "494ce8c" in output.info["reference"]


def test_real_signal_on_briefly_trained_denoisers(zoo):
    """Members of the target (never seen by the classifier) score higher than its non-members."""
    with threadpool_limits(1):
        output = build_attack("gsa")(zoo_of(zoo))
    assert roc_auc_score(zoo["target_members"], output.scores) > 0.7
    # the target's membership is not the zoo's: a classifier that read the zoo's labels would be at chance
    assert roc_auc_score(zoo["target_members"], zoo["membership"].mean(axis=0)) < 0.75


def test_class_conditional_models_use_each_records_condition():
    """Conditions reach every model (target and shadows) per record, as in the reference's class_labels."""
    n = 30
    x, ids = records(n, seed=1), np.arange(n)
    conditions = torch.arange(n) % 3
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Denoiser(TinyEpsilonNet(32, num_classes=3), alphas_cumprod(), (1, 8, 8),
                               condition_kind="class", num_classes=3))
    membership = np.random.default_rng(0).random((2, n)) < 0.5
    ctx = zoo_context(models[0], models[1:], membership, x, ids, conditions, seed=2)
    attack = build_attack("gsa", {"timesteps": [30, 500], "batch_size": 4, "n_estimators": 20, "classifier": "sklearn"})
    with threadpool_limits(1):
        output = attack(ctx)
        expected, target_raw = reference_scores(models[0], models[1:], membership, x, ids, 2, [30, 500], "gsa1",
                                                n_estimators=20, conditions=conditions)
    raw_attack = GSA(**{**attack.config, "standardize": "none"}).features(ctx, [30, 500], "target model")
    np.testing.assert_allclose(raw_attack, target_raw, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(output.scores, expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(MiaGenError, match="class-conditional"):  # without conditions: the Denoiser's error
        build_attack("gsa", {"timesteps": [30]})(zoo_context(models[0], models[1:], membership, x, ids))


def test_xgboost_backend_is_an_extra(zoo, monkeypatch):
    ctx = zoo_of(zoo)
    settings = {"timesteps": [100, 500], "n_estimators": 30}
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(MissingExtraError, match=r'pip install "mia-gen\[gsa\]"'):
        build_attack("gsa", {**settings, "classifier": "xgboost"})(ctx)
    auto = build_attack("gsa", settings)  # classifier=auto without xgboost: scikit-learn, said and keyed
    assert auto.config["classifier"] == "sklearn"
    with threadpool_limits(1):
        assert "XGBoost" in auto(ctx).info["classifier_note"]
    built = []

    def xgb_classifier(n_estimators, random_state):  # a stand-in with XGBClassifier's fit / predict_proba
        built.append((n_estimators, random_state))
        return HistGradientBoostingClassifier(max_iter=n_estimators, early_stopping=False, random_state=random_state)

    monkeypatch.setitem(sys.modules, "xgboost", types.SimpleNamespace(XGBClassifier=xgb_classifier))
    with threadpool_limits(1):
        stand_in = build_attack("gsa", {**settings, "classifier": "xgboost"})(ctx)
        sklearn = build_attack("gsa", {**settings, "classifier": "sklearn"})(ctx)
    assert built == [(30, ctx.seed)] and stand_in.info["classifier"] == "xgboost"
    assert build_attack("gsa", settings).config["classifier"] == "xgboost"  # auto, with xgboost importable
    np.testing.assert_array_equal(stand_in.scores, sklearn.scores)


# ---- refusals --------------------------------------------------------------------------------------
def test_fewer_than_two_shadows_are_refused(zoo):
    ctx = zoo_of(zoo, shadows=zoo["shadows"][:1], membership=zoo["membership"][:1])
    with pytest.raises(MiaGenError, match="at least 2 trained shadow models, got 1"):
        build_attack("gsa")(ctx)
    with pytest.raises(MiaGenError, match="got 0"):
        build_attack("gsa")(context(zoo["target"], zoo["queries"], zoo["record_ids"]))


@pytest.mark.parametrize("fill,missing", [(True, "no OUT"), (False, "no IN")])
def test_a_zoo_without_in_or_out_rows_is_refused(zoo, fill, missing):
    membership = np.full_like(zoo["membership"], fill)
    with pytest.raises(MiaGenError, match=missing):
        build_attack("gsa")(zoo_of(zoo, membership=membership))


def test_a_membership_matrix_of_the_wrong_shape_is_refused(zoo):
    with pytest.raises(MiaGenError, match=r"bool \(K, Q\)"):
        build_attack("gsa")(zoo_of(zoo, membership=zoo["membership"][:, :5]))
    with pytest.raises(MiaGenError, match=r"bool \(K, Q\)"):
        build_attack("gsa")(zoo_of(zoo, membership=zoo["membership"].astype(int)))


def test_non_diffusion_models_are_refused(zoo):
    with pytest.raises(MiaGenError, match="diffusion model"):
        build_attack("gsa")(zoo_of(zoo, target=None))
    with pytest.raises(MiaGenError, match="a GAN"):
        build_attack("gsa")(zoo_of(zoo, target=nn.Linear(4, 4)))
    ctx = zoo_of(zoo)
    ctx.shadow_models[1].denoiser = None
    with pytest.raises(MiaGenError, match="shadow model 1: .*diffusion model"):
        build_attack("gsa", {"timesteps": [100]})(ctx)


def test_shadows_must_see_the_same_records(zoo):
    ctx = zoo_of(zoo)
    ctx.shadow_models[2].record_ids = ctx.record_ids[::-1].copy()
    with pytest.raises(MiaGenError, match="shadow 2 sees other records"):
        build_attack("gsa")(ctx)


@pytest.mark.parametrize("settings,match", [
    ({"variant": "gsa3"}, "variant"),
    ({"classifier": "lightgbm"}, "classifier"),
    ({"standardize": "zscore"}, "standardize"),
    ({"n_estimators": 0}, "n_estimators"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"n_timesteps": 0}, "n_timesteps"),
    ({"n_timesteps": T + 1}, "n_timesteps"),
    ({"timesteps": [100, T]}, "outside"),
    ({"timesteps": []}, "non-empty"),
])
def test_bad_settings_are_refused(zoo, settings, match):
    with pytest.raises(MiaGenError, match=match):
        build_attack("gsa", settings)(zoo_of(zoo))


def test_registered_and_its_config_lists_the_defaults():
    attack = build_attack("gsa")
    assert isinstance(attack, GSA) and attack.needs_shadow_models and attack.access.value == "white_box"
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "attack" / "gsa.yaml").read_text())["gsa"]
    assert config.pop("_target_") == "mia_gen.attacks.gsa.GSA"
    assert config == GSA.defaults
