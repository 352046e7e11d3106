"""DP-SGD (Abadi et al., CCS'16) with Opacus for the trainers: per-sample clipping, Gaussian noise,
Poisson sampling of the members, and the privacy spent.

`PrivateTraining` wraps the network that sees the members (a GAN's discriminator, a DDPM's UNet)
and its optimiser. Each step draws a Poisson batch (every member independently with probability
q = batch_size / N, from the trainer's seeded generator), so Opacus's accountant applies as it is:
epsilon after s steps is that of the subsampled Gaussian mechanism with (sigma, q, s). Given a
target epsilon, sigma is solved for the whole planned run (`get_noise_multiplier`); given sigma,
the epsilon is what the accountant says. The noise comes from a seeded generator whose state is
checkpointed, so a resumed private run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from mia_gen.errors import MiaGenError
from mia_gen.extras import require

PRIVACY_JSON = "privacy.json"
FEATURE = "defense=dp_sgd (DP-SGD)"  # what needs Opacus, in the user's words (the [dp] extra)


def opacus(submodule: str):
    """`opacus.<submodule>`, or `MissingExtraError` with `pip install "mia-gen[dp]"`. Opacus is imported
    only when a private run needs it: this module (its privacy reports) is read without it."""
    return require(f"opacus.{submodule}", FEATURE)


def _check_module(module: torch.nn.Module, what: str) -> None:
    errors = opacus("validators").ModuleValidator.validate(module, strict=False)
    if errors:
        reasons = "; ".join(sorted({str(e) for e in errors}))
        raise MiaGenError(
            f"defense=dp_sgd cannot train the {what} privately. Opacus says: {reasons}. "
            "BatchNorm mixes the samples of a batch, so it has no per-sample gradient: for DCGAN use the "
            "GroupNorm discriminator (model.discriminator._target_=mia_gen.models.dcgan.DCGANDiscriminatorGroupNorm)."
        )


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The accountant's epsilon after `steps` subsampled Gaussian steps (0 before the first)."""
    if steps == 0:
        return 0.0
    ledger = opacus("accountants").create_accountant(accountant)
    ledger.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(ledger.get_epsilon(delta=delta))


class PrivateTraining:
    """DP-SGD for `module` trained by `optimizer` on `n_records` members for `total_steps` private steps.

    After construction, run the forward pass through `self.module` (an Opacus `GradSampleModule`
    holding the same parameters), backpropagate a loss that SUMS per-sample terms, and call
    `self.optimizer.step()`: it clips each sample's gradient to `max_grad_norm`, adds noise and
    averages over `expected_batch_size`.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, defense: Any, n_records: int,
                 batch_size: int, total_steps: int, seed: int, what: str, expected_batch_size: int | None = None):
        _check_module(module, what)
        if batch_size > n_records:
            raise MiaGenError(f"dp_sgd: batch_size={batch_size} exceeds the {n_records} members; lower training.batch_size.")
        self.sample_rate = batch_size / n_records
        self.delta = float(defense.delta) if defense.delta is not None else 1.0 / (10 * n_records)
        if self.delta >= 1.0 / n_records:
            raise MiaGenError(f"dp_sgd: delta={self.delta} is not below 1/N = {1 / n_records:.3g}; such a delta "
                              "allows publishing a whole record. Set defense.delta smaller (default 1/(10 N)).")
        self.accountant = defense.accountant
        self.total_steps = int(total_steps)
        if defense.noise_multiplier is not None:
            self.noise_multiplier = float(defense.noise_multiplier)
        else:
            self.noise_multiplier = float(opacus("accountants.utils").get_noise_multiplier(
                target_epsilon=float(defense.target_epsilon), target_delta=self.delta, sample_rate=self.sample_rate,
                steps=self.total_steps, accountant=self.accountant))
        self.max_grad_norm = float(defense.max_grad_norm)
        self.noise_rng = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
        self.module = opacus("grad_sample").GradSampleModule(module, loss_reduction="sum")
        self.optimizer = opacus("optimizers").DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=expected_batch_size or batch_size, loss_reduction="mean", generator=self.noise_rng)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` (Opacus' hooks warn that the inputs need no gradient: they never do here)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()

    def poisson_indices(self, n_records: int, rng: torch.Generator) -> torch.Tensor:
        """Members of this step: each independently with probability q (possibly none)."""
        return torch.nonzero(torch.rand(n_records, generator=rng) < self.sample_rate).flatten()

    def report(self, steps_done: int) -> dict:
        epsilon = epsilon_spent(self.noise_multiplier, self.sample_rate, steps_done, self.delta, self.accountant)
        return {"mechanism": "dp_sgd", "epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "sample_rate": self.sample_rate, "private_steps": steps_done,
                "planned_private_steps": self.total_steps, "accountant": self.accountant}

    def write_report(self, out_dir: Path, steps_done: int) -> None:
        from mia_gen.models.checkpoint import atomic_replace

        report = self.report(steps_done)
        atomic_replace(Path(out_dir) / PRIVACY_JSON, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))

    def state_dict(self) -> dict:
        return {"noise_rng": self.noise_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.noise_rng.set_state(state["noise_rng"])


def read_privacy_report(model_dir: Path | str) -> dict | None:
    path = Path(model_dir) / PRIVACY_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text())
