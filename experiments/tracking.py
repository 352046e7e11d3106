"""Experiment tracking behind one small interface: W&B (offline by default) or nothing.

`make_tracker` reads a `configs/logger/*.yaml` group entry: `logger=wandb` (default mode
offline: no account, no network) or `logger=none`.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mia_gen.errors import MiaGenError

__all__ = ["NullTracker", "Tracker", "WandbTracker", "flatten", "init_timeout", "make_tracker"]

# Seconds wandb may take to start its run before we give up and say so (W&B's WANDB_INIT_TIMEOUT overrides).
_INIT_TIMEOUT_S = 60


def init_timeout() -> float:
    """Seconds `wandb.init` may take: `WANDB_INIT_TIMEOUT` when set (a positive number), else 60."""
    value = os.environ.get("WANDB_INIT_TIMEOUT")
    if value is None or not value.strip():
        return float(_INIT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MiaGenError(f"WANDB_INIT_TIMEOUT={value!r} is not a positive number of seconds; set e.g. "
                          "WANDB_INIT_TIMEOUT=30, or unset it for the default 60.")
    return seconds


def flatten(nested: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"pia": {"auc": 0.9, "ci95": {"auc": [lo, hi]}}}` -> `{"pia/auc": 0.9, "pia/ci95/auc": [lo, hi]}`.

    Only mappings are flattened; lists and scalars are kept as values.
    """
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Where a run's summary, tables, images and artifacts go. The base class records nothing."""

    def log_summary(self, summary: Mapping) -> None:
        """Record final values; nested keys are joined with "/" (`pia/tpr_at_fpr/0.01`)."""

    def log_roc(self, attack: str, fpr, tpr) -> None:
        """Record every ROC point of an attack, `fpr` and `tpr` of shape `(P,)` in [0, 1].

        A table of points rather than W&B's `roc_curve` chart, which rounds away low FPRs;
        the log-log picture (`report.plot_roc`) is logged separately with `log_image`.
        """

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        """Record a table, `rows` being a sequence of rows of `len(columns)` values."""

    def log_image(self, name: str, path) -> None:
        """Record an image file (e.g. `roc.png`)."""

    def log_artifact(self, name: str, paths: Sequence, type: str) -> None:  # noqa: A002 - W&B's word
        """Record files / folders (e.g. `results.json`, `scores.csv`) as one versioned artifact."""

    def finish(self) -> None:
        """Close the run; calling it twice is harmless."""


class NullTracker(Tracker):
    """`logger=none`: tracking is off, every call does nothing."""


def _check_exists(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MiaGenError(f"Cannot log {what} {path}: it does not exist. Write it before logging it.")
    return path


class WandbTracker(Tracker):
    """One W&B run (one per Hydra multirun job), offline unless `logger.mode=online`."""

    def __init__(
        self,
        run_dir,
        config: Mapping,
        job_name: str,
        project: str = "mia-gen",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        tags: Sequence[str] = (),
        dir: str | None = None,  # noqa: A002 - the name of wandb.init's argument
    ):
        try:
            import wandb
        except ImportError as error:
            message = "logger=wandb needs the wandb package: `pip install wandb`, or use logger=none."
            raise MiaGenError(message) from error
        self._wandb = wandb
        wandb_dir = Path(dir if dir is not None else run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", init_timeout=init_timeout())
        if mode == "online":
            self._require_credentials()
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                mode=mode,
                dir=str(wandb_dir),
                config=dict(config),
                group=group,
                tags=list(tags) or None,
                name=job_name,
                reinit=self._reinit_finish_previous(),
                settings=settings,
            )
        except Exception as error:  # wandb raises many types (UsageError, CommError, timeouts)
            raise MiaGenError(
                f"W&B failed to start ({type(error).__name__}: {error}). Run without tracking with "
                "logger=none, or fix the wandb setup (logger.mode=offline needs no account; for "
                "online mode run `wandb login`)."
            ) from error
        self._finished = False

    def _reinit_finish_previous(self) -> str | bool:
        """The reinit value that closes a previous run in this process (one run per multirun job).

        wandb >= 0.19.10 names it "finish_previous"; older versions did the same with True.
        """
        release = tuple(int(part) for part in re.findall(r"\d+", self._wandb.__version__)[:3])
        return "finish_previous" if release >= (0, 19, 10) else True

    def _require_credentials(self) -> None:
        """Fail instead of prompting for an API key (runs are often unattended)."""
        if "prompt" not in inspect.signature(self._wandb.login).parameters:
            return  # older wandb cannot check without prompting; wandb.init decides
        try:
            logged_in = self._wandb.login(prompt=False, verify=False)
        except Exception as error:
            message = f"W&B login check failed ({error}); use logger.mode=offline or logger=none."
            raise MiaGenError(message) from error
        if not logged_in:
            raise MiaGenError(
                "logger.mode=online but no W&B API key is configured. Run `wandb login` or set "
                "WANDB_API_KEY, or keep the default logger.mode=offline (sync later with "
                "`wandb sync`), or use logger=none."
            )

    def log_summary(self, summary: Mapping) -> None:
        self.run.summary.update(flatten(summary))

    def log_roc(self, attack: str, fpr, tpr) -> None:
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise MiaGenError(f"fpr and tpr must be 1-D of the same length; got {fpr.shape} and {tpr.shape}.")
        self.log_table(f"roc/{attack}", ["fpr", "tpr"], np.c_[fpr, tpr].tolist())

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        bad = next((i for i, row in enumerate(rows) if len(row) != len(columns)), None)
        if bad is not None:
            raise MiaGenError(f"Table '{name}': row {bad} has {len(rows[bad])} values for {len(columns)} columns.")
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(row) for row in rows])})

    def log_image(self, name: str, path) -> None:
        self.run.log({name: self._wandb.Image(str(_check_exists(path, "image")))})

    def log_artifact(self, name: str, paths: Sequence, type: str) -> None:  # noqa: A002
        artifact = self._wandb.Artifact(name, type=type)
        for path in paths:
            path = _check_exists(path, "artifact file")
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        if not self._finished:
            self.run.finish()
            self._finished = True


def make_tracker(logger_cfg: Mapping, run_dir, config: Mapping, job_name: str) -> Tracker:
    """Build the tracker that `configs/logger/<name>.yaml` asks for.

    Args:
        logger_cfg: the `logger` config group: `{name: none}` or `{name: wandb, project,
            entity, mode, group, tags, dir}` (dir null -> run_dir).
        run_dir: the run's output directory; W&B writes its `wandb/` folder there by default.
        config: the run's resolved config (dict or DictConfig), stored with the run.
        job_name: the run's name in W&B (e.g. the Hydra job's override string).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(logger_cfg, DictConfig):
        logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    options = dict(logger_cfg)
    name = options.pop("name", None)
    if name == "none":
        return NullTracker()
    if name == "wandb":
        known = set(inspect.signature(WandbTracker).parameters) - {"run_dir", "config", "job_name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MiaGenError(f"Unknown logger option(s) {unknown} for logger=wandb; known: {sorted(known)}.")
        return WandbTracker(run_dir, config, job_name, **options)
    raise MiaGenError(f"Unknown logger '{name}'; use logger=wandb or logger=none (configs/logger/*.yaml).")
