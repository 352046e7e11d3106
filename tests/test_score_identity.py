"""Score identity (README "Score identity"): a cached score's key holds every setting that changes
the score and the code that computed it, so a changed setting or a fixed attack is never answered
from a stale cache. Keys are computed without running any attack (`Pipeline.attack_key`)."""

from __future__ import annotations

import configparser
import copy
import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mia_gen.attacks  # noqa: F401  (registers every attack)
import mia_gen
import mia_gen.experiments.pipeline as pipeline_module
from mia_gen.attacks.base import ATTACKS, build_attack
from mia_gen.attacks.sample_distance import SampleDistance
from mia_gen import provenance
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.provenance import CHECKOUT, package_version
from test_pipeline import FAST, MEMORIZER, make_config

# Another allowed value of each setting that takes one of a few values, by setting name.
ALLOWED = {
    "attack": ["latent_inversion", "sample_distance"],  # calibration: the attack it wraps
    "reference_size": ["members", "all"],
    "distance": ["l2", "lpips"], "aggregate": ["min", "mean"], "backend": ["auto", "faiss", "torch"],
    "lpips_net": ["vgg", "alex", "squeeze"], "features": ["pixels", "pca"], "bandwidth": ["scott", 0.5],
    "optimizer": ["lbfgs", "adam"], "init": ["nn", "zero", "random"], "search": ["es", "powell"],
    "mode": ["white_box", "black_box"], "variant": ["eps", "log", "frac"],
    "eps_method": ["median", "percentile", "fixed"], "timestep_convention": ["reference", "measured"],
    "classifier": ["resnet18", "small_cnn"], "sign": ["declared", "labelled_subset"],
}
# Where a setting's name means different things in different attacks: another allowed value, by attack.setting.
ALLOWED_BY_ATTACK = {
    "gsa.variant": ["gsa1", "gsa2"], "gsa.classifier": ["auto", "xgboost", "sklearn"],
    "gsa.standardize": ["pooled", "per_model", "none"], "gsa.spacing": ["reference", "rounded"],
    "gsa.balance": ["truncate", "none"],
    "lira.mode": ["online", "offline"], "rmia.mode": ["online", "offline"], "lira.estimator": ["reference", "unbiased"],
    "lira.params": [None, {"n_draws": 2}], "rmia.params": [None, {"n_draws": 2}],
    "lira.queries": [None, [{"timesteps": [50]}, {"timesteps": [200]}]],
    "lira.attack": ["diffusion_loss", "pia"], "rmia.attack": ["diffusion_loss", "pia"],
    "clid.alpha": ["labelled_subset", 0.5], "domias.n_components": ["auto", 5],
    "lira.transform": [None, "log"], "rmia.temperature": ["auto", 2.0],
}
# Settings a perturbed setting needs beside it to be valid, on both sides of the comparison.
COMPANIONS = {"rmia.mode": {"offline_a": 0.3}}
# A valid value for each setting whose default is None (reference_checkpoint: a directory, see below).
INSTEAD_OF_NONE = {"params": {"iterations": 7}, "eps": 0.5, "max_generated": 500, "sweep_timesteps": [20, 40],
                   "timesteps": [10, 20], "offline_a": 0.3, "t_center": 400}
# Evaluation settings that only change metrics: the attack stage never reads them (asserted below).
METRICS_ONLY = {
    "alphas": "the FPRs at which TPR is reported",
    "n_bootstrap": "resamples of the confidence intervals",
    "n_neighbour_rows": "rows of the nearest-neighbour picture",
    "blind_baseline": "the model-free check of the split",
}


def perturbed(setting: str, value, tmp_path: Path, attack: str = ""):
    """Another valid value of a setting: a listed alternative, int + 1, float * 1.5, a flipped bool, a
    list with its last element perturbed, or a value for a None default."""
    if f"{attack}.{setting}" in ALLOWED_BY_ATTACK:
        return next(other for other in ALLOWED_BY_ATTACK[f"{attack}.{setting}"] if other != value)
    if setting in ALLOWED:
        return next(other for other in ALLOWED[setting] if other != value)
    if setting == "reference_checkpoint" and value is None:
        (tmp_path / "reference_model").mkdir(exist_ok=True)
        return str(tmp_path / "reference_model")
    if value is None and setting in INSTEAD_OF_NONE:
        return INSTEAD_OF_NONE[setting]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 if value else 0.1
    if isinstance(value, list) and value:
        return [*value[:-1], perturbed(setting, value[-1], tmp_path)]
    pytest.fail(f"no perturbation for setting {setting}={value!r}: list a valid other value in ALLOWED or "
                "INSTEAD_OF_NONE of tests/test_score_identity.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny run's config (with a tmp cache) and its records, loaded once for the module."""
    root = tmp_path_factory.mktemp("identity")
    cfg = make_config(FAST + ["zoo.n_shadows=4"], root / "cache")  # shadow attacks key the zoo (none trained)
    return cfg, Pipeline(cfg, root / "run").records


def pipeline_for(base, tmp_path, **evaluation) -> Pipeline:
    """A pipeline over the base config with some `evaluation` settings changed."""
    cfg, records = base
    cfg = copy.deepcopy(cfg)
    for key, value in evaluation.items():
        OmegaConf.update(cfg, f"evaluation.{key}", value)
    pipeline = Pipeline(cfg, tmp_path / "run")
    pipeline.__dict__["records"] = records  # the same data (as ReferencePipeline shares its parent's)
    return pipeline


def keys(pipeline: Pipeline) -> dict[str, str]:
    """The score key of every registered attack with its defaults."""
    return {name: pipeline.attack_key(name, build_attack(name)) for name in sorted(ATTACKS)}


ATTACK_SETTINGS = [(name, setting) for name in sorted(ATTACKS) for setting in ATTACKS[name].defaults]


@pytest.mark.parametrize("name,setting", ATTACK_SETTINGS, ids=[f"{n}.{s}" for n, s in ATTACK_SETTINGS])
def test_every_setting_of_every_attack_is_part_of_its_score_key(base, tmp_path, name, setting):
    pipeline = pipeline_for(base, tmp_path)
    value = perturbed(setting, ATTACKS[name].defaults[setting], tmp_path, name)
    companions = COMPANIONS.get(f"{name}.{setting}", {})
    assert pipeline.attack_key(name, build_attack(name, {**companions, setting: value})) != \
        pipeline.attack_key(name, build_attack(name, companions)), f"{name}.{setting}={value!r} reuses the default's scores"


def test_bumping_an_attacks_version_changes_the_keys_of_exactly_the_attacks_running_its_code(
        base, tmp_path, monkeypatch):
    pipeline = pipeline_for(base, tmp_path)
    before = keys(pipeline)
    for bumped in sorted(ATTACKS):
        cls = ATTACKS[bumped]
        with monkeypatch.context() as patch:
            patch.setattr(cls, "version", cls.version + 1)
            after = keys(pipeline)
        # An attack runs the bumped code when it or an attack it wraps (calibration) is the class or a subclass.
        runs_it = {name for name in ATTACKS
                   if any(issubclass(ATTACKS[code], cls) for code in build_attack(name).code_versions())}
        assert bumped in runs_it
        assert {name for name in ATTACKS if after[name] != before[name]} == runs_it, bumped
    assert "latent_inversion" in build_attack("calibration").code_versions()  # so calibration followed it


def test_the_package_version_the_device_type_and_the_seed_are_part_of_every_key(base, tmp_path, monkeypatch):
    before = keys(pipeline_for(base, tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(mia_gen, "__version__", mia_gen.__version__ + ".post1")
        assert all(key != before[name] for name, key in keys(pipeline_for(base, tmp_path)).items())
    on_cuda = pipeline_for(base, tmp_path)
    on_cuda.device = torch.device("cuda", 1)  # keys only: nothing runs on it
    assert all(key != before[name] for name, key in keys(on_cuda).items())
    seeded = pipeline_for(base, tmp_path)
    OmegaConf.update(seeded.cfg, "seed", 1)
    assert all(key != before[name] for name, key in keys(seeded).items())
    # Resource and output settings are not: the same scores, whatever they are.
    other = pipeline_for(base, tmp_path / "elsewhere")
    OmegaConf.update(other.cfg, "threads", torch.get_num_threads())
    OmegaConf.update(other.cfg, "progress", True)
    assert keys(other) == before


def test_a_larger_labelled_subset_is_another_secmi_nn_score_but_the_same_sample_distance_score(base, tmp_path):
    small, large = (pipeline_for(base, tmp_path, labelled_fraction=f) for f in (0.2, 0.5))
    assert len(small.labelled_subset()[0]) < len(large.labelled_subset()[0])
    assert small.attack_key("secmi_nn", build_attack("secmi_nn")) != \
        large.attack_key("secmi_nn", build_attack("secmi_nn"))
    assert small.attack_key("sample_distance", build_attack("sample_distance")) == \
        large.attack_key("sample_distance", build_attack("sample_distance"))


class RecordingConfig:
    """The run's config, noting in `reads` which `evaluation` settings are read."""

    def __init__(self, cfg, reads: set):
        self._cfg, self._reads = cfg, reads

    def __getattr__(self, key):
        value = getattr(self._cfg, key)
        return RecordingSection(value, self._reads) if key == "evaluation" else value

    def get(self, key, default=None):
        value = self._cfg.get(key, default)
        return RecordingSection(value, self._reads) if key == "evaluation" else value


class RecordingSection:
    def __init__(self, node, reads: set):
        self._node, self._reads = node, reads

    def __getattr__(self, key):
        self._reads.add(key)
        return getattr(self._node, key)

    def get(self, key, default=None):
        self._reads.add(key)
        return self._node.get(key, default)

    __getitem__ = __getattr__

    def __contains__(self, key):
        self._reads.add(key)
        return key in self._node

    def __iter__(self):
        self._reads.update(self._node)
        return iter(self._node)


def context_reads(pipeline: Pipeline, name: str, monkeypatch) -> set[str]:
    """The `evaluation` settings read while building an attack's inputs (`Pipeline.context_for`). An attack
    sees nothing of the config but its inputs and its own settings, so these are the only evaluation
    settings its scores can depend on. The records, model, discriminator and samples are stand-ins:
    loading them reads no evaluation setting."""
    monkeypatch.setattr(type(pipeline.records), "get", lambda self, ids: torch.zeros(len(ids)))
    monkeypatch.setattr(Pipeline, "generator", property(lambda self: object()))
    monkeypatch.setattr(Pipeline, "denoiser", property(lambda self: object()))
    monkeypatch.setattr(Pipeline, "samples", property(lambda self: object()))
    monkeypatch.setattr(Pipeline, "trained_model_dir", property(lambda self: self.model_dir))  # nothing trains
    monkeypatch.setattr(pipeline_module, "load_discriminator", lambda *args, **kwargs: object())
    reads = set()
    recording = Pipeline(RecordingConfig(pipeline.cfg, reads), pipeline.run_dir)
    recording.__dict__["records"] = pipeline.records
    recording.context_for(build_attack(name))
    return reads


def test_every_evaluation_setting_is_in_the_key_of_the_attacks_it_reaches_or_only_changes_metrics(
        base, tmp_path, monkeypatch):
    settings = OmegaConf.to_container(base[0].evaluation)
    # Read under the defaults and under each setting changed (e.g. sign=labelled_subset makes the
    # co-membership groups avoid the labelled subset, so they then depend on labelled_fraction).
    starts = [{}] + [{s: perturbed(s, value, tmp_path)} for s, value in settings.items()]
    reached = set()
    for start in starts:
        pipeline = pipeline_for(base, tmp_path, **start)
        before = keys(pipeline)
        for name in sorted(ATTACKS):
            for setting in context_reads(pipeline, name, monkeypatch):
                reached.add(setting)
                value = OmegaConf.to_container(pipeline.cfg.evaluation)[setting]
                changed = pipeline_for(base, tmp_path, **{**start, setting: perturbed(setting, value, tmp_path)})
                assert changed.attack_key(name, build_attack(name)) != before[name], \
                    f"{name}'s inputs read evaluation.{setting} (from {start or 'the defaults'}) but its key ignores it"
    assert set(settings) - reached == set(METRICS_ONLY), \
        "classify each evaluation setting: the attack stage reads it (then it is keyed), or METRICS_ONLY"
    # Settings that only change metrics do not invalidate any cached score either.
    before = keys(pipeline_for(base, tmp_path))
    for setting in METRICS_ONLY:
        assert keys(pipeline_for(base, tmp_path, **{setting: perturbed(setting, settings[setting], tmp_path)})) \
            == before, setting


def test_a_cached_score_is_reused_until_its_attacks_version_is_bumped_and_results_say_which_code(
        tmp_path, monkeypatch):
    cfg = make_config(MEMORIZER + ["attack=sample_distance"], tmp_path / "cache")
    calls = []
    score = SampleDistance.score
    monkeypatch.setattr(SampleDistance, "score", lambda self, context: calls.append(1) or score(self, context))
    Pipeline(cfg, tmp_path / "run").run("attack")
    Pipeline(cfg, tmp_path / "run").run("attack")
    assert len(calls) == 1  # the second run reused the cached scores

    monkeypatch.setattr(SampleDistance, "version", SampleDistance.version + 1)
    Pipeline(cfg, tmp_path / "run").run()
    assert len(calls) == 2  # the bumped attack recomputed
    files = sorted((tmp_path / "cache" / "scores").glob("sample_distance-*.json"))
    assert len(files) == 2
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    versions = results["metadata"]["versions"]
    assert set(versions) == {"mia_gen", "git_commit", "git_dirty", "python", "torch", "diffusers", "numpy"}
    assert versions["mia_gen"] == mia_gen.__version__ and versions["torch"] == torch.__version__
    if (CHECKOUT / ".git").exists():  # tests run from a checkout: its commit
        assert re.fullmatch(r"[0-9a-f]{40}", versions["git_commit"]) and isinstance(versions["git_dirty"], bool)
    source = results["metadata"]["scores"]["sample_distance"]
    entry = json.loads((tmp_path / "cache" / "scores" / source["file"]).read_text())
    assert entry["identity"]["code"] == {"mia_gen": mia_gen.__version__,
                                         "attacks": {"sample_distance": SampleDistance.version}}
    assert entry["versions"] == source["versions"] == versions and entry["device"] == source["device"] == "cpu"


def test_a_model_queried_beside_a_given_sample_store_is_part_of_the_key(base, tmp_path):
    """latent_inversion with init=nn reads the samples and queries the model; a given store's key does
    not hold the model's, so both keys are in its score's identity (sample-only attacks: the store's)."""
    keyed = []
    for model_key in ("model-a", "model-b"):
        pipeline = pipeline_for(base, tmp_path)
        pipeline.__dict__.update(sample_key="the-given-store", train_key=model_key)
        keyed.append({name: pipeline.attack_key(name, build_attack(name))
                      for name in ("latent_inversion", "sample_distance")})
    assert keyed[0]["latent_inversion"] != keyed[1]["latent_inversion"]
    assert keyed[0]["sample_distance"] == keyed[1]["sample_distance"]


def test_the_package_version_is_the_checkouts_and_an_installed_package_has_no_commit(tmp_path, monkeypatch):
    parser = configparser.ConfigParser()
    parser.read(CHECKOUT / "setup.cfg")
    assert mia_gen.__version__ == package_version() == parser.get("metadata", "version")
    monkeypatch.setattr(provenance, "CHECKOUT", tmp_path)  # no setup.cfg, no .git: an installed package
    assert provenance.git_state() == (None, None)
    assert package_version() == importlib.metadata.version("mia-gen")


def test_a_given_models_key_holds_every_file_it_reads(tmp_path):
    """A tokenizer's merges.txt edited in place is another model (its key held only *.safetensors and *.json);
    the trainer's sample grids and hidden files are not part of the model."""
    from tiny_pipelines import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path / "sd")

    def key() -> str:
        cfg = make_config([*FAST, "model=diffusers", f"model.checkpoint={sd}"], tmp_path / "cache")
        return Pipeline(cfg, tmp_path / "run").train_key

    before = key()
    (sd / "samples").mkdir()
    (sd / "samples" / "step_000100.png").write_bytes(b"a grid")
    (sd / ".cache").mkdir()
    (sd / ".cache" / "lock").write_text("")
    assert key() == before
    merges = sd / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text() + "d i\n")
    assert key() != before
