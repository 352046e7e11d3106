"""Save a model as `<name>.safetensors` + `<name>.json` (its config) and rebuild it from them.

No pickles: weights go through safetensors, the architecture through the JSON `_target_`, which
must name a class inside the `models.` package (a checkpoint cannot make us import arbitrary code).
"""

import importlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mia_gen.errors import CorruptStoreError, MiaGenError, MissingAssetError

ALLOWED_TARGET_PACKAGE = "models."


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
            "derive the model from models.gan.Generator / Discriminator (or give it a `config` property)."
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
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PACKAGE):
        raise MiaGenError(
            f"{source} names _target_={target!r}, which is outside the `models.` package; mia-gen only "
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
            f"{source} names _target_={target!r}, which is not a model class defined in the `models.` package."
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


def load_trainer_state(out_dir: Path, start: int) -> dict:
    """The resume state (optimizers, data order, RNGs) a trainer saved at step `start`.

    `trainer_state.json` (written last) says which step the checkpoint holds; the `.pt` file must
    exist and agree, else the checkpoint is half-written and must not be resumed from.
    """
    if not (out_dir / STATE_PT).is_file():
        raise CorruptStoreError(
            f"{out_dir / STATE_PT} is missing although {STATE_JSON} says step {start}; the checkpoint is "
            "incomplete. Delete the output directory and retrain."
        )
    state = torch.load(out_dir / STATE_PT, map_location="cpu", weights_only=True)
    if int(state["step"]) != start:
        raise CorruptStoreError(
            f"{out_dir / STATE_PT} is at step {state['step']} but {STATE_JSON} says {start}; the checkpoint is "
            "inconsistent. Delete the output directory and retrain."
        )
    return state
