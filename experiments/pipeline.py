"""The stages of a run — train, sample, attack, evaluate — each cached by the config it depends on.

Stage keys chain: train = hash(data, split, model, defense); sample = hash(train, sampling);
attack = hash of the scores' identity (`Pipeline.score_identity`: sample and/or train, split, the
attack's settings and code version, ...). A sweep that changes only attack parameters never
retrains or resamples; a stage that finds its output complete in the cache reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mia_gen
from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, build_attack
from mia_gen.datasets import csv_header, load_dataset, load_table_like, match_csv_columns, require_captions
from mia_gen.device import resolve_device
from mia_gen.errors import CorruptStoreError, MiaGenError, MissingAssetError
from mia_gen.groups import draw_groups
from mia_gen.hashing import config_hash, files_fingerprint, model_files
from mia_gen.locks import exclusive
from mia_gen.provenance import code_versions
from mia_gen.sample_store import SampleStore, import_samples, write_samples
from mia_gen.splits import load_or_make_split, membership_source
from mia_gen.zoo import ZooMembership, draw_zoo
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.models.checkpoint import STATE_JSON, verify_recorded_files
from mia_gen.models.defense import Defense, effective_training
from mia_gen.models.pytorch_ddpm import model_files as pytorch_ddpm_files
from mia_gen.models.tabular import SYNTHETIC_CSV, write_table_csv
from mia_gen.models.factory import (finetune_method, is_latent_text, load_diffusion_denoiser, load_discriminator,
                                    load_generator, train_base_model, train_model)

log = logging.getLogger(__name__)

STAGES = ("train", "sample", "attack", "evaluate")
# Defenses under which a run of S steps is the first S steps of a longer run (nothing depends on the
# planned length), so a longer run may resume from a finished shorter one. Not DP-SGD (its noise is
# solved for the whole run) nor federated (its rounds split the planned steps).
EXTENDABLE_DEFENSES = ("none", "weight_decay", "augmentation")
LINEAGE_JSON = "lineage.json"
# Written into a shadow model's directory once its training has finished: a zoo job killed mid-training
# leaves none, so the shadow counts as missing (and resumes from its last checkpoint when trained again).
FINISHED_JSON = "finished.json"
# The data loader's settings as a synthetic dataset sets them (`Pipeline.synthetic_records`).
SYNTHETIC_KEYS = {"data.path": "synthetic.path", "data.root": "synthetic.path", "data.value_range": "synthetic.value_range"}


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def unselected_settings(name: str, params) -> bool:
    """Whether `attack.<name>` is only settings an experiment preset gives an attack the command line did not select:
    no `_target_`, while selecting it from its configs/attack/<name>.yaml would have added one. (An attack with no
    config file of its own, added as `+attack.<name>.<setting>=...`, is run.)"""
    return "_target_" not in (params or {}) and (Path(CONFIG_DIR) / "attack" / f"{name}.yaml").is_file()


class Pipeline:
    """One run of the framework over a resolved config (see configs/config.yaml)."""

    def __init__(self, cfg: DictConfig, run_dir: Path | str):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cfg.cache_dir).expanduser().resolve()
        self.device = resolve_device(cfg.device)
        self.progress = bool(cfg.get("progress", True))
        # No global RNG is seeded here: every stage draws from its own generators, seeded from the config
        # (trainers from `model.training.seed`, samples per shard, attacks per record), so building a
        # pipeline (e.g. a calibration's reference pipeline) mid-run changes no other stage's draws.
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))

    # ---- data ---------------------------------------------------------------------------
    @cached_property
    def records(self):
        return load_dataset(self.cfg.data)

    @cached_property
    def data_key(self) -> dict:
        """`data.*` as the model keys hash it. `data.captions` counts only when set (the records'
        fingerprint covers the captions they carry), so keys from before captions existed still hold."""
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        if data.get("captions") in (None, False):
            data.pop("captions", None)
        return data

    @cached_property
    def split(self):
        split = load_or_make_split(self.cfg.split, self.records)
        if self.external_target is not None and membership_source(self.cfg.split) is None:
            log.warning(
                "the split is DRAWN AT RANDOM (seed %d), but %s was not trained by this run: unless it was "
                "trained by mia-gen on this very split, its 'members' are random records and every AUC is "
                "near 0.5 however much it leaks. Give its training membership: split.path=<split.json> or "
                "split.members_file=<file of record ids>.", split.seed, self.external_target)
        return split

    training_role = "members"

    @property
    def training_ids(self) -> np.ndarray:
        """The records the model is trained on: the split's members."""
        return self.split.members

    @cached_property
    def query_ids(self) -> np.ndarray:
        """Members and non-members in record-id order: nothing in the order hints at membership."""
        return np.sort(np.concatenate([self.split.members, self.split.non_members]))

    @property
    def external_target(self) -> str | None:
        """What this run attacks that it did not train (a synthetic dataset, a given sample store or
        checkpoint), in words; None when the run trains the model on the split's members itself."""
        if self.synthetic_path is not None:
            return f"the synthetic dataset {self.synthetic_path}"
        if self.cfg.sampling.get("store"):
            return f"the sample store {self.cfg.sampling.store}"
        if self.cfg.model.get("checkpoint"):
            return f"the model {self.cfg.model.name} at {self.cfg.model.checkpoint}"
        return None

    @property
    def synthetic_path(self) -> Path | None:
        """The synthetic dataset under audit, when the run audits data instead of a model."""
        path = (self.cfg.get("synthetic") or {}).get("path")
        return Path(path).expanduser().resolve() if path else None

    @cached_property
    def synthetic_records(self):
        """The synthetic records, each of the data's record shape (the attacks compare them one to one
        with real records). An array of another shape is refused with the shape it needs; an image
        folder's images are converted to the data's channels and size (`load_dataset` logs the conversion)."""
        need = self.records.record_shape
        if self.records.encoding is not None:
            return load_table_like(self.records, str(self.synthetic_path), f"synthetic.path={self.synthetic_path}")
        if self.synthetic_path.is_dir():
            spec = {"name": "image_folder", "root": str(self.synthetic_path), "captions": False}
            if self.records.kind == "image":
                spec.update(channels=need[0], resolution=need[-1])
        else:
            spec = {"name": "array", "path": str(self.synthetic_path),
                    "value_range": list(self.cfg.synthetic.value_range)}
        try:
            synthetic = load_dataset(spec)
        except MiaGenError as error:  # the loader names data.* keys; here the user set synthetic.*
            message = str(error)
            for data_key, synthetic_key in SYNTHETIC_KEYS.items():
                message = message.replace(data_key, synthetic_key)
            raise type(error)(f"the synthetic dataset (synthetic.path={self.synthetic_path}): {message}") from error
        real_columns = csv_header(str(Path(str(self.cfg.data.get("path") or "")).expanduser()))
        columns = csv_header(str(self.synthetic_path))
        if real_columns is not None and columns is not None:  # two numeric tables: columns matched by name
            synthetic = match_csv_columns(synthetic, real_columns, columns, f"synthetic.path={self.synthetic_path}")
        if synthetic.kind != self.records.kind or synthetic.record_shape != need:
            raise MiaGenError(
                f"synthetic.path={self.synthetic_path} holds {synthetic.kind} records of shape "
                f"{synthetic.record_shape}, but the records of data={self.cfg.data.name} are {self.records.kind} "
                f"of shape {need}, and every synthetic record is compared with real ones: give an array of shape "
                f"(N, {', '.join(map(str, need))}) (images may also be a folder, converted to the data's size)."
            )
        return synthetic

    def require_model(self, what: str) -> None:
        if self.synthetic_path is not None:
            raise MiaGenError(
                f"{what} needs a model, but this run audits the synthetic dataset {self.synthetic_path} "
                "(synthetic.path is set): only sample-based attacks apply. Remove synthetic.path to "
                "attack a model, or select sample-based attacks only (sample_distance, monte_carlo, domias)."
            )

    # ---- keys ---------------------------------------------------------------------------
    @cached_property
    def split_key(self) -> str:
        return config_hash(self.split.to_dict())

    @cached_property
    def train_key(self) -> str:
        if self.cfg.model.get("checkpoint"):
            # How the model is loaded (e.g. use_ema, prediction_type) matters; where it lies does not.
            loading = {k: v for k, v in OmegaConf.to_container(self.cfg.model, resolve=True).items()
                       if k != "checkpoint"}
            if loading.get("lora"):  # an adapter overwritten at the same path is another model
                lora = Path(loading["lora"]).expanduser().resolve()
                if lora.is_dir():
                    adapter = [*lora.glob("*.safetensors"), *lora.glob("*.json")]
                else:  # a file, with peft's adapter_config.json beside it; a missing one fails at loading
                    adapter = [lora, *lora.parent.glob("adapter_config.json")] if lora.is_file() else []
                loading["lora"] = {"files": files_fingerprint(adapter)}
            if isinstance(self.model_dir, str):  # a hub id: its revision is what the hub serves
                return config_hash({"hub_id": self.model_dir, "model": loading})
            # Every file the model may read, in subfolders too (diffusers: unet/, scheduler/, tokenizer/merges.txt).
            files = model_files(self.model_dir)
            if self.cfg.model.get("format") == "pytorch_ddpm":  # a ckpt.pt (or its logdir) and its flagfile
                files = pytorch_ddpm_files(self.model_dir)
            if not files:
                load_generator(self.cfg.model, self.model_dir, self.device)  # raises with the fix
            return config_hash({"checkpoint": files_fingerprint(files), "model": loading})
        model, defense = self.trained_as
        identity = {"data": self.data_key, "fingerprint": self.records.fingerprint, "split": self.split_key,
                    "model": model, "defense": defense}
        if self.cfg.model.get("base"):  # a given base: its files, not where it lies
            identity["base"] = self.base_key
        return config_hash(identity)

    # ---- a text-to-image model's base (configs/model/ldm.yaml) ---------------------------------
    @cached_property
    def public_ids(self) -> np.ndarray:
        """Records outside the split (members, non-members, reference): what a base model is pretrained on."""
        used = np.concatenate([self.split.members, self.split.non_members, self.split.reference])
        return np.setdiff1d(np.arange(len(self.records)), used)

    @cached_property
    def base_key(self) -> str:
        """The base's identity: a given base's files, or the public records and everything but the fine-tune."""
        given = self.cfg.model.get("base")
        if given:
            path = Path(given).expanduser().resolve()
            files = [*path.rglob("*.safetensors"), *path.rglob("*.json"), *path.glob("tokenizer/*")]
            if not (path / "model_index.json").is_file():
                raise MissingAssetError(
                    f"model.base={path} is not a StableDiffusionPipeline directory (no model_index.json); download "
                    "the base there (e.g. `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                    f"--local-dir {path}`) or unset model.base to pretrain one on the public records.")
            return config_hash({"base": files_fingerprint(files)})
        model = OmegaConf.to_container(self.cfg.model, resolve=True)
        for key in ("training", "sampler", "use_ema", "guidance_scale", "dtype", "allow_download", "checkpoint"):
            model.pop(key, None)
        return config_hash({"data": self.data_key, "fingerprint": self.records.fingerprint,
                            "public": self.public_ids.tolist(), "model": model})

    @cached_property
    def base_dir(self) -> Path:
        given = self.cfg.model.get("base")
        if given:
            return Path(given).expanduser().resolve()
        return self.cache_dir / "models" / f"{self.cfg.model.name}-base-{self.base_key}"

    def train_base(self) -> Path:
        """Pretrain the text-to-image base on the public records with their captions (once; cached)."""
        if self.cfg.model.get("base"):
            self.base_key  # a given base is checked before any fine-tuning
            return self.base_dir
        require_captions(self.records, f"model={self.cfg.model.name}")
        ids = self.public_ids
        if not len(ids):
            raise MiaGenError("model=ldm pretrains its base on the records outside the split, but the split uses all "
                              f"{len(self.records)} records; lower split.n_members / n_non_members / n_reference.")
        log.info("train: %s base on %d public records -> %s", self.cfg.model.name, len(ids), self.base_dir)
        with exclusive(self.base_dir, self.cache_dir / "locks"):
            train_base_model(self.cfg.model, self.records.get(ids), self.records.captions(ids), self.base_dir,
                             self.device, progress=self.progress)
        return self.base_dir

    @cached_property
    def trained_as(self) -> tuple[DictConfig, DictConfig]:
        """The (model, defense) configs the trainer runs: early stopping becomes the undefended model
        trained for fewer steps (`mia_gen.models.defense.effective_training`)."""
        defense = self.cfg.get("defense")
        if self.cfg.model.get("checkpoint") and self.defense.name != "none":
            raise MiaGenError(
                f"defense={self.defense.name} is applied while training, but model.checkpoint="
                f"{self.cfg.model.checkpoint} is a model trained elsewhere; use defense=none to attack it, or "
                "drop model.checkpoint to train the defended model here."
            )
        return effective_training(self.cfg.model, defense)

    @property
    def defense(self) -> Defense:
        """The defense as configured (early stopping included), for results and tables."""
        return Defense.from_config(self.cfg.get("defense"))

    def lineage_key(self) -> str | None:
        """Runs that differ only in their number of training steps share a lineage: a longer one can
        resume from a finished shorter one. None where that does not hold (see EXTENDABLE_DEFENSES)."""
        model, defense = self.trained_as
        training = model.get("training")
        if (self.cfg.model.get("checkpoint") or not training or "steps" not in training
                or Defense.from_config(defense).name not in EXTENDABLE_DEFENSES):
            return None
        model = OmegaConf.to_container(model, resolve=True)
        for key in ("steps", "checkpoint_every", "sample_every"):
            model["training"].pop(key, None)
        return config_hash({"data": self.data_key, "fingerprint": self.records.fingerprint,
                            "training_ids": self.training_ids.tolist(), "model": model, "defense": defense})

    def start_from_shorter_run(self) -> None:
        """Before training from scratch, copy the longest finished run of the same lineage with fewer
        steps into the model directory: the trainer then resumes it (bit-identical to a fresh run, as
        resuming after a crash is), so a sweep of training lengths costs only its longest run."""
        lineage = self.lineage_key()
        if lineage is None or (self.model_dir / STATE_JSON).is_file():
            return
        steps = int(self.trained_as[0].training.steps)
        shorter = []
        for path in self.model_dir.parent.glob(f"*/{LINEAGE_JSON}"):
            try:
                entry = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if entry.get("lineage") == lineage and entry.get("steps", steps) < steps:
                shorter.append((entry["steps"], path.parent))
        if not shorter:
            return
        done, source = max(shorter)
        verify_recorded_files(source, with_trainer_state=True)  # damage named in the run it is in, not this one
        log.info("train: resuming from the finished %d-step run %s (same model, same data)", done, source.name)
        tmp = self.model_dir.with_name(f".{self.model_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(LINEAGE_JSON))
        shutil.rmtree(self.model_dir, ignore_errors=True)  # nothing in it: no checkpoint was written yet
        os.replace(tmp, self.model_dir)

    def _train_locked(self) -> None:
        """Train (or resume, or find finished) the model under the stage lock, extending a shorter run."""
        members = self.records.get(self.training_ids)
        model, defense = self.trained_as
        text = {}
        if self.cfg.model.get("family") == "tabular":
            text = self.members_table()
        if is_latent_text(self.cfg.model):
            require_captions(self.records, f"model={self.cfg.model.name}")
            text = {"captions": self.records.captions(self.training_ids), "base_dir": self.train_base()}
            if finetune_method(self.cfg.model) == "none":
                return
        with exclusive(self.model_dir, self.cache_dir / "locks"):  # parallel jobs needing this model train it once
            self.start_from_shorter_run()
            train_model(model, members, self.model_dir, self.device, progress=self.progress, defense_cfg=defense,
                        **text)
            lineage = self.lineage_key()
            if lineage is not None:
                _write_json_atomic(self.model_dir / LINEAGE_JSON,
                                   {"lineage": lineage, "steps": int(model.training.steps)})

    @property
    def given_store(self) -> str | None:
        """A sample store the user gave (`sampling.store`) instead of sampling the model."""
        return self.cfg.sampling.get("store")

    @cached_property
    def sample_key(self) -> str:
        if self.given_store:
            # The manifest lists every shard's sha256: it identifies the store's content.
            return config_hash({"store": files_fingerprint([SampleStore.open(self.sample_dir).path
                                                            / "manifest.json"])})
        if self.synthetic_path is not None:
            return config_hash({"synthetic": self.synthetic_records.fingerprint,
                                "shard_size": self.cfg.sampling.shard_size,
                                "storage_dtype": self.storage_dtype})
        return config_hash({"train": self.train_key, "sampling": self.sampling_settings})

    @cached_property
    def sampling_settings(self) -> dict:
        """`sampling.*` as the sample key hashes it. With `per_caption` null, as before it existed (the keys of
        unconditional stores still hold); with it, plus the captions the store is drawn from, less the
        `n_samples` it ignores."""
        sampling = OmegaConf.to_container(self.cfg.sampling, resolve=True)
        if sampling.get("per_caption") is None:
            sampling.pop("per_caption", None)
            return sampling
        sampling.pop("n_samples", None)
        sampling["captions"] = self.prompt_captions
        return sampling

    @cached_property
    def prompt_captions(self) -> list[str]:
        """The distinct captions of the queries (members and non-members), sorted: the prompts of a store drawn
        with `sampling.per_caption` samples per caption (the extraction setting of Carlini et al., 2023)."""
        per_caption = self.cfg.sampling.get("per_caption")
        if isinstance(per_caption, bool) or not isinstance(per_caption, int) or per_caption < 1:
            raise MiaGenError(f"sampling.per_caption must be a positive integer (samples per caption) or null "
                              f"(unconditional samples), got {per_caption!r}.")
        if self.cfg.model.get("family") != "diffusion":
            raise MiaGenError(
                f"sampling.per_caption={per_caption} samples a text-to-image model from the records' captions, but "
                f"model={self.cfg.model.name} is a {self.cfg.model.get('family')} model without text; use a "
                "text-conditioned diffusion model (model=diffusers model.checkpoint=<a StableDiffusionPipeline "
                "directory>) or set sampling.per_caption=null."
            )
        require_captions(self.records, f"sampling.per_caption={per_caption}")
        return sorted(set(self.records.captions(self.query_ids)))

    @property
    def storage_dtype(self) -> str:
        storage_dtype = self.cfg.sampling.storage_dtype
        if storage_dtype == "auto":
            return "uint8" if self.records.kind == "image" else "float32"
        return storage_dtype

    def upstream_keys(self, attack: Attack) -> dict[str, str]:
        """The keys of what an attack reads: the sample store if it uses one, the model if it queries
        it (a given store's key does not hold the model's, so both may be needed)."""
        keys = {}
        if attack.uses_samples:
            keys["samples"] = self.sample_key
        if attack.access is not Access.SAMPLES:
            keys["model"] = self.train_key
        return keys

    def score_identity(self, name: str, attack: Attack) -> dict:
        """Everything an attack's scores depend on; its hash is their cache key (README "Score identity").

        The attack's settings and code (`Attack.version` of it and of any attack it wraps, the package
        version), the keys of the model / sample store it reads (they hold the data, training and
        sampling), the split (it holds the data's fingerprint), the seed and the device type (CPU and
        CUDA kernels agree only to float precision, so a score is reused only on the kind of device that
        computed it), and where the attack uses them: the labelled subset (positions and labels), the
        reference model's keys and the co-membership groups; for white-box attacks on a diffusion model, the
        queries' class labels (a class-conditional model is scored under them). Not keyed: `threads`, paths, the library
        versions and git commit (recorded in the score file, `versions`), and the evaluation settings
        that only change metrics (tests/test_score_identity.py).
        """
        identity = {"attack": name, "config": attack.config,
                    "code": {"mia_gen": mia_gen.__version__, "attacks": attack.code_versions()},
                    "upstream": self.upstream_keys(attack), "split": self.split_key, "seed": int(self.cfg.seed),
                    "device": self.device.type}
        if attack.needs_labelled_subset:  # the scores depend on exactly which records it learns from
            positions, labels = self.labelled_subset()
            identity["labelled_subset"] = config_hash({"positions": positions.tolist(), "labels": labels.tolist()})
        if attack.needs_reference_model:
            identity["reference"] = self.reference_pipeline(attack).upstream_keys(attack)
        if attack.needs_shadow_models:  # the zoo's matrix and every shadow model the scores read
            identity["shadows"] = {"zoo": self.zoo_key, "models": {
                str(k): self.shadow_pipeline(k).upstream_keys(attack) for k in self.trained_shadows()}}
        if attack.group_draw() is not None:  # group scores depend on the groups drawn
            identity["groups"] = config_hash({str(n): rows.tolist()
                                              for n, rows in self.groups(*attack.group_draw()).items()})
        if (attack.access is Access.WHITE_BOX and self.cfg.model.family == "diffusion"
                and self.query_labels is not None):
            # a class-conditional model is scored under each query's class label (`conditions`), and labels
            # are not part of every dataset's fingerprint (an image folder's come from its folder names)
            identity["query_labels"] = config_hash({"labels": self.query_labels.tolist()})
        if (attack.access is Access.WHITE_BOX and self.cfg.model.family == "diffusion"
                and self.records.has_captions):
            # a text model is scored under each query's caption (keyed without loading the model, as labels are)
            identity["query_captions"] = config_hash({"captions": self.records.captions(self.query_ids)})
        return identity

    def attack_key(self, name: str, attack: Attack) -> str:
        return config_hash(self.score_identity(name, attack))

    @cached_property
    def versions(self) -> dict:
        """The code this process runs (`mia_gen.provenance.code_versions`), for results and score files."""
        return code_versions()

    @property
    def config_hash(self) -> str:
        # a synthetic dataset is its own sample key: no model config (which may not even resolve for its data) counts
        trained = None if self.synthetic_path is not None else self.train_key
        return config_hash({"train": trained, "sample": self.sample_key,
                            "attacks": self.cfg.attack, "evaluation": self.cfg.evaluation})

    # ---- train --------------------------------------------------------------------------
    @cached_property
    def model_dir(self) -> Path | str:
        """Where the model lives: the cache, `model.checkpoint`, or a hub id (kept as a string)."""
        checkpoint = self.cfg.model.get("checkpoint")
        if checkpoint:
            path = Path(checkpoint).expanduser()
            if not path.exists() and self.cfg.model.get("allow_download"):
                return str(checkpoint)
            return path.resolve()
        if is_latent_text(self.cfg.model) and finetune_method(self.cfg.model) == "none":
            return self.base_dir  # the pretrained base is the model under attack
        return self.cache_dir / "models" / f"{self.cfg.model.name}-{self.train_key}"

    def train(self) -> Path:
        self.require_model("training")
        if self.cfg.model.get("checkpoint"):
            log.info("train: using the trained model at %s", self.model_dir)
            return self.model_dir
        log.info("train: %s on %d %s -> %s", self.cfg.model.name, len(self.training_ids), self.training_role,
                 self.model_dir)
        self._train_locked()
        return self.model_dir

    @cached_property
    def trained_model_dir(self) -> Path | str:
        """`model_dir` once trained (or given), its files checked against the sizes and sha256 its trainer
        recorded: a weight file damaged on disk since (even with its size and time kept) is never read as good."""
        self.train()
        if isinstance(self.model_dir, Path) and self.model_dir.is_dir():
            verify_recorded_files(self.model_dir, with_trainer_state=False)
        return self.model_dir

    @cached_property
    def generator(self) -> torch.nn.Module:
        return load_generator(self.cfg.model, self.trained_model_dir, self.device, **self.members_table(encoding=True))

    def members_table(self, encoding: bool = False) -> dict:
        """A tabular model's training rows (and the real table's encoding): what it trains and is rebuilt on."""
        if self.cfg.model.get("family") != "tabular":
            return {}
        if self.records.table is None:
            raise MiaGenError(f"model={self.cfg.model.name} trains on a table: use data=table (data.path=<file.csv>).")
        rows = self.records.table.iloc[self.training_ids].reset_index(drop=True)
        if encoding:
            return {"table": rows, "encoding": self.records.encoding}
        return {"table": rows, "schema": self.records.encoding.schema}

    @cached_property
    def denoiser(self) -> torch.nn.Module:
        """The diffusion model as the white-box attacks see it (epsilon prediction, eval mode)."""
        return load_diffusion_denoiser(self.cfg.model, self.trained_model_dir, self.device)

    # ---- sample -------------------------------------------------------------------------
    @cached_property
    def sample_dir(self) -> Path:
        store = self.given_store
        if store:
            return Path(store).expanduser().resolve()
        source = "synthetic" if self.synthetic_path is not None else self.cfg.model.name
        return self.cache_dir / "samples" / f"{source}-{self.sample_key}"

    def sample(self) -> SampleStore:
        if self.given_store:
            return SampleStore.open(self.sample_dir)
        with exclusive(self.sample_dir, self.cache_dir / "locks"):  # parallel jobs needing this store sample it once
            return self._open_or_write_samples()

    def _open_or_write_samples(self) -> SampleStore:
        try:
            store = SampleStore.open(self.sample_dir)
            log.info("sample: cached store %s (%d samples)", self.sample_dir, len(store))
            return store
        except CorruptStoreError as reason:  # a store this pipeline writes: finish or repair it
            if self.sample_dir.exists():
                log.warning("sample: rebuilding the cached store, keeping its intact shards (%s)", reason)
        sampling = self.cfg.sampling
        if self.synthetic_path is not None:
            log.info("sample: importing the synthetic dataset %s -> %s", self.synthetic_path, self.sample_dir)
            return import_samples(
                self.sample_dir, self.synthetic_records.get(np.arange(len(self.synthetic_records))),
                shard_size=int(sampling.shard_size), storage_dtype=self.storage_dtype,
                metadata={"sample_key": self.sample_key, "synthetic": str(self.synthetic_path),
                          "fingerprint": self.synthetic_records.fingerprint},
                progress=self.progress,
            )
        generator = self.generator
        if self.cfg.model.get("family") == "tabular":
            return self._write_table_samples(generator)
        batch_size = int(sampling.batch_size)
        captions = self._captions_per_sample(generator)  # None: unconditional samples

        @torch.no_grad()
        def sample_fn(n: int, rng: torch.Generator, captions: list[str] | None = None):
            z = generator.sample_latent(n, rng)
            if captions is None:
                x = torch.cat([generator(z[i : i + batch_size].to(self.device)).float().cpu()
                               for i in range(0, n, batch_size)])
            else:  # each sample drawn from its own caption
                x = torch.cat([generator(z[i : i + batch_size].to(self.device),
                                         generator.denoiser.text_conditions(captions[i : i + batch_size])
                                         ).float().cpu() for i in range(0, n, batch_size)])
            return x, z

        n_samples = int(sampling.n_samples) if captions is None else len(captions)
        log.info("sample: %d samples -> %s", n_samples, self.sample_dir)
        recorded = OmegaConf.to_container(sampling)
        if recorded.get("per_caption") is None:  # the metadata of stores written before per_caption existed
            recorded.pop("per_caption", None)
        return write_samples(
            self.sample_dir, sample_fn, n_samples, shard_size=int(sampling.shard_size),
            seed=int(self.cfg.seed), storage_dtype=self.storage_dtype,
            metadata={"sample_key": self.sample_key, "train_key": self.train_key,
                      "model": self.cfg.model.name, "sampling": recorded},
            progress=self.progress, captions=captions,
        )

    def _write_table_samples(self, sampler) -> SampleStore:
        """A tabular model's samples: each shard's rows drawn from its shard seed, encoded with the real table's
        encoding into the store; then `synthetic.csv` beside the shards, the same rows as the table they were
        (drawn again from the same seeds), which the gate prints beside the exposed records."""
        sampling = self.cfg.sampling
        n_samples, shard_size = int(sampling.n_samples), int(sampling.shard_size)
        log.info("sample: %d rows -> %s", n_samples, self.sample_dir)
        store = write_samples(
            self.sample_dir, lambda n, rng: (sampler.encoded(n, rng), None), n_samples, shard_size=shard_size,
            seed=int(self.cfg.seed), storage_dtype=self.storage_dtype,
            metadata={"sample_key": self.sample_key, "train_key": self.train_key, "model": self.cfg.model.name,
                      "sampling": OmegaConf.to_container(sampling)},
            progress=self.progress,
        )
        write_table_csv(self.sample_dir / SYNTHETIC_CSV, sampler, n_samples, shard_size, int(self.cfg.seed))
        return store

    def synthetic_table(self):
        """The synthetic rows as a table, row i = sample i: a synthetic file's, or a tabular model's
        `synthetic.csv`; None for other records."""
        if self.records.table is None:
            return None
        if self.synthetic_path is not None:
            return self.synthetic_records.table
        path = self.sample_dir / SYNTHETIC_CSV
        if self.cfg.model.get("family") != "tabular" or not path.is_file():
            return None
        return load_table_like(self.records, str(path), f"the samples' table {path}").table

    def _captions_per_sample(self, generator: torch.nn.Module) -> list[str] | None:
        """The caption of each sample of a store drawn with `sampling.per_caption=n`: n consecutive samples for
        each distinct caption of the queries, in sorted order; None for unconditional samples."""
        per_caption = self.cfg.sampling.get("per_caption")
        if per_caption is None:
            return None
        captions = self.prompt_captions
        kind = getattr(getattr(generator, "denoiser", None), "condition_kind", "none")
        if kind != "text":
            spoken = "class-conditional" if kind == "class" else "unconditional"
            raise MiaGenError(
                f"sampling.per_caption={per_caption} samples a text-to-image model from the records' captions, but "
                f"the diffusion model at {self.model_dir} is {spoken}; use a text-conditioned one (a "
                "StableDiffusionPipeline directory: model=diffusers model.checkpoint=<dir>) or set "
                "sampling.per_caption=null."
            )
        log.info("sample: sampling.per_caption=%d: %d samples for each of the %d distinct captions of the queries "
                 "(sampling.n_samples=%s is ignored)", per_caption, per_caption, len(captions),
                 self.cfg.sampling.n_samples)
        return [caption for caption in captions for _ in range(int(per_caption))]

    @cached_property
    def samples(self) -> SampleStore:
        return self.sample()

    # ---- attack -------------------------------------------------------------------------
    def attacks(self) -> dict[str, Attack]:
        selected = dict(self.cfg.get("attack") or {})
        for name in [name for name, params in selected.items() if unselected_settings(name, params)]:
            log.warning("attack.%s holds settings (%s) but %s was not selected (a preset sets them): not run; select "
                        "it with attack=[...,%s].", name, ", ".join(selected[name]), name, name)
            del selected[name]
        if not selected:
            raise MiaGenError("no attack selected; choose some, e.g. `attack=[sample_distance,domias]`.")
        built = {name: build_attack(name, OmegaConf.to_container(params, resolve=True))
                 for name, params in selected.items()}
        for attack in built.values():
            attack.check_split_sizes(len(self.split.members), len(self.split.non_members))
            if attack.needs_shadow_models and attack.min_shadows > self.zoo.n_shadows:  # before any shadow trains
                raise MiaGenError(
                    f"attack '{attack.name}' needs at least {attack.min_shadows} shadow models ({attack.min_shadows_why}), "
                    f"but zoo.n_shadows={self.zoo.n_shadows}; set zoo.n_shadows >= {attack.min_shadows} (e.g. 8).")
        return built

    def context_for(self, attack: Attack, reference_model: bool = True, shadows: bool = True,
                    ids: np.ndarray | None = None) -> AttackContext:
        """Hand the attack only what its threat model allows: the queries (or the records `ids`) seen
        through this pipeline's model, and, unless switched off, the same view of its reference model
        (`reference_model`) and of the zoo's shadow models and the population records (`shadows`)."""
        ids = self.query_ids if ids is None else np.asarray(ids)
        context = AttackContext(
            queries=self.records.get(ids), record_ids=ids,
            samples=self.samples if attack.uses_samples else None,
            device=self.device, seed=int(self.cfg.seed),
        )
        if getattr(context.samples, "captions", None) is not None:  # a store drawn per caption: the queries' own
            require_captions(self.records, f"the sample store {self.sample_dir}, drawn from captions,")
            context.captions = self.records.captions(ids)
        if attack.access in (Access.QUERY, Access.WHITE_BOX):
            self.require_model(f"attack '{attack.name}' ({attack.access.value} access)")
            context.generator = self.generator
        if attack.access is Access.WHITE_BOX and self.cfg.model.family == "gan":
            context.discriminator = load_discriminator(self.cfg.model, self.trained_model_dir, self.device)
        if attack.access is Access.WHITE_BOX and self.cfg.model.family == "diffusion":
            context.denoiser = self.denoiser
            context.conditions = self.conditions(context.denoiser, ids)
            if getattr(context.denoiser, "condition_kind", "none") == "text":
                context.captions = self.records.captions(ids)
        if attack.needs_labelled_subset:
            context.labelled_subset = self.labelled_subset()
        if attack.needs_reference_data:
            context.reference = self.records.get(self.split.reference)
        if attack.group_draw() is not None:
            context.groups = self.groups(*attack.group_draw())
        if attack.needs_reference_model and reference_model:
            context.reference_model = self.reference_pipeline(attack).context_for(attack, reference_model=False)
            context.reference_model.labelled_subset = context.labelled_subset
        if shadows and attack.needs_population:
            context.population = self.population_view(attack)
        if shadows and attack.needs_shadow_models:
            indices = self.trained_shadows()
            context.shadow_indices = list(indices)
            context.shadow_models = []
            for k in indices:
                shadow = self.shadow_pipeline(k)
                view = shadow.context_for(attack, reference_model=False, shadows=False, ids=ids)
                if attack.needs_population:
                    view.population = shadow.population_view(attack)
                context.shadow_models.append(view)
            context.shadow_membership = np.stack([np.isin(ids, self.zoo.training_records(k)) for k in indices]) \
                if indices else np.zeros((0, len(ids)), dtype=bool)
        return context

    def population_view(self, attack: Attack) -> AttackContext:
        """The population records z of RMIA (the split's reference records: never evaluated, IN no shadow of a
        zoo drawn on the split) seen through this pipeline's model."""
        population = np.asarray(self.split.reference)
        if attack.needs_shadow_models:
            overlap = np.intersect1d(population, self.zoo.record_ids)
            if overlap.size:
                raise MiaGenError(
                    f"the zoo's population holds {overlap.size} of the split's reference records, which attack "
                    f"'{attack.name}' uses as population records z that no shadow trained on; draw the zoo on the "
                    "split (drop zoo.path) or give a zoo file whose population excludes the reference records.")
        return self.context_for(attack, reference_model=False, shadows=False, ids=population)

    def conditions(self, denoiser: torch.nn.Module, ids: np.ndarray | None = None) -> torch.Tensor | None:
        """The conditions of the queries (or of the records `ids`) for a conditional denoiser: their class
        labels, or their captions' text embeddings `(N, L, D)` (`denoiser.text_conditions`); part of the
        record, which the attacker knows, never the membership label. None for an unconditional one."""
        kind = getattr(denoiser, "condition_kind", "none")
        if kind == "none":
            return None
        if kind == "text":  # records without captions stop with the ways to give them
            require_captions(self.records, f"the text-conditioned diffusion model at {self.cfg.model.get('checkpoint')}")
            return denoiser.text_conditions(self.records.captions(self.query_ids if ids is None else ids))
        if kind != "class":
            raise MiaGenError(f"the diffusion model takes {kind} conditions, which the pipeline cannot give yet.")
        if self.records.labels is None:
            raise MiaGenError(
                f"the diffusion model is class-conditional ({denoiser.num_classes} classes) but data="
                f"{self.records.name} has no class labels to condition it on; use a labelled dataset (digits, "
                "mnist, cifar10, an image folder with one sub-folder per class) or an unconditional model."
            )
        if ids is None:
            return self.query_labels.to(torch.int64)
        return self.records.labels[torch.as_tensor(np.asarray(ids))].to(torch.int64)

    @cached_property
    def query_labels(self) -> torch.Tensor | None:
        """The queries' class labels (part of each record; never the membership label); None without labels."""
        labels = self.records.labels
        return None if labels is None else labels[torch.as_tensor(self.query_ids)]

    def reference_pipeline(self, attack: Attack) -> "ReferencePipeline":
        """The reference model of a calibrating attack: trained the same way on reference records."""
        self.require_model(f"attack '{attack.name}' (a reference model)")
        key = (attack.reference_size, attack.reference_checkpoint)
        cache = self.__dict__.setdefault("_reference_pipelines", {})
        if key not in cache:
            cache[key] = ReferencePipeline(self, attack.reference_size, attack.reference_checkpoint)
        return cache[key]

    # ---- shadow zoo -----------------------------------------------------------------------
    @property
    def zoo_config(self):
        return self.cfg.get("zoo") or {}

    @cached_property
    def zoo(self) -> ZooMembership:
        """The zoo's IN/OUT matrix: `zoo.path`, or drawn on the split's members and non-members (every
        evaluated record IN about half of the shadows) and kept as a file in the cache (`zoos/`)."""
        zoo_cfg = self.zoo_config
        if zoo_cfg.get("path"):
            return ZooMembership.load(Path(zoo_cfg.path).expanduser(), self.records)
        k = zoo_cfg.get("n_shadows")
        if k is None:
            raise MiaGenError("this run needs a shadow-model zoo, but zoo.n_shadows is not set; set zoo.n_shadows=K "
                              "(K >= 2, e.g. 8) or give a zoo file with zoo.path=<zoo.json>.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise MiaGenError(f"zoo.n_shadows must be a whole number of shadow models >= 2 (e.g. 8), got {k!r}.")
        seed = int(zoo_cfg.get("seed", self.cfg.seed))
        path = self.cache_dir / "zoos" / ("zoo-" + config_hash({"split": self.split_key, "n_shadows": int(k),
                                                                "seed": seed}) + ".json")
        if path.is_file():
            return ZooMembership.load(path, self.records)
        zoo = draw_zoo(self.records, self.query_ids, int(k), seed=seed)
        zoo.save(path)
        return zoo

    @cached_property
    def zoo_key(self) -> str:
        return config_hash(self.zoo.to_dict())

    def shadow_pipeline(self, index) -> "ShadowPipeline":
        """Shadow model `index` of the zoo (0 <= index < K)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.zoo.n_shadows:
            raise MiaGenError(f"zoo.index={index!r} is not a shadow of this zoo; use an integer in "
                              f"[0, {self.zoo.n_shadows}) (the zoo has zoo.n_shadows={self.zoo.n_shadows}).")
        cache = self.__dict__.setdefault("_shadow_pipelines", {})
        if index not in cache:
            cache[int(index)] = ShadowPipeline(self, int(index))
        return cache[int(index)]

    def trained_shadows(self, train_missing: bool = False) -> list[int]:
        """Indices of the zoo's trained shadows, after training the missing ones when `train_missing`. The
        first call fixes the list for the run; fewer than the zoo's K is a warning with the count and the
        command that trains the rest (the attacks then fit on the trained ones)."""
        if "_trained_shadows" in self.__dict__:
            return self.__dict__["_trained_shadows"]
        k = self.zoo.n_shadows
        if train_missing:
            for index in range(k):
                self.shadow_pipeline(index).train()
        trained = [index for index in range(k) if self.shadow_pipeline(index).is_trained()]
        if len(trained) < k:
            log.warning(
                "the shadow zoo is INCOMPLETE: %d of %d shadow models are trained (missing: %s); the shadow attacks "
                "fit on these %d only. Train the rest with `mia-gen-train -m <the same overrides> "
                "zoo.index='range(0,%d)'` (trained ones are skipped), or let `mia-gen` train them "
                "(zoo.train_missing=true).", len(trained), k,
                ", ".join(str(i) for i in range(k) if i not in trained), len(trained), k)
        self.__dict__["_trained_shadows"] = trained
        return trained

    def labelled_subset(self) -> tuple[np.ndarray, np.ndarray]:
        """A seeded share of the queries, with labels, for attacks that learn (and for learnt signs); evaluation
        drops it. Stratified as SecMI's NNs attack draws it: the same fraction of the members and of the
        non-members (`evaluation.labelled_fraction`, 20% by default), so both classes are in it in their ratio."""
        fraction = float(self.cfg.evaluation.labelled_fraction)
        is_member = np.isin(self.query_ids, self.split.members)
        rng = np.random.default_rng([int(self.cfg.seed), 7])
        chosen = []
        for members in (True, False):
            side = np.flatnonzero(is_member == members)
            n_labelled = int(round(fraction * len(side)))
            if not 0 < n_labelled < len(side):
                raise MiaGenError(
                    f"evaluation.labelled_fraction={fraction} of the {len(side)} "
                    f"{'members' if members else 'non-members'} leaves none of them to learn from or none to evaluate "
                    "on; use a value in (0, 1), e.g. 0.2, or a larger split.")
            chosen.append(rng.choice(side, size=n_labelled, replace=False))
        positions = np.sort(np.concatenate(chosen))
        return positions, is_member[positions].astype(int)

    def groups(self, sizes: list[int], n_groups: int) -> dict[int, np.ndarray]:
        """Seeded co-membership groups (`mia_gen.groups.draw_groups`): per size n, `n_groups` groups of n
        members and as many of n non-members, as positions into the queries, shuffled together; the attack
        gets them unlabelled. Records that evaluation leaves out (a labelled calibration subset under
        `evaluation.sign=labelled_subset`) are never drawn."""
        is_member = np.isin(self.query_ids, self.split.members)
        eligible = None
        if self.cfg.evaluation.get("sign", "declared") == "labelled_subset":
            eligible = np.setdiff1d(np.arange(len(self.query_ids)), self.labelled_subset()[0])
        return draw_groups(is_member, sizes, n_groups, seed=int(self.cfg.seed), eligible=eligible)

    def score_path(self, name: str, attack: Attack, identity: dict | None = None) -> Path:
        """The score file of an attack (`identity`: its `score_identity`, when the caller has it already)."""
        key = config_hash(identity) if identity is not None else self.attack_key(name, attack)
        return self.cache_dir / "scores" / f"{name}-{key}.json"

    def attack(self, require_cached: bool = False) -> dict[str, dict]:
        """Per-record scores of every selected attack, from the cache or computed now. Each entry also
        holds, in memory only, `file`: the name of the score file it came from or went to."""
        scored = {}
        for name, attack in self.attacks().items():
            if attack.needs_shadow_models:  # which shadows exist is part of the scores' identity
                self.trained_shadows(train_missing=bool(self.zoo_config.get("train_missing", True)) and not require_cached)
            identity = self.score_identity(name, attack)
            path = self.score_path(name, attack, identity)
            if path.is_file():
                scored[name] = {**json.loads(path.read_text()), "file": path.name}
                computed_with = scored[name].get("versions") or {}
                log.info("attack %s: cached scores %s (computed by mia-gen %s, commit %s)", name, path.name,
                         computed_with.get("mia_gen"), computed_with.get("git_commit"))
                continue
            if require_cached:
                raise MiaGenError(
                    f"no cached scores for attack '{name}' ({path}); run `mia-gen-attack` (or "
                    "`mia-gen`) with the same overrides first."
                )
            log.info("attack %s (%s access): scoring %d records", name, attack.access.value,
                     len(self.query_ids))
            context = self.context_for(attack)
            started = time.perf_counter()
            output: AttackOutput = attack(context)
            seconds = time.perf_counter() - started
            if attack.needs_shadow_models:
                output.info["n_shadows_requested"] = self.zoo.n_shadows
            entry = {
                "attack": name, "access": attack.access.value, "config": attack.config,
                "record_ids": self.query_ids.tolist(), "scores": output.scores.tolist(),
                "neighbour_indices": None if output.neighbour_indices is None
                else np.asarray(output.neighbour_indices).tolist(),
                "info": output.info, "seconds": seconds,
                # what the key hashes, and the code and device that computed the scores: traceable
                "identity": identity, "versions": self.versions, "device": str(self.device),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(path, entry)
            scored[name] = {**entry, "file": path.name}
        return scored

    # ---- utility ------------------------------------------------------------------------
    def utility(self) -> dict | None:
        """The samples' utility (`mia_gen/utility.py`), cached by the sample store and utility config;
        draws the samples if no attack did. None when `utility.metric` resolves to none."""
        from mia_gen.utility import CLASSIFIER_RECIPE, UtilityConfig, choose_metric, measure_utility

        config = UtilityConfig.from_config(self.cfg.get("utility"))
        metric = choose_metric(config, self.records)
        if metric == "none":
            return measure_utility(self.records, None, config, self.cache_dir, self.device, int(self.cfg.seed))
        path = self.cache_dir / "utility" / (
            f"{metric}-" + config_hash({"sample": self.sample_key, "data": self.records.fingerprint,
                                        "config": config.__dict__, "metric": metric, "seed": int(self.cfg.seed),
                                        "recipe": CLASSIFIER_RECIPE if metric == "fid_classifier" else None})
            + ".json")
        if path.is_file():
            return json.loads(path.read_text())
        result = measure_utility(self.records, self.samples, config, self.cache_dir, self.device, int(self.cfg.seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, result)
        return result

    # ---- evaluate -----------------------------------------------------------------------
    def metadata(self, scored: dict[str, dict]) -> dict:
        """The run's metadata; `scored` (`attack()`'s entries) gives per attack the score file its scores were
        read from, and the code (`versions`) and device that computed them: a reused score stays traceable."""
        meta = {
            "config_hash": self.config_hash, "train_key": None if self.synthetic_path is not None else self.train_key,
            "sample_key": self.sample_key, "split_key": self.split_key,
            "data": self.records.info(),
            "model": {"synthetic": str(self.synthetic_path),
                      "fingerprint": self.synthetic_records.fingerprint}
            if self.synthetic_path is not None
            else {"name": self.cfg.model.name, "family": self.cfg.model.family, "dir": str(self.model_dir)},
            "split": {"membership": membership_source(self.cfg.split) or "drawn",
                      "n_members": len(self.split.members), "n_non_members": len(self.split.non_members),
                      "n_reference": len(self.split.reference), "seed": self.split.seed},
            "seed": int(self.cfg.seed), "device": str(self.device), "versions": self.versions,
            "scores": {name: {"file": entry["file"], "versions": entry.get("versions"), "device": entry.get("device")}
                       for name, entry in scored.items()},
        }
        if self.synthetic_path is None:
            defense = self.defense
            configured = self.cfg.get("defense")
            meta["defense"] = {"name": defense.name, "strength": defense.strength,
                               "config": {"name": "none"} if configured is None
                               else OmegaConf.to_container(configured, resolve=True)}
            if "steps" in (self.cfg.model.get("training") or {}) and not self.cfg.model.get("checkpoint"):
                meta["training_steps"] = int(self.trained_as[0].training.steps)
        utility = self.utility()
        if utility is not None:
            meta["utility"] = utility
        if self.synthetic_path is None and isinstance(self.model_dir, Path):
            from mia_gen.models.privacy import read_privacy_report

            privacy = read_privacy_report(self.model_dir)
            if privacy is not None:
                meta["privacy"] = privacy
        if "_trained_shadows" in self.__dict__:  # a shadow attack ran (or read its cached scores)
            meta["zoo"] = {"n_shadows": self.zoo.n_shadows, "trained": self.trained_shadows(),
                           "zoo_key": self.zoo_key, "seed": self.zoo.seed,
                           "population": len(self.zoo.record_ids)}
        if self.sample_dir.is_dir():
            store = SampleStore.open(self.sample_dir)
            meta["samples"] = {"n_samples": len(store), "dir": str(self.sample_dir),
                               "shape": list(store.sample_shape)}
        return meta

    def evaluate(self, require_cached: bool = False, on_written=None) -> list[dict]:
        """Metrics and outputs of the scores; `on_written(results)` runs after the files, before W&B."""
        from mia_gen.experiments.evaluation import write_outputs

        scored = self.attack(require_cached=require_cached)
        return write_outputs(self, scored, on_written=on_written)

    def run(self, stage: str = "evaluate") -> object:
        """Run up to and including `stage`, reusing every cached earlier stage."""
        if stage not in STAGES:
            raise MiaGenError(f"unknown stage '{stage}'; use one of {STAGES}.")
        index = self.zoo_config.get("index")
        if index is not None:  # one job of the zoo's multirun
            if stage != "train":
                raise MiaGenError(
                    f"zoo.index={index} trains one shadow model of the zoo; run it with `mia-gen-train` (the zoo as "
                    "a multirun: `mia-gen-train -m <overrides> zoo.index='range(0,K)'`), then attack without zoo.index.")
            return self.shadow_pipeline(index).train()
        if stage == "train":
            return self.train()
        if stage == "sample":
            return self.sample()
        if stage == "attack":
            return self.attack()
        from mia_gen.utility import UtilityConfig

        UtilityConfig.from_config(self.cfg.get("utility"))  # a bad setting or missing [fid] extra stops before any work
        return self.evaluate()



class SameRecipePipeline(Pipeline):
    """A model trained exactly as the target (same data, model, defense and training config) on other
    records, seeing the same queries: a reference model or a shadow model. Cached under its own keys
    (`<prefix>-<model>-<key>`), keyed by the records it trains on."""

    prefix = ""  # "reference" or "shadow": names its model and sample directories
    records_key = ""  # the name its training records have in the model key

    def __init__(self, parent: Pipeline, training_ids: np.ndarray):
        super().__init__(parent.cfg, parent.run_dir)
        self.parent = parent
        self.__dict__["records"] = parent.records
        self.__dict__["split"] = parent.split
        self.__dict__["query_ids"] = parent.query_ids
        for name in ("zoo", "public_ids", "base_key"):  # the same for every model of the run: read (or hashed) once
            if name in parent.__dict__:
                self.__dict__[name] = parent.__dict__[name]
        self._training_ids = np.asarray(training_ids)

    @property
    def training_ids(self) -> np.ndarray:
        return self._training_ids

    @cached_property
    def model_dir(self) -> Path:
        return self.cache_dir / "models" / f"{self.prefix}-{self.cfg.model.name}-{self.train_key}"

    @cached_property
    def train_key(self) -> str:
        model, defense = self.trained_as
        return config_hash({
            "data": self.data_key, "fingerprint": self.records.fingerprint,
            self.records_key: self.training_ids.tolist(), "model": model, "defense": defense,
        })

    @cached_property
    def sample_dir(self) -> Path:
        return self.cache_dir / "samples" / f"{self.prefix}-{self.cfg.model.name}-{self.sample_key}"

    given_store = None  # a store given for the target (sampling.store) is not this model's


class ReferencePipeline(SameRecipePipeline):
    """The reference model of a calibrating attack: trained as the target on reference records, disjoint
    from the members and the evaluated non-members (`reference-<model>-<key>`), or a given checkpoint."""

    training_role = "reference records"
    prefix, records_key = "reference", "reference_records"

    def __init__(self, parent: Pipeline, size="members", checkpoint: str | None = None):
        if checkpoint is None and parent.cfg.model.get("checkpoint"):
            raise MiaGenError(
                "calibration: the target model is a given checkpoint (model.checkpoint), so the reference "
                "model cannot be trained the same way here; train one on reference records and set "
                "attack.<name>.reference_checkpoint=<its directory>."
            )
        reference = np.asarray(parent.split.reference)
        if size == "members":
            n = len(parent.split.members)
        elif size == "all":
            n = len(reference)
        elif isinstance(size, int) and not isinstance(size, bool) and size > 0:
            n = size
        else:
            raise MiaGenError(f"reference_size must be 'members', 'all' or a positive integer, got {size!r}.")
        if checkpoint is None and (len(reference) == 0 or n > len(reference)):
            raise MiaGenError(
                f"calibration needs {n} reference records to train the reference model, but the split has "
                f"{len(reference)}; raise split.n_reference (e.g. split.n_reference={max(n, 1)}) or set "
                "attack.<name>.reference_size lower."
            )
        super().__init__(parent, reference[:n])
        self.checkpoint = checkpoint

    @cached_property
    def model_dir(self) -> Path:
        if self.checkpoint is not None:
            path = Path(self.checkpoint).expanduser().resolve()
            if not path.is_dir():
                raise MissingAssetError(
                    f"reference_checkpoint {path} does not exist; give the directory of a model trained on "
                    "reference records."
                )
            return path
        return super().model_dir

    @cached_property
    def train_key(self) -> str:
        if self.checkpoint is not None:
            files = [*self.model_dir.rglob("*.safetensors"), *self.model_dir.rglob("*.json")]
            return config_hash({"reference_checkpoint": files_fingerprint(files)})
        return super().train_key

    def lineage_key(self) -> str | None:
        return None if self.checkpoint is not None else super().lineage_key()

    def train(self) -> Path:
        if self.checkpoint is not None:
            return self.model_dir
        log.info("train: reference %s on %d reference records -> %s", self.cfg.model.name, len(self.training_ids),
                 self.model_dir)
        self._train_locked()
        return self.model_dir


class ShadowPipeline(SameRecipePipeline):
    """Shadow model `index` of the zoo: trained as the target on the zoo's IN records for it
    (`shadow-<model>-<key>`, keyed by those records, so a zoo drawn again the same way finds its shadows
    trained). A finished one holds FINISHED_JSON; a killed one resumes from its last checkpoint."""

    training_role = "zoo records"
    prefix, records_key = "shadow", "shadow_records"

    def __init__(self, parent: Pipeline, index: int):
        if parent.cfg.model.get("checkpoint"):
            raise MiaGenError(
                f"shadow models are trained the same way as the target, but the target is a given checkpoint "
                f"(model.checkpoint={parent.cfg.model.checkpoint}) whose recipe mia-gen does not know; train the "
                "target with mia-gen (drop model.checkpoint) to attack it with shadow models.")
        super().__init__(parent, parent.zoo.training_records(index))
        self.index = index

    def is_trained(self) -> bool:
        """Marked finished; whether its files are whole is checked when it is used (`train`, `trained_model_dir`)."""
        return (self.model_dir / FINISHED_JSON).is_file()

    def train(self) -> Path:
        if self.is_trained():
            if not any(self.model_dir.rglob("*.safetensors")):  # finished.json alone is no model
                raise CorruptStoreError(
                    f"shadow {self.index} at {self.model_dir} is marked finished ({FINISHED_JSON}) but holds no weights "
                    f"(deleted?). Delete the whole folder {self.model_dir} and run again to train it anew.")
            log.info("train: shadow %d of %d is trained (%s)", self.index, self.parent.zoo.n_shadows, self.model_dir)
            return self.model_dir
        log.info("train: shadow %d of %d, %s on %d zoo records -> %s", self.index, self.parent.zoo.n_shadows,
                 self.cfg.model.name, len(self.training_ids), self.model_dir)
        self._train_locked()
        _write_json_atomic(self.model_dir / FINISHED_JSON, {"train_key": self.train_key,
                                                            "n_records": len(self.training_ids)})
        return self.model_dir
