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


def hydra_entry(stage: str):
    """A console-script `main` that runs the pipeline up to `stage` with Hydra's full CLI."""

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        try:
            run_stage(cfg, stage)
        except MiaGenError as error:
            log.error("%s", error)
            print(f"mia-gen: error: {error}", file=sys.stderr)
            if HydraConfig.get().mode.name == "RUN":
                sys.exit(2)
            raise  # in a multirun, Hydra records the failed job and goes on with the others

    return main
