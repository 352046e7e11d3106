"""Shared Hydra entry point: every console script runs the pipeline up to its stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mia_gen.errors import MiaGenError

def _config_dir() -> str:
    """The Hydra configs shipped as package data (`mia_gen.configs`): the checkout's `configs/` in an
    editable install, `site-packages/mia_gen/configs` in a wheel. Add your own config directory (e.g.
    your own `experiment=` presets) with `hydra.searchpath=[file:///path/to/configs]`."""
    from importlib.resources import files

    return str(Path(str(files("mia_gen.configs"))).resolve())


CONFIG_DIR = _config_dir()

log = logging.getLogger("mia_gen")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise


def run_stage(cfg: DictConfig, stage: str):
    from mia_gen.experiments.pipeline import Pipeline

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    pipeline = Pipeline(cfg, run_dir)
    if stage == "evaluate_only":
        return pipeline.evaluate(require_cached=True)
    return pipeline.run(stage)


def exit_for_version() -> bool:
    """`--version` on any console script: print the package version (and the checkout's commit) instead
    of running; True when it did."""
    if "--version" not in sys.argv[1:]:
        return False
    import mia_gen
    from mia_gen.provenance import git_state

    commit, _ = git_state()
    print(f"mia-gen {mia_gen.__version__}" + (f" (git {commit[:12]})" if commit else ""))
    return True


USAGE_ERROR = 2  # exit code: the command line, config or input cannot be used; the message says what to change
# (0 = done; 1 = a crash, i.e. a bug, with its traceback; mia-gen-audit adds its own verdict codes)

# hydra/launcher=<name> -> the Hydra plugin it needs (an extra); without it Hydra's own error is obscure
LAUNCHER_PLUGINS = {"parallel": "hydra_plugins.hydra_joblib_launcher", "slurm": "hydra_plugins.hydra_submitit_launcher"}


def exit_for_missing_launcher(prog: str = "mia-gen") -> None:
    """`hydra/launcher=parallel|slurm` on the command line without its plugin installed: print the
    `pip install "mia-gen[...]"` line and exit `USAGE_ERROR` before Hydra starts."""
    from mia_gen.errors import MissingExtraError
    from mia_gen.extras import require

    for arg in sys.argv[1:]:
        key, _, name = arg.partition("=")
        if key.lstrip("+") == "hydra/launcher" and name in LAUNCHER_PLUGINS:
            try:
                require(LAUNCHER_PLUGINS[name], f"hydra/launcher={name}")
            except MissingExtraError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                sys.exit(USAGE_ERROR)


def hydra_entry(stage: str):
    """A console-script `main` that runs the pipeline up to `stage` with Hydra's full CLI.

    Hydra exits 1 on its own errors (a typo'd key, an unknown config group option), the code of a crash;
    `main` turns an error raised before any job started into `USAGE_ERROR`, so each code means one thing.
    """
    started: list[bool] = []

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def job(cfg: DictConfig) -> None:
        started.append(True)
        try:
            run_stage(cfg, stage)
        except MiaGenError as error:
            log.error("%s", error)
            print(f"mia-gen: error: {error}", file=sys.stderr)
            if HydraConfig.get().mode.name == "RUN":
                sys.exit(USAGE_ERROR)
            raise  # in a multirun, Hydra records the failed job and goes on with the others

    def main() -> None:
        if exit_for_version():
            return
        exit_for_missing_launcher()
        started.clear()
        try:
            job()
        except SystemExit as exit_:
            if exit_.code == 1 and not started:
                print("mia-gen: error: the command line or config is invalid (Hydra's message above).",
                      file=sys.stderr)
                sys.exit(USAGE_ERROR)
            raise

    return main
