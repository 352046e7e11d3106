"""Stable hashes of configs and arrays: the keys of the stage cache and of split fingerprints."""

import hashlib
import json
from typing import Any

import numpy as np


def to_plain(obj: Any) -> Any:
    """Convert OmegaConf containers, numpy scalars and paths into JSON-able plain values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def config_hash(obj: Any, length: int = 16) -> str:
    """Hash of a config (dict / DictConfig) that does not depend on key order."""
    canonical = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def array_fingerprint(array: np.ndarray, name: str = "") -> str:
    """sha256 of an array's name, dtype, shape and bytes: identifies a dataset's exact content."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def model_files(directory) -> list:
    """Every file under a model directory that loading may read: all regular files but hidden ones and the
    trainer's sample grids (`samples/`). A tokenizer's merges.txt edited in place is another model."""
    from pathlib import Path

    root = Path(directory)
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and not any(part.startswith(".") or part == "samples" for part in path.relative_to(root).parts))


def files_fingerprint(paths) -> str:
    """sha256 of the names and bytes of some files: identifies a model or a store by content,
    so that an artefact replaced in place is never mistaken for the one that was cached."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}|".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
