"""Which code produced a result: mia-gen's version, the git commit of a checkout, library versions.

`results.json` (`metadata["versions"]`) and every cached score file record `code_versions()`, so a
number can be traced to the code that computed it.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

DISTRIBUTION = "mia-gen"
# The repository root when the package runs from a checkout (setup.cfg lies beside the package folders).
CHECKOUT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "diffusers", "numpy")  # each module is its distribution's name


def package_version() -> str:
    """mia-gen's version: from the checkout's setup.cfg when the package runs from one (an editable
    install's metadata keeps the version it was installed with), else from the installed
    distribution's metadata; "0+unknown" when neither says."""
    setup_cfg = CHECKOUT / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(setup_cfg)
        if parser.get("metadata", "name", fallback=None) == DISTRIBUTION:
            return parser.get("metadata", "version")
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package runs from; (None, None) when it is not one (an
    installed package) or git is missing. dirty: tracked or untracked, not ignored, files differ."""
    if not (CHECKOUT / ".git").exists():
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain")
    return commit.strip(), None if status is None else bool(status.strip())


def library_version(module: str) -> str | None:
    """The version of the module as loaded when the run imported it, else of its installed distribution."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_versions() -> dict:
    """{"mia_gen", "git_commit", "git_dirty", "python", "torch", "diffusers", "numpy"}: the code that
    produces a result (versions as strings; git_commit and git_dirty None outside a checkout)."""
    import mia_gen

    commit, dirty = git_state()
    return {"mia_gen": mia_gen.__version__, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), **{module: library_version(module) for module in LIBRARIES}}
