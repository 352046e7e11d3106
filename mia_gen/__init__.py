"""mia-gen: membership inference attacks against generative models.

`import mia_gen` is cheap: the names below are imported on first use, from where they live
(`mia_gen.experiments.api` for the Python API, the core modules for the rest), so the core never
imports a higher layer::

    import mia_gen
    scores = mia_gen.score("sample_distance", records, samples=generated)
    print(mia_gen.evaluate(scores, is_member)["auc"])
"""

from __future__ import annotations

import importlib
from typing import Any

from mia_gen.errors import MiaGenError
from mia_gen.provenance import package_version

# name -> the module that defines it, imported on first access.
_LAZY = {
    "load_denoiser": "mia_gen.experiments.api",
    "load_generator": "mia_gen.experiments.api",
    "load_discriminator": "mia_gen.experiments.api",
    "build_attack": "mia_gen.experiments.api",
    "score": "mia_gen.experiments.api",
    "evaluate": "mia_gen.experiments.api",
    "Attack": "mia_gen.experiments.api",  # re-exported there from mia_gen.attacks.base
    "AttackContext": "mia_gen.experiments.api",
    "Access": "mia_gen.experiments.api",
    "SampleStore": "mia_gen.sample_store",
    "InMemorySampleStore": "mia_gen.sample_store",
    "write_samples": "mia_gen.sample_store",
    "import_samples": "mia_gen.sample_store",
    "evaluate_scores": "mia_gen.metrics",
    "MissingAssetError": "mia_gen.errors",
    "CorruptStoreError": "mia_gen.errors",
    "MissingExtraError": "mia_gen.errors",
}

__all__ = ["MiaGenError", *_LAZY]
__version__ = package_version()  # part of every score's cache key (README "Score identity")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mia_gen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
