"""Save a model as `<name>.safetensors` + `<name>.json` (its config) and rebuild it from them; write
a trainer's checkpoint so that a crash never leaves a half-written one, and verify it on load.

No pickles: weights go through safetensors, the architecture through the JSON `_target_`, which
must name a class inside the `mia_gen.models` package (a checkpoint cannot make us import arbitrary code).
Checkpoints written before mia-gen had one namespace name `models.<module>.<Class>`; they load as
`mia_gen.models.<module>.<Class>` (`canonical_target`), never as a top-level `models` package (which,
in a user's project, would be their own code).
"""

import importlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mia_gen.checksums import check_file, record_file
from mia_gen.errors import CorruptStoreError, MiaGenError, MissingAssetError

log = logging.getLogger(__name__)

ALLOWED_TARGET_PACKAGE = "mia_gen.models."
LEGACY_TARGET_PACKAGE = "models."  # checkpoints written before the single namespace (mia-gen <= 0.1)


def canonical_target(target: object) -> object:
    """A checkpoint's `_target_` in today's namespace: `models.dcgan.X` (pre-namespace) -> `mia_gen.models.dcgan.X`."""
    if isinstance(target, str) and target.startswith(LEGACY_TARGET_PACKAGE):
        return "mia_gen." + target
    return target


def atomic_replace(path: Path, write) -> None:
    """Call `write(tmp_path)` then move tmp onto `path`, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_module(module: nn.Module, directory: str | os.PathLike, name: str) -> Path:
    """Write `directory/<name>.safetensors` (weights, on CPU) and `directory/<name>.json` (`module.config`).

    Each file is written atomically. Returns the path of the weights file.
    """
    config = getattr(module, "config", None)
    if not isinstance(config, dict) or "_target_" not in config:
        raise MiaGenError(
            f"{type(module).__name__} has no `config` dict with a `_target_`, so it could not be rebuilt; "
            "derive the model from mia_gen.models.gan.Generator / Discriminator (or give it a `config` property)."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    weights = directory / f"{name}.safetensors"
    atomic_replace(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_replace(directory / f"{name}.json", lambda tmp: tmp.write_text(text))
    return weights


def _resolve_target(target: object, source: Path) -> type:
    target = canonical_target(target)
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PACKAGE):
        raise MiaGenError(
            f"{source} names _target_={target!r}, which is outside the `mia_gen.models` package; mia-gen only "
            "rebuilds its own model classes from checkpoints. Put the class under models/ and save it again."
        )
    module_path, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError) as err:
        raise MiaGenError(
            f"{source} names _target_={target!r}, which cannot be imported ({err}); the checkpoint was "
            "written by another version of mia-gen or the class was renamed. Retrain (`mia-gen-train`)."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith(ALLOWED_TARGET_PACKAGE)):
        raise MiaGenError(
            f"{source} names _target_={target!r}, which is not a model class defined in the `mia_gen.models` package."
        )
    return cls


def load_module(directory: str | os.PathLike, name: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild `directory/<name>` from its JSON config and safetensors weights; returned in eval() mode on `map_location`."""
    directory = Path(directory)
    weights, config_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    for path in (config_path, weights):
        if not path.is_file():
            raise MissingAssetError(
                f"Checkpoint file {path} does not exist. Train a model first (`mia-gen-train`) or point "
                f"model.checkpoint=<dir> at an existing checkpoint directory holding {name}.safetensors "
                f"and {name}.json."
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptStoreError(f"{config_path} is not valid JSON ({err}); delete {directory} and retrain.") from err
    if not isinstance(config, dict):
        raise CorruptStoreError(f"{config_path} does not hold a config object; delete {directory} and retrain.")
    kwargs = dict(config)
    cls = _resolve_target(kwargs.pop("_target_", None), config_path)
    try:
        module = cls(**kwargs)
    except TypeError as err:
        raise CorruptStoreError(
            f"{config_path} does not match the constructor of {cls.__name__} ({err}); delete {directory} and retrain."
        ) from err
    try:
        state = load_file(str(weights), device="cpu")
        module.load_state_dict(state)
    except (SafetensorError, RuntimeError) as err:
        raise CorruptStoreError(
            f"{weights} could not be loaded into {cls.__name__} ({err}); the file is damaged or belongs to "
            f"another model. Delete {directory} and retrain."
        ) from err
    return module.to(map_location).eval()


STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"
# A checkpoint is written here in full, then moved into the output directory (`save_checkpoint`).
STAGING = ".checkpoint-next"


def retrain_hint(out_dir: Path) -> str:
    return f"Delete {out_dir} and train again (a model the pipeline cached is retrained by the next run)."


def save_checkpoint(out_dir: Path, write: Callable[[Path], None], summary: dict) -> None:
    """Write a trainer's checkpoint so that a crash at any moment leaves a whole one in `out_dir`.

    `write(folder)` writes every file of the checkpoint into a staging folder; their sizes and sha256
    go into `summary["files"]`, and `summary` is written there LAST as STATE_JSON. Only then do the
    files move into `out_dir` (STATE_JSON last): a crash before leaves the previous checkpoint
    untouched, a crash while moving is finished by the next `read_checkpoint_summary`.
    """
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    files = {path.relative_to(staging).as_posix(): record_file(path)
             for path in sorted(staging.rglob("*")) if path.is_file()}
    text = json.dumps({**summary, "files": files}, indent=2)
    atomic_replace(staging / STATE_JSON, lambda tmp: tmp.write_text(text))
    _commit(out_dir)


def _commit(out_dir: Path) -> None:
    """Move a complete staged checkpoint into `out_dir`; safe to repeat after a crash part-way."""
    staging = out_dir / STAGING
    for entry in sorted(staging.iterdir()):
        if entry.name == STATE_JSON:
            continue
        target = out_dir / entry.name
        if entry.is_dir():  # a folder (diffusers' unet/) is not replaced by a rename
            shutil.rmtree(target, ignore_errors=True)
        os.replace(entry, target)
    os.replace(staging / STATE_JSON, out_dir / STATE_JSON)
    staging.rmdir()


def read_checkpoint_summary(out_dir: Path) -> dict | None:
    """The trainer summary (STATE_JSON) of the checkpoint in `out_dir`, None if there is none yet.

    First finishes a checkpoint whose move into `out_dir` a crash interrupted, and drops one that
    was still being written (the previous checkpoint then stands).
    """
    staging = out_dir / STAGING
    if (staging / STATE_JSON).is_file():
        log.info("train: finishing the checkpoint a crash left half-moved into %s", out_dir)
        _commit(out_dir)
    elif staging.exists():
        shutil.rmtree(staging)
    state_json = out_dir / STATE_JSON
    if not state_json.is_file():
        return None
    try:
        summary = json.loads(state_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptStoreError(f"{state_json} is not valid JSON ({err}). {retrain_hint(out_dir)}") from err
    if not isinstance(summary, dict) or not isinstance(summary.get("step"), int):
        raise CorruptStoreError(f"{state_json} does not hold a trainer summary with a step. {retrain_hint(out_dir)}")
    return summary


def record_rewritten_files(out_dir: Path, names: list[str]) -> None:
    """Record the new size and sha256 of checkpoint files a caller rewrote on purpose (FedAvg puts the
    global weights into each client's checkpoint), so that resuming does not take them for damage."""
    summary = read_checkpoint_summary(out_dir)
    if summary is None or "files" not in summary:
        return
    for name in names:
        summary["files"][name] = record_file(out_dir / name)
    text = json.dumps(summary, indent=2)
    atomic_replace(out_dir / STATE_JSON, lambda tmp: tmp.write_text(text))


def verify_checkpoint(out_dir: Path, summary: dict, with_trainer_state: bool) -> None:
    """Check the checkpoint's files against the sizes and sha256 its summary recorded (hashed once per
    process, `mia_gen.checksums`); STATE_PT only when resuming. Checkpoints written before files were
    recorded have no records: their loaders still refuse unreadable files."""
    for name, record in (summary.get("files") or {}).items():
        if name == STATE_PT and not with_trainer_state:
            continue
        problem = check_file(out_dir / name, record)
        if problem is not None:
            raise CorruptStoreError(
                f"The checkpoint in {out_dir} is damaged: {name} {problem}. {retrain_hint(out_dir)}"
            )


def verify_recorded_files(out_dir: Path, with_trainer_state: bool) -> None:
    """`verify_checkpoint` of the checkpoint in `out_dir` when its trainer recorded one (a model saved without a
    trainer summary, e.g. the memorizer or a pipeline trained elsewhere, has nothing to check against)."""
    summary = read_checkpoint_summary(out_dir)
    if summary is not None:
        verify_checkpoint(out_dir, summary, with_trainer_state)


def load_trainer_state(out_dir: Path, start: int) -> dict:
    """The resume state (optimizers, data order, RNGs) a trainer saved at step `start`.

    `trainer_state.json` (written last) says which step the checkpoint holds; the `.pt` file must
    exist, load and agree, else the checkpoint must not be resumed from.
    """
    if not (out_dir / STATE_PT).is_file():
        raise CorruptStoreError(
            f"{out_dir / STATE_PT} is missing although {STATE_JSON} says step {start}; the checkpoint is "
            f"incomplete. {retrain_hint(out_dir)}"
        )
    try:
        state = torch.load(out_dir / STATE_PT, map_location="cpu", weights_only=True)
        step = int(state["step"])
    except Exception as err:  # torch raises many types for a truncated or garbled archive
        raise CorruptStoreError(
            f"{out_dir / STATE_PT} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"the trainer state is damaged. {retrain_hint(out_dir)}"
        ) from err
    if step != start:
        raise CorruptStoreError(
            f"{out_dir / STATE_PT} is at step {state['step']} but {STATE_JSON} says {start}; the checkpoint is "
            f"inconsistent. {retrain_hint(out_dir)}"
        )
    return state
