"""Shared Hydra entry point: every console script runs the pipeline up to its stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mia_gen.errors import MiaGenError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

log = logging.getLogger("mia_gen")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise


def run_stage(cfg: DictConfig, stage: str):
    from mia_gen.pipeline import Pipeline

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
