"""The training loop every trainer shares: resume, step, sample grids, atomic checkpoints.

A trainer (`mia_gen.models.gan_trainer`, `mia_gen.models.ddpm_trainer`, ...) describes its run as a
`Plan` and its model as a `TrainingSteps` subclass (build the optimisers, one optimisation step on a
batch, the weight files, a sample grid); `run_training` does the rest:

- an existing checkpoint in `out_dir` is checked against the plan's `training_hash` (a run with other
  settings is refused), verified (`mia_gen.models.checkpoint.verify_checkpoint`) and its weights loaded;
  a finished one is returned without training;
- otherwise training resumes at the checkpoint's step with its optimiser states and every random
  state restored: the member batch order (`MemberBatches`), the trainer's noise generator, torch's
  global CPU (and CUDA) generator and a DP-SGD noise generator, so a resumed run is bit-identical to an
  uninterrupted one on CPU;
- every `sample_every` steps a sample grid goes to `samples/step_XXXXXX.png`; every `checkpoint_every`
  steps and at the last one the checkpoint is written whole in a staging folder and moved in
  (`mia_gen.models.checkpoint.save_checkpoint`), beside the DP-SGD privacy report when there is one.

Checkpoint: the trainer's weight files, `trainer_state.pt` (step, optimiser states, random states;
tensors only, read with weights_only=True) and `trainer_state.json` (`step`, `complete`, `steps`,
`training_hash`, and `files`, the size and sha256 of every other file).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mia_gen.errors import MiaGenError
from mia_gen.models.checkpoint import (STATE_PT, load_trainer_state, read_checkpoint_summary, save_checkpoint,
                                       verify_checkpoint)

log = logging.getLogger(__name__)

# Key order of trainer_state.pt and trainer_state.json: part of their bytes, whose sha256 the summary
# records. "optimizers" stands for the trainer's optimiser entries, in its order.
STATE_KEYS = ("step", "optimizers", "batches", "noise_rng", "torch_rng", "cuda_rng", "private")
SUMMARY_KEYS = ("step", "complete", "steps", "training_hash")


class MemberBatches:
    """Endless stream of member indices: concatenated random permutations (epochs) from a seeded generator.

    A batch may span two epochs; its state (generator state, current order, cursor) is checkpointable.
    """

    def __init__(self, n_members: int, batch_size: int, seed: int) -> None:
        self.n_members, self.batch_size = n_members, batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n_members, generator=self.rng)
        self.cursor = 0

    def next_indices(self) -> torch.Tensor:
        """Indices `(batch_size,)` int64 into the members."""
        parts, needed = [], self.batch_size
        while needed:
            if self.cursor == self.n_members:
                self.order, self.cursor = torch.randperm(self.n_members, generator=self.rng), 0
            take = min(needed, self.n_members - self.cursor)
            parts.append(self.order[self.cursor : self.cursor + take])
            self.cursor, needed = self.cursor + take, needed - take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.cursor = state["order"].clone(), int(state["cursor"])


@dataclass(frozen=True)
class Plan:
    """What a run trains for and how it resumes.

    training_hash: identity of everything that changes the weights (not `resumable_keys`); a checkpoint
        with another hash is refused, naming `what_differs` ("other training settings").
    dropout_seed: None: torch's global RNG is the caller's, carried across a resume (all CUDA devices'
        too); an int: training runs on a fork of it seeded with this (and the device's CUDA RNG), so the
        caller's RNG state is left alone.
    """

    steps: int
    checkpoint_every: int
    sample_every: int
    training_hash: str
    resumable_keys: tuple[str, ...]
    n_members: int
    batch_size: int
    batch_seed: int
    noise_seed: int
    stop_after: int | None = None
    dropout_seed: int | None = None
    what_differs: str = "other training settings"

    @property
    def target(self) -> int:
        """The last step this call trains (`stop_after` stops early, as if interrupted)."""
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)


class TrainingSteps:
    """What one model family gives `run_training`; subclass it.

    `private`: a `mia_gen.models.privacy.PrivateTraining` once `start` built one (DP-SGD), whose noise
    state is checkpointed and whose privacy report is written at each checkpoint for
    `step * private_steps_per_step` private steps.
    """

    desc = "train"  # progress bar label
    loss_format = ".4f"
    state_keys = STATE_KEYS
    summary_keys = SUMMARY_KEYS
    private = None
    private_steps_per_step = 1

    def load_weights(self, out_dir: Path) -> None:
        """Read the (verified) checkpoint's weights into the networks."""
        raise NotImplementedError

    def start(self) -> None:
        """Before the first step of this call: networks on the device in train mode, optimisers built."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers by their key in trainer_state.pt."""
        raise NotImplementedError

    def step(self, step: int, batches: MemberBatches, rng: torch.Generator) -> dict[str, torch.Tensor | None]:
        """One optimisation step (`step` counts from 1), members from `batches`, all other randomness
        from `rng` (or torch's global RNG); returns the losses shown in the progress bar."""
        raise NotImplementedError

    def sample_grid(self, path: Path) -> None:
        """Write a grid of samples from fixed noise to `path` (PNG), leaving the random states alone."""
        raise NotImplementedError

    def write_weights(self, folder: Path) -> None:
        """Write the weight files of a checkpoint into `folder` (safetensors + JSON)."""
        raise NotImplementedError

    def close(self) -> None:
        """After the last step of this call."""

    def result(self) -> Any:
        """The trained model returned to the caller (also when a finished run is only loaded)."""
        raise NotImplementedError


def check_stop_after(stop_after: Any) -> None:
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise MiaGenError(f"stop_after must be a positive number of steps or None, got {stop_after!r}.")


def resume_step(out_dir: Path, plan: Plan, trainer: TrainingSteps) -> int:
    """The step the checkpoint in `out_dir` holds (0 without one), its weights loaded into `trainer`."""
    summary = read_checkpoint_summary(out_dir)
    if summary is None:
        return 0
    start = summary["step"]
    if summary.get("training_hash") != plan.training_hash:
        raise MiaGenError(
            f"{out_dir} holds a run with {plan.what_differs} (only {list(plan.resumable_keys)} may change "
            "when resuming); use a fresh output directory or delete this one."
        )
    if start > plan.steps:
        raise MiaGenError(
            f"{out_dir} holds a run already trained for {start} steps, more than training.steps={plan.steps}; "
            f"set training.steps>={start} or use a fresh output directory."
        )
    verify_checkpoint(out_dir, summary, with_trainer_state=start < plan.target)
    trainer.load_weights(out_dir)
    if 0 < start < plan.target:
        log.info("train: resuming %s at step %d of %d from its checkpoint", out_dir, start, plan.target)
    return start


class _GlobalRNG:
    """torch's global RNG during training (see `Plan.dropout_seed`)."""

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def scope(self):
        if self.seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
            torch.default_generator.manual_seed(self.seed)
            if self.cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(self.seed)
            yield

    def cuda_state(self) -> Any:
        if self.seed is None:
            return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return torch.cuda.get_rng_state(self.device) if self.cuda else None

    def load_cuda_state(self, state: Any) -> None:
        if self.seed is None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state)
        elif self.seed is not None and self.cuda:
            torch.cuda.set_rng_state(state, self.device)


def _ordered(entries: dict, keys: tuple[str, ...], optimizer_keys: list[str]) -> dict:
    order = [name for key in keys for name in (optimizer_keys if key == "optimizers" else [key])]
    return {key: entries[key] for key in order if key in entries}


def _save(out_dir: Path, step: int, plan: Plan, trainer: TrainingSteps, batches: MemberBatches,
          noise_rng: torch.Generator, global_rng: _GlobalRNG) -> None:
    entries = {"step": step, "batches": batches.state_dict(), "noise_rng": noise_rng.get_state(),
               "torch_rng": torch.get_rng_state()}
    cuda_state = global_rng.cuda_state()
    if cuda_state is not None:
        entries["cuda_rng"] = cuda_state
    if trainer.private is not None:
        entries["private"] = trainer.private.state_dict()
        trainer.private.write_report(out_dir, step * trainer.private_steps_per_step)
    optimizers = trainer.optimizers()
    entries.update({key: optimizer.state_dict() for key, optimizer in optimizers.items()})
    state = _ordered(entries, trainer.state_keys, list(optimizers))

    def write(folder: Path) -> None:
        trainer.write_weights(folder)
        torch.save(state, folder / STATE_PT)

    summary = {"step": step, "complete": step == plan.steps, "steps": plan.steps, "training_hash": plan.training_hash}
    save_checkpoint(out_dir, write, _ordered(summary, trainer.summary_keys, []))


def _restore(out_dir: Path, start: int, trainer: TrainingSteps, batches: MemberBatches, noise_rng: torch.Generator,
             global_rng: _GlobalRNG) -> None:
    state = load_trainer_state(out_dir, start)
    for key, optimizer in trainer.optimizers().items():
        optimizer.load_state_dict(state[key])
    batches.load_state_dict(state["batches"])
    noise_rng.set_state(state["noise_rng"])
    torch.set_rng_state(state["torch_rng"])
    if trainer.private is not None:
        trainer.private.load_state_dict(state["private"])
    if "cuda_rng" in state:
        global_rng.load_cuda_state(state["cuda_rng"])


def run_training(trainer: TrainingSteps, plan: Plan, out_dir: str | os.PathLike, device: torch.device,
                 progress: bool = True) -> Any:
    """Train (or resume, or only load) `trainer`'s model in `out_dir` to `plan.target`; returns `trainer.result()`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = plan.target
    start = resume_step(out_dir, plan, trainer)
    if start >= target:
        return trainer.result()

    batches = MemberBatches(plan.n_members, plan.batch_size, plan.batch_seed)
    noise_rng = torch.Generator().manual_seed(plan.noise_seed)
    trainer.start()
    global_rng = _GlobalRNG(plan.dropout_seed, device)
    with global_rng.scope():
        if start:
            _restore(out_dir, start, trainer, batches, noise_rng, global_rng)
        bar = tqdm(total=plan.steps, initial=start, disable=not progress, desc=trainer.desc)
        for step in range(start + 1, target + 1):
            losses = trainer.step(step, batches, noise_rng)
            bar.update(1)
            if progress and (step % 10 == 0 or step == target):
                bar.set_postfix({name: f"{loss.item():{trainer.loss_format}}" for name, loss in losses.items()
                                 if loss is not None})
            if plan.sample_every and step % plan.sample_every == 0:
                trainer.sample_grid(out_dir / "samples" / f"step_{step:06d}.png")
            if (plan.checkpoint_every and step % plan.checkpoint_every == 0) or step == target:
                _save(out_dir, step, plan, trainer, batches, noise_rng, global_rng)
        bar.close()
    trainer.close()
    return trainer.result()
