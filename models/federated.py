"""Federated training with FedAvg on Flower (McMahan et al., AISTATS'17): the `federated` defense.

The members are split over K clients (a seeded permutation, near-equal shares) that never share
records. Each round, every client starts from the global weights, trains `local_steps` steps with
the model's own trainer (GAN or DDPM, any other defense included) and returns its weights; the
server averages them with Flower's `FedAvg` (weighted by client size). Optimiser state stays on
each client across rounds.

`MemberClient` is a Flower `NumPyClient`: the same object serves a real deployment
(`flwr.client.start_client(server_address=..., client=MemberClient(...).to_client())` against a
Flower server running `FedAvg`); `train_federated` runs the K clients and the strategy in one
process (simulation on one machine).

Each client trains in its own resumable directory (`<out_dir>/clients/<k>`); weights are the
model's safetensors files, whatever the family. A crash resumes at the last finished client step,
and K=1 reproduces pooled training of the same model on the same members.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mia_gen.errors import MiaGenError
from mia_gen.extras import require
from mia_gen.models.checkpoint import atomic_replace, read_checkpoint_summary, record_rewritten_files

FEDERATED_JSON = "federated.json"
FEATURE = "defense=federated (FedAvg on Flower)"  # what needs Flower, in the user's words (the [fl] extra)
TrainFn = Callable[[torch.Tensor, Path, int], None]  # (members, client_dir, stop_after_steps)


def weight_files(directory: Path) -> list[Path]:
    relative = (p.relative_to(directory) for p in Path(directory).rglob("*.safetensors"))
    files = sorted(p for p in relative if p.parts[0] != "clients" and p.name != "global.safetensors")
    if not files:
        raise MiaGenError(f"no weights (*.safetensors) in {directory}; the client's training did not write any.")
    return files


def read_weights(directory: Path) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Every tensor of the model's weight files (as float64), in a fixed order, and their (file, key) names."""
    arrays, names = [], []
    for relative in weight_files(directory):
        tensors = load_file(str(directory / relative))
        for key in sorted(tensors):
            arrays.append(tensors[key].double().numpy())  # averaged in float64 (integer buffers too)
            names.append((str(relative), key))
    return arrays, names


def write_weights(directory: Path, arrays: list[np.ndarray], names: list[tuple[str, str]]) -> None:
    """Overwrite the model's weight files with `arrays` (dtypes of the files kept)."""
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for array, (relative, key) in zip(arrays, names):
        by_file.setdefault(relative, {})[key] = torch.from_numpy(np.asarray(array))
    for relative, tensors in by_file.items():
        path = directory / relative
        old = load_file(str(path))
        new = {k: tensors[k].reshape(old[k].shape).to(old[k].dtype).contiguous() for k in old}
        atomic_replace(path, lambda tmp, new=new: save_file(new, str(tmp)))
    record_rewritten_files(directory, list(by_file))


def client_shares(n_members: int, clients: int, seed: int) -> list[np.ndarray]:
    """Disjoint member positions per client: a seeded permutation cut into near-equal parts."""
    if clients > n_members:
        raise MiaGenError(f"federated: {clients} clients need at least {clients} members, got {n_members}.")
    order = np.random.default_rng([seed, 11]).permutation(n_members)
    return [np.sort(part) for part in np.array_split(order, clients)]


def _client_step(directory: Path) -> int:
    summary = read_checkpoint_summary(directory)  # finishes a checkpoint a crash left half-moved
    return 0 if summary is None else summary["step"]


# Flower comes with the [fl] extra: importing this module without it raises MissingExtraError with the
# install line (the rest of flwr is then there too)
class MemberClient(require("flwr.client", FEATURE).NumPyClient):
    """A Flower client holding its own members; `fit` trains `local_steps` more steps from the global weights."""

    def __init__(self, members: torch.Tensor, directory: Path, train: TrainFn, local_steps: int):
        self.members, self.directory, self.train, self.local_steps = members, Path(directory), train, local_steps

    def get_parameters(self, config):
        return read_weights(self.directory)[0]

    def fit(self, parameters, config):
        round_number = int(config["round"])
        done = _client_step(self.directory)
        if done == (round_number - 1) * self.local_steps and round_number > 1:
            # start this round from the global model (not again if the round already ran before a crash)
            write_weights(self.directory, parameters, read_weights(self.directory)[1])
        self.train(self.members, self.directory, round_number * self.local_steps)
        return read_weights(self.directory)[0], len(self.members), {}


def _save_global(path: Path, arrays: list[np.ndarray], names: list[tuple[str, str]]) -> None:
    tensors = {f"{relative}::{key}": torch.from_numpy(np.ascontiguousarray(a)) for a, (relative, key) in zip(arrays, names)}
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_global(path: Path, names: list[tuple[str, str]]) -> list[np.ndarray]:
    tensors = load_file(str(path))
    return [tensors[f"{relative}::{key}"].numpy() for relative, key in names]


def train_federated(members: torch.Tensor, out_dir: Path, train: TrainFn, clients: int, rounds: int,
                    local_steps: int, seed: int) -> None:
    """FedAvg over `clients` shares of `members` for `rounds` rounds; the global model ends in `out_dir`.

    After each round the average is saved (`global.safetensors`) before `federated.json` records the
    round, so a crash anywhere resumes with the right global weights and the clients' own checkpoints.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    out_dir = Path(out_dir)
    state_path, global_path = out_dir / FEDERATED_JSON, out_dir / "global.safetensors"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"rounds_done": 0}
    if state.get("complete"):
        return
    shares = client_shares(len(members), clients, seed)
    client_list = [MemberClient(members[torch.as_tensor(share)], out_dir / "clients" / str(k), train, local_steps)
                   for k, share in enumerate(shares)]
    strategy = FedAvg(min_fit_clients=clients, min_evaluate_clients=clients, min_available_clients=clients,
                      fraction_evaluate=0.0, fit_metrics_aggregation_fn=lambda metrics: {}, inplace=False)
    for round_number in range(int(state["rounds_done"]) + 1, rounds + 1):
        names = read_weights(client_list[0].directory)[1] if round_number > 1 else None
        global_weights = _load_global(global_path, names) if round_number > 1 else []
        results = []
        for client in client_list:
            weights, n, metrics = client.fit(global_weights, {"round": round_number})
            results.append((None, FitRes(status=Status(code=Code.OK, message=""),
                                         parameters=ndarrays_to_parameters(weights), num_examples=n, metrics=metrics)))
        aggregated, _ = strategy.aggregate_fit(round_number, results, [])
        averaged = parameters_to_ndarrays(aggregated)
        names = read_weights(client_list[0].directory)[1]
        _save_global(global_path, averaged, names)
        if round_number == rounds:
            _publish(out_dir, client_list[0].directory, averaged, names)
        atomic_replace(state_path, lambda tmp, r=round_number: tmp.write_text(json.dumps(
            {"rounds_done": r, "rounds": rounds, "clients": clients, "local_steps": local_steps,
             "client_sizes": [len(s) for s in shares], "complete": r == rounds}, indent=2)))


def _publish(out_dir: Path, template: Path, averaged: list[np.ndarray], names: list[tuple[str, str]]) -> None:
    """The global model in `out_dir`, laid out like a client's (configs, weights) so it loads like any model."""
    for item in template.iterdir():
        if item.name in ("samples",):
            continue
        target = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    write_weights(out_dir, averaged, names)
