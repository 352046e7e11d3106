"""CLiD (attacks/clid.py) against a plain per-record loop over the raw pipeline components.

The loop is written from the reference code's description: x0 = VAE posterior mean * scaling_factor, one
noise draw per timestep from the record's own generator (`record_generator(seed, record id)`), the
caption's character thirds and "" embedded one caption at a time with the tokenizer + text encoder, the
UNet called per record and timestep, `F.mse_loss` (mean) over the timesteps, and sklearn's RobustScaler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mia_gen.attacks import AttackContext, build_attack
from mia_gen.errors import MiaGenError
from mia_gen.models.denoiser import load_denoiser
from mia_gen.record_rng import record_generator
from test_latent_denoiser import embed, raw, sd, sd_dir  # noqa: F401  (the tiny SD pipeline and its raw parts)
from tiny_pipelines import IMAGE_SIZE, tiny_class_unet_pipeline

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a handwritten digit 3", "photo of the number 42", "a", "", "of the digit", "the number seven",
            "digit 55", "a photo of a handwritten number"]
RECORD_IDS = np.array([3, 8, 15, 16, 23, 42, 57, 60])
SEED = 11


@pytest.fixture(scope="module")
def abar(sd_dir):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(sd_dir), subfolder="scheduler").alphas_cumprod.double()


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(CAPTIONS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def context(sd, images, positions=None, **fields) -> AttackContext:
    positions = np.arange(len(CAPTIONS)) if positions is None else np.asarray(positions)
    return AttackContext(queries=images[positions], record_ids=RECORD_IDS[positions], denoiser=sd,
                         captions=[CAPTIONS[p] for p in positions], seed=SEED, **fields)


def reference_features(raw, abar, images, timesteps, include_null=True, captions=CAPTIONS, record_ids=RECORD_IDS,
                       seed=SEED):
    """(L (Q,), d (Q, W)) by a loop over records, captions and timesteps, float64."""
    vae, unet = raw["vae"], raw["unet"]
    losses, discrepancies = [], []
    with torch.no_grad():
        for image, caption, record_id in zip(images, captions, record_ids):
            x0 = vae.encode(image[None]).latent_dist.mean[0] * vae.config.scaling_factor
            noise = torch.randn(len(timesteps), *x0.shape, generator=record_generator(seed, record_id))
            n = len(caption)
            variants = [caption, caption[:int(n / 3)], caption[int(n / 3):int(2 * n / 3)], caption[int(2 * n / 3):]]
            variants += [""] if include_null else []
            loss = []
            for variant in variants:
                predictions = []
                for i, t in enumerate(timesteps):
                    a = abar[t]
                    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise[i].double()).float()
                    condition = embed(raw, variant)[None]
                    predictions.append(unet(x_t[None], torch.tensor([t]), encoder_hidden_states=condition).sample[0])
                loss.append(F.mse_loss(torch.stack(predictions).double(), noise.double()).item())
            losses.append(loss[0])
            discrepancies.append([value - loss[0] for value in loss[1:]])
    return np.array(losses), np.array(discrepancies)


def reference_scores(L, d, alpha, fit_on):
    """-s with s = (1 - alpha) L' + alpha (-mean d)', the RobustScaler fitted on the rows `fit_on`."""
    from sklearn.preprocessing import RobustScaler

    features = np.stack([L, -d.mean(axis=1)], axis=1)
    scaled = RobustScaler().fit(features[fit_on]).transform(features)
    return -((1 - alpha) * scaled[:, 0] + alpha * scaled[:, 1])


def reference_alpha(L, d, positions, labels):
    """The alpha of 0, 0.1, ..., 1 with the best AUC on the labelled rows (the first of equal ones), and that AUC."""
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import RobustScaler

    features = np.stack([L, -d.mean(axis=1)], axis=1)[positions]
    scaled = RobustScaler().fit(features).transform(features)
    best, best_auc = None, -1.0
    for alpha in [i / 10 for i in range(11)]:
        auc = roc_auc_score(labels, -((1 - alpha) * scaled[:, 0] + alpha * scaled[:, 1]))
        if auc > best_auc + 1e-12:  # ties keep the smaller alpha
            best, best_auc = alpha, auc
    return best, best_auc


@pytest.fixture(scope="module")
def reference(raw, abar, images):
    return reference_features(raw, abar, images, [485, 495, 505])


# ---- against the per-record loop --------------------------------------------------------------------


@pytest.mark.parametrize("given_embeddings", [True, False], ids=["pipeline-embeddings", "from-captions"])
def test_losses_discrepancies_and_scores_equal_a_per_record_loop(sd, images, reference, given_embeddings):
    fields = {"conditions": sd.text_conditions(CAPTIONS)} if given_embeddings else {}
    output = build_attack("clid", {"alpha": 0.3})(context(sd, images, **fields))
    L, d = reference
    assert output.info["timesteps"] == [485, 495, 505]  # T // 2 - (10 * 3) // 2 + 10 i
    np.testing.assert_allclose(output.info["loss"], L, rtol=1e-5)
    np.testing.assert_allclose(output.info["mean_discrepancy"], d.mean(axis=1), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(output.scores, reference_scores(L, d, 0.3, np.arange(len(L))), rtol=1e-4, atol=1e-4)
    assert output.info["alpha"] == 0.3 and "trained_on" not in output.info
    assert output.info["weakened_example"] == ["a handw", "ritten ", "digit 3", ""]


def test_other_timesteps_and_no_null_caption_equal_the_loop(sd, raw, abar, images):
    positions = [0, 1, 4]
    output = build_attack("clid", {"alpha": 1.0, "n_timesteps": 4, "t_step": 20, "t_center": 300,
                                   "include_null": False})(context(sd, images, positions))
    L, d = reference_features(raw, abar, images, [260, 280, 300, 320], include_null=False)
    assert output.info["timesteps"] == [260, 280, 300, 320]
    np.testing.assert_allclose(output.info["loss"], L[positions], rtol=1e-5)
    np.testing.assert_allclose(output.info["mean_discrepancy"], d[positions].mean(axis=1), rtol=1e-4, atol=1e-8)


def test_alpha_is_chosen_on_the_labelled_subset_as_a_loop_over_the_grid(sd, images, reference):
    positions, labels = np.array([0, 2, 3, 5, 6, 7]), np.array([1, 0, 1, 0, 0, 1])
    output = build_attack("clid")(context(sd, images, labelled_subset=(positions, labels)))
    L, d = reference
    best, best_auc = reference_alpha(L, d, positions, labels)
    assert output.info["alpha"] == best
    assert max(output.info["alpha_aucs"]) == pytest.approx(best_auc)
    assert output.info["trained_on"] == positions.tolist()  # evaluation leaves these records out
    np.testing.assert_allclose(output.scores, reference_scores(L, d, best, positions), rtol=1e-4, atol=1e-4)


def test_clid_runs_through_the_pipeline_on_captioned_digits_as_the_loop(sd_dir, raw, abar, tmp_path):
    """A `model=diffusers` run on the tiny SD pipeline (digits captioned "a handwritten digit k"): the scores
    of every query equal the loop's, alpha chosen on the pipeline's labelled subset, which is not evaluated."""
    from hydra import compose, initialize_config_dir

    from mia_gen.datasets import load_dataset
    from mia_gen.experiments.common import CONFIG_DIR
    from mia_gen.experiments.evaluation import evaluated_part
    from mia_gen.experiments.pipeline import Pipeline

    members = tmp_path / "members.txt"
    members.write_text("3\n17\n40\n58\n71\n99\n120\n133\n150\n171\n")
    overrides = ["logger=none", "progress=false", "device=cpu", "threads=1", "utility.metric=none",
                 "evaluation.n_bootstrap=20", "evaluation.blind_baseline=false", "split.n_non_members=10",
                 "split.n_reference=0", "evaluation.labelled_fraction=0.4", "seed=0", "data=digits",
                 "data.captions=true", "data.channels=3", f"data.resolution={IMAGE_SIZE}", "model=diffusers",
                 f"model.checkpoint={sd_dir}", f"split.members_file={members}", "attack=[clid]",
                 f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        pipeline = Pipeline(compose("config", overrides=overrides), tmp_path / "run")
    entry = pipeline.attack()["clid"]
    ids = np.array(entry["record_ids"])
    records = load_dataset({"name": "digits", "captions": True, "channels": 3, "resolution": IMAGE_SIZE})
    captions = records.captions(ids)
    L, d = reference_features(raw, abar, records.get(ids), [485, 495, 505], captions=captions, record_ids=ids,
                              seed=0)
    positions, labels = pipeline.labelled_subset()
    assert entry["info"]["trained_on"] == positions.tolist()
    np.testing.assert_allclose(entry["info"]["loss"], L, rtol=1e-5)
    np.testing.assert_allclose(entry["scores"], reference_scores(L, d, entry["info"]["alpha"], positions),
                               rtol=1e-4, atol=1e-4)
    assert entry["info"]["alpha"] == reference_alpha(L, d, positions, labels)[0]
    assert sorted(evaluated_part(entry)["record_ids"]) == sorted(set(ids.tolist()) - set(ids[positions].tolist()))


# ---- batch invariance ------------------------------------------------------------------------------


def test_a_records_features_do_not_depend_on_its_batch(sd, images):
    everything = np.arange(len(CAPTIONS))
    together = build_attack("clid", {"alpha": 0.5, "batch_size": 64})(context(sd, images, everything)).info
    for call in ([0, 3, 4, 6], [1, 2, 5, 7]):
        alone = build_attack("clid", {"alpha": 0.5, "batch_size": 1})(context(sd, images, call)).info
        np.testing.assert_allclose(alone["loss"], np.asarray(together["loss"])[call], rtol=1e-5)
        np.testing.assert_allclose(alone["mean_discrepancy"], np.asarray(together["mean_discrepancy"])[call],
                                   rtol=1e-4, atol=1e-8)


# ---- signal -----------------------------------------------------------------------------------------


class MemorisingNetwork(torch.nn.Module):
    """A text-conditioned epsilon network that has memorised (caption, x0) pairs: given exactly a member's
    caption embedding it predicts the noise from that member's x0, otherwise from x0 = 0 (the mean)."""

    def __init__(self, embeddings: torch.Tensor, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(cross_attention_dim=embeddings.shape[-1])
        self.embeddings, self.x0, self.abar = embeddings, x0, alphas_cumprod.float()

    def forward(self, x_t, t, encoder_hidden_states):
        match = (encoder_hidden_states[:, None] - self.embeddings[None]).abs().flatten(2).amax(2) < 1e-5  # (N, M)
        guess = (match.float() @ self.x0.flatten(1)).view_as(x_t)  # a member's x0, or 0
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * guess) / (1 - a).sqrt()


def text_denoiser(sd_dir, network, sample_shape):
    """A pixel-space text Denoiser (no VAE: x0 = the records) with the tiny pipeline's tokenizer, text encoder
    and noise schedule."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from mia_gen.models.denoiser import Denoiser
    from mia_gen.models.latent import TextEncoder

    text = TextEncoder(CLIPTokenizer.from_pretrained(str(sd_dir), subfolder="tokenizer"),
                       CLIPTextModel.from_pretrained(str(sd_dir), subfolder="text_encoder"))
    schedule = DDPMScheduler.from_pretrained(str(sd_dir), subfolder="scheduler").alphas_cumprod
    return Denoiser(network, schedule, sample_shape, condition_kind="text", text=text)


def test_both_features_point_to_members_of_a_model_that_memorised_its_captioned_members(sd, sd_dir):
    """Fast and synthetic (by construction): the loss and the discrepancy each rank every member above every
    non-member, so the score's sign is right for any alpha."""
    from sklearn.metrics import roc_auc_score

    records = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = [f"photo of the number {k}" for k in range(8)]
    member = np.arange(8) % 2 == 0
    network = MemorisingNetwork(sd.text_conditions([c for c, m in zip(captions, member) if m]), records[member],
                                sd.alphas_cumprod)
    denoiser = text_denoiser(sd_dir, network, (4, 8, 8))
    queries = AttackContext(queries=records, record_ids=np.arange(8), denoiser=denoiser, captions=captions)
    for alpha in (0.0, 1.0):
        assert roc_auc_score(member, build_attack("clid", {"alpha": alpha})(queries).scores) == 1.0, alpha


def test_alpha_shadow_calibrates_on_the_shadows_and_finds_the_targets_members(sd, sd_dir):
    """alpha=shadow (the paper's threat model): the scaler and alpha fitted on the shadows' IN / OUT rows, pooled,
    as a plain loop does it; then applied to the target, whose members (never labelled) it finds."""
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import RobustScaler

    records = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = [f"photo of the number {k}" for k in range(12)]
    embeddings = sd.text_conditions(captions)

    def memoriser(member):  # a model that memorised the captioned records `member` (bool (12,))
        return text_denoiser(sd_dir, MemorisingNetwork(embeddings[member], records[member], sd.alphas_cumprod),
                             (4, 8, 8))

    target_members = np.arange(12) % 3 == 0
    membership = np.array([np.arange(12) % 2 == 0, np.arange(12) % 2 == 1, np.arange(12) < 6])  # (K=3, Q)

    def view(denoiser):
        return AttackContext(queries=records, record_ids=np.arange(12), denoiser=denoiser, captions=captions)

    target = view(memoriser(target_members))
    target.shadow_models = [view(memoriser(row)) for row in membership]
    target.shadow_membership, target.shadow_indices = membership, [0, 1, 2]
    attack = build_attack("clid", {"alpha": "shadow"})
    assert attack.needs_shadow_models and not attack.needs_labelled_subset
    output = attack(target)
    # the plain reference: every shadow's features, pooled, RobustScaler and the alpha grid on them
    rows = np.concatenate([attack.feature_rows(shadow)[0] for shadow in target.shadow_models])
    labels = membership.reshape(-1).astype(int)
    scaler = RobustScaler().fit(rows)
    scaled_rows = scaler.transform(rows)
    aucs = [roc_auc_score(labels, -((1 - a) * scaled_rows[:, 0] + a * scaled_rows[:, 1])) for a in
            [i / 10 for i in range(11)]]
    best = [i / 10 for i in range(11)][int(np.argmax(aucs))]
    scaled = scaler.transform(attack.feature_rows(target)[0])
    assert output.info["alpha"] == best and output.info["calibration"] == "shadow" and output.info["n_shadows"] == 3
    np.testing.assert_allclose(output.scores, -((1 - best) * scaled[:, 0] + best * scaled[:, 1]), rtol=1e-10)
    assert roc_auc_score(target_members, output.scores) == 1.0
    with pytest.raises(MiaGenError, match="needs a zoo"):
        attack(view(memoriser(target_members)))  # no shadows: the Attack's own check says how to train them


@pytest.mark.slow
def test_clid_finds_the_members_of_a_briefly_fine_tuned_text_unet(sd_dir):
    """The tiny SD UNet and text encoder, fine-tuned (Adam, 300 steps, ~1 min on one idle core) on 8 of 16
    captioned records in a unit-variance 4x8x8 space (without the random VAE, whose latents barely differ
    between records)."""
    from diffusers import UNet2DConditionModel
    from sklearn.metrics import roc_auc_score

    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet")
    denoiser = text_denoiser(sd_dir, unet, (4, 8, 8))
    generator = torch.Generator().manual_seed(0)
    records = torch.randn(16, 4, 8, 8, generator=generator)
    captions = [f"photo of the number {k}" for k in range(16)]
    member = np.arange(16) % 2 == 0
    x0, embeddings = records[member], denoiser.text_conditions([c for c, m in zip(captions, member) if m])
    abar = denoiser.alphas_cumprod.float()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(300):  # the DDPM loss over uniform timesteps, as a fine-tuning script
        t = torch.randint(0, len(abar), (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=embeddings).sample, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    output = build_attack("clid", {"alpha": 0.5})(
        AttackContext(queries=records, record_ids=np.arange(16), denoiser=denoiser, captions=captions))
    assert roc_auc_score(member, output.scores) > 0.7


# ---- errors -----------------------------------------------------------------------------------------


def test_a_model_that_is_not_text_conditioned_is_refused(tmp_path):
    denoiser = load_denoiser({}, tiny_class_unet_pipeline(tmp_path / "class"), "cpu")
    queries = AttackContext(queries=torch.zeros(2, 1, 8, 8), record_ids=np.arange(2), denoiser=denoiser,
                            conditions=torch.tensor([1, 2]), captions=["a", "b"])
    with pytest.raises(MiaGenError, match="text-to-image model"):
        build_attack("clid", {"alpha": 0.5})(queries)


def test_records_without_captions_are_refused(sd, images):
    with pytest.raises(MiaGenError, match="captioned records.*data.captions=true"):
        build_attack("clid", {"alpha": 0.5})(AttackContext(queries=images, record_ids=RECORD_IDS, denoiser=sd))
    with pytest.raises(MiaGenError, match="captioned records"):
        build_attack("clid", {"alpha": 0.5})(AttackContext(queries=images, record_ids=RECORD_IDS, denoiser=sd,
                                                           captions=CAPTIONS[:3]))


def test_the_default_alpha_needs_a_labelled_subset_with_both_classes(sd, images):
    assert build_attack("clid").needs_labelled_subset and not build_attack("clid", {"alpha": 0.2}).needs_labelled_subset
    with pytest.raises(MiaGenError, match="labelled subset.*alpha to a number"):
        build_attack("clid")(context(sd, images))
    with pytest.raises(MiaGenError, match="both members"):
        build_attack("clid")(context(sd, images, labelled_subset=(np.array([0, 1]), np.array([1, 1]))))


@pytest.mark.parametrize("params, message", [
    ({"alpha": 1.5}, r"alpha must be 'shadow'.*'labelled_subset'.*\[0, 1\]"),
    ({"alpha": "best"}, "alpha must be"),
    ({"alpha": True}, "alpha must be"),
    ({"n_timesteps": 0}, "n_timesteps must be a positive integer"),
    ({"t_center": 12.5}, "t_center must be an integer"),
    ({"include_null": "yes"}, "include_null must be true or false"),
])
def test_bad_settings_are_refused_when_the_attack_is_built(params, message):
    with pytest.raises(MiaGenError, match=message):
        build_attack("clid", params)


def test_timesteps_outside_the_schedule_are_refused(sd, images):
    with pytest.raises(MiaGenError, match=r"leave the model's \[0, 1000\)"):
        build_attack("clid", {"alpha": 0.5, "t_center": 990, "t_step": 20})(context(sd, images))
