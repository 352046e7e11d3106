"""The shared training loop (models/training_loop.py) on its own, with a linear-regression "trainer"."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import crash_on_checkpoint_move
from mia_gen.errors import MiaGenError
from mia_gen.models import training_loop
from mia_gen.models.training_loop import MemberBatches, Plan, TrainingSteps, run_training

pytestmark = pytest.mark.usefixtures("single_thread")

N_MEMBERS, BATCH, LR = 12, 5, 0.05


def regression_members():
    """`(N, 4)`: three inputs and a target y = x @ (1, -2, 0.5) + 0.3."""
    x = torch.randn(N_MEMBERS, 3, generator=torch.Generator().manual_seed(0))
    return torch.cat([x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3], dim=1)


def sgd_step(model, optimizer, batch, rng):
    """Squared error on a batch whose inputs are jittered by `rng` and whose rows are kept with
    probability 0.8 by torch's global RNG (like dropout)."""
    x = batch[:, :3] + 0.01 * torch.randn(batch.shape[0], 3, generator=rng)
    keep = (torch.rand(batch.shape[0]) < 0.8).float()
    loss = (keep * (model(x).squeeze(1) - batch[:, 3]) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


class Regression(TrainingSteps):
    desc = "train regression"

    def __init__(self, init_seed=0, crash_at_step=None, crash_in_write=None):
        self.model = torch.nn.Linear(3, 1)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(init_seed)))
        self.members = regression_members()
        self.crash_at_step, self.crash_in_write = crash_at_step, crash_in_write
        self.calls = []  # ("start" | "step" | "grid" | "write" | "close", step reached)
        self.done = 0

    def load_weights(self, out_dir):
        self.model.load_state_dict(load_file(str(out_dir / "linear.safetensors")))

    def start(self):
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.calls.append(("start", self.done))

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def step(self, step, batches, rng):
        if step == self.crash_at_step:
            raise KeyboardInterrupt
        self.done = step
        self.calls.append(("step", step))
        return {"loss": sgd_step(self.model, self.optimizer, self.members[batches.next_indices()], rng)}

    def sample_grid(self, path):
        self.calls.append(("grid", self.done))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"grid after step {self.done}")

    def write_weights(self, folder):
        self.calls.append(("write", self.done))
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(folder / "linear.safetensors"))
        if self.done == self.crash_in_write:  # the weights are staged, the checkpoint is not finished
            raise KeyboardInterrupt

    def close(self):
        self.calls.append(("close", self.done))

    def result(self):
        return self.model


def plan(steps=10, training_hash="h", dropout_seed=7, **overrides):
    settings = dict(steps=steps, checkpoint_every=3, sample_every=4, training_hash=training_hash,
                    resumable_keys=("steps",), n_members=N_MEMBERS, batch_size=BATCH, batch_seed=11, noise_seed=12,
                    dropout_seed=dropout_seed)
    return Plan(**{**settings, **overrides})


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_values(a, b):
    """Equal nested dicts / lists of tensors and numbers (pickled bytes may differ: a loaded state's
    strings are other objects, so pickle's memo differs)."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_values(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_values(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("dropout_seed", [None, 7])
def test_a_run_is_the_plain_loop_it_stands_for(tmp_path, dropout_seed):
    """Reference: the same regression trained by a for loop over the same seeded streams."""
    torch.manual_seed(5)
    trainer = Regression()
    caller_rng = torch.get_rng_state()
    trained = run_training(trainer, plan(dropout_seed=dropout_seed), tmp_path, torch.device("cpu"), progress=False)
    untouched = torch.equal(torch.get_rng_state(), caller_rng)

    torch.manual_seed(5)
    reference = Regression()  # nn.Linear draws its (overwritten) initial weights from the global RNG
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    optimizer = torch.optim.Adam(reference.model.parameters(), lr=LR)
    batches, rng = MemberBatches(N_MEMBERS, BATCH, 11), torch.Generator().manual_seed(12)
    for _ in range(10):
        sgd_step(reference.model, optimizer, reference.members[batches.next_indices()], rng)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(trained.state_dict()[key], value), key
    assert torch.equal(load_file(str(tmp_path / "linear.safetensors"))["weight"], trained.weight.detach())
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 10
    # a seeded run trains on a fork of the global RNG: the caller's stream is left where it was
    assert untouched == (dropout_seed is not None)


@pytest.mark.parametrize("dropout_seed", [None, 7])
def test_resume_after_a_crash_is_bit_identical_to_an_uninterrupted_run(tmp_path, dropout_seed):
    torch.manual_seed(5)
    straight = run_training(Regression(), plan(dropout_seed=dropout_seed), tmp_path / "straight", torch.device("cpu"),
                            progress=False)
    torch.manual_seed(5)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_training(Regression(crash_at_step=5), plan(dropout_seed=dropout_seed), out, torch.device("cpu"),
                     progress=False)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3  # the last checkpoint before the crash
    torch.manual_seed(1234)  # restored from the checkpoint: the caller's state in between does not matter
    resumed_trainer = Regression(init_seed=1)  # other initial weights: the checkpoint replaces them
    resumed = run_training(resumed_trainer, plan(dropout_seed=dropout_seed), out, torch.device("cpu"), progress=False)
    assert resumed_trainer.calls[0] == ("start", 0) and resumed_trainer.calls[1] == ("step", 4)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    straight_files, resumed_files = files(tmp_path / "straight"), files(out)
    for name in ("trainer_state.pt", "trainer_state.json"):
        del straight_files[name], resumed_files[name]
    assert resumed_files == straight_files  # weights and grids, byte for byte
    state, straight_state = (torch.load(d / "trainer_state.pt", weights_only=True) for d in (out, tmp_path / "straight"))
    assert_same_values(state, straight_state)  # optimiser and every random state
    summary, straight_summary = (json.loads((d / "trainer_state.json").read_text()) for d in (out, tmp_path / "straight"))
    del summary["files"]["trainer_state.pt"], straight_summary["files"]["trainer_state.pt"]
    assert summary == straight_summary


def test_a_checkpoint_of_other_settings_is_refused_with_what_to_do(tmp_path):
    run_training(Regression(), plan(steps=4), tmp_path, torch.device("cpu"), progress=False)
    with pytest.raises(MiaGenError, match=rf"{tmp_path} holds a run with other training settings \(only \['steps'\] "
                                          "may change when resuming\); use a fresh output directory"):
        run_training(Regression(), plan(steps=6, training_hash="other"), tmp_path, torch.device("cpu"), progress=False)
    with pytest.raises(MiaGenError, match="holds a run with another model or other training settings"):
        run_training(Regression(), plan(steps=6, training_hash="other", what_differs="another model or other "
                                        "training settings"), tmp_path, torch.device("cpu"), progress=False)
    with pytest.raises(MiaGenError, match=r"already trained for 4 steps.*set training.steps>=4"):
        run_training(Regression(), plan(steps=3), tmp_path, torch.device("cpu"), progress=False)
    extended = Regression()
    run_training(extended, plan(steps=6), tmp_path, torch.device("cpu"), progress=False)  # steps may change
    assert [call for call in extended.calls if call[0] == "step"] == [("step", 5), ("step", 6)]


def test_a_finished_run_is_loaded_without_training(tmp_path):
    trained = run_training(Regression(), plan(), tmp_path, torch.device("cpu"), progress=False)
    before = files(tmp_path)
    again = Regression(init_seed=3)
    loaded = run_training(again, plan(), tmp_path, torch.device("cpu"), progress=False)
    assert again.calls == [] and files(tmp_path) == before
    assert torch.equal(loaded.weight, trained.weight)


def test_a_damaged_checkpoint_is_refused_and_the_trainer_state_only_checked_when_resuming(tmp_path):
    from mia_gen.errors import CorruptStoreError

    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    run_training(Regression(), plan(), finished, torch.device("cpu"), progress=False)
    run_training(Regression(), plan(stop_after=4), stopped, torch.device("cpu"), progress=False)
    for out in (finished, stopped):
        state = out / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:-10])
    run_training(Regression(), plan(), finished, torch.device("cpu"), progress=False)  # loading needs weights only
    with pytest.raises(CorruptStoreError, match=f"damaged: trainer_state.pt has .*Delete {stopped} and train again"):
        run_training(Regression(), plan(), stopped, torch.device("cpu"), progress=False)
    weights = finished / "linear.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptStoreError, match="damaged: linear.safetensors"):
        run_training(Regression(), plan(), finished, torch.device("cpu"), progress=False)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_readable(tmp_path):
    straight = run_training(Regression(), plan(), tmp_path / "straight", torch.device("cpu"), progress=False)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_training(Regression(crash_in_write=6), plan(), out, torch.device("cpu"), progress=False)
    assert (out / ".checkpoint-next" / "linear.safetensors").is_file()  # the half-written one
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    step_3 = Regression(init_seed=2)
    step_3.load_weights(out)  # the step-3 weights, whole
    resumed = run_training(Regression(), plan(), out, torch.device("cpu"), progress=False)
    assert not (out / ".checkpoint-next").exists()
    assert torch.equal(resumed.weight, straight.weight) and not torch.equal(step_3.model.weight, straight.weight)


def test_a_crash_while_moving_a_checkpoint_in_is_finished_by_the_next_run(tmp_path, monkeypatch):
    straight = run_training(Regression(), plan(), tmp_path / "straight", torch.device("cpu"), progress=False)
    out = tmp_path / "crashed"
    moves = crash_on_checkpoint_move(monkeypatch, 4)  # second checkpoint (3 moves each), as its weights move in
    with pytest.raises(KeyboardInterrupt):
        run_training(Regression(), plan(), out, torch.device("cpu"), progress=False)
    monkeypatch.undo()
    assert moves == ["linear.safetensors", "trainer_state.pt", "trainer_state.json", "linear.safetensors"]
    assert json.loads((out / ".checkpoint-next" / "trainer_state.json").read_text())["step"] == 6
    resumed = run_training(Regression(), plan(), out, torch.device("cpu"), progress=False)
    assert torch.equal(resumed.weight, straight.weight)


bars: list = []  # the RecordingBars a run opened


class RecordingBar:
    """Stands in for tqdm: records the steps at which the postfix (the losses) was set."""

    def __init__(self, total, initial, disable, desc):
        self.n, self.postfixes = initial, []
        bars.append(self)
        self.args = (total, initial, disable, desc)

    def update(self, n):
        self.n += n

    def set_postfix(self, values):
        self.postfixes.append((self.n, dict(values)))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("progress", [True, False])
def test_grids_checkpoints_and_progress_come_at_their_steps(tmp_path, monkeypatch, progress):
    monkeypatch.setattr(training_loop, "tqdm", RecordingBar)
    bars.clear()
    trainer = Regression()
    run_training(trainer, plan(steps=25, stop_after=11, checkpoint_every=3, sample_every=4), tmp_path,
                 torch.device("cpu"), progress=progress)
    events = [call for call in trainer.calls if call[0] != "step"]
    assert events == [("start", 0), ("write", 3), ("grid", 4), ("write", 6), ("grid", 8), ("write", 9),
                      ("write", 11), ("close", 11)]  # stop_after: a last checkpoint at step 11
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000004.png", "step_000008.png"]
    assert (tmp_path / "samples" / "step_000008.png").read_text() == "grid after step 8"
    (bar,) = bars
    assert bar.args == (25, 0, not progress, "train regression") and bar.n == 11 and bar.closed
    assert [step for step, _ in bar.postfixes] == ([10, 11] if progress else [])
    assert all(set(values) == {"loss"} and len(values["loss"].split(".")[1]) == 4 for _, values in bar.postfixes)
    summary = json.loads((tmp_path / "trainer_state.json").read_text())
    assert (summary["step"], summary["complete"], summary["steps"]) == (11, False, 25)

    bars.clear()
    trainer = Regression()
    run_training(trainer, plan(steps=25, checkpoint_every=0, sample_every=0), tmp_path, torch.device("cpu"),
                 progress=progress)
    assert bars[0].args[1] == 11 and [c for c in trainer.calls if c[0] == "write"] == [("write", 25)]
    assert [step for step, _ in bars[0].postfixes] == ([20, 25] if progress else [])


def test_checkpoint_files_keep_the_trainers_key_order(tmp_path):
    class Legacy(Regression):
        state_keys = ("step", "torch_rng", "batches", "noise_rng", "private", "optimizers", "cuda_rng")
        summary_keys = ("steps", "training_hash", "step", "complete")

    run_training(Legacy(), plan(steps=2), tmp_path / "legacy", torch.device("cpu"), progress=False)
    run_training(Regression(), plan(steps=2), tmp_path / "default", torch.device("cpu"), progress=False)
    state = torch.load(tmp_path / "legacy" / "trainer_state.pt", weights_only=True)
    assert list(state) == ["step", "torch_rng", "batches", "noise_rng", "optimizer"]
    default = torch.load(tmp_path / "default" / "trainer_state.pt", weights_only=True)
    assert list(default) == ["step", "optimizer", "batches", "noise_rng", "torch_rng"]
    assert list(json.loads((tmp_path / "legacy" / "trainer_state.json").read_text())) == [
        "steps", "training_hash", "step", "complete", "files"]


@pytest.mark.parametrize("stop_after", [0, -1, 2.5, True, "3"])
def test_stop_after_must_be_a_positive_number_of_steps(stop_after):
    with pytest.raises(MiaGenError, match="stop_after must be a positive number of steps or None"):
        training_loop.check_stop_after(stop_after)
    training_loop.check_stop_after(None)
    training_loop.check_stop_after(3)
