"""Trackers: the no-op one, a real offline W&B run read back from disk, and failures that teach."""

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import wandb
from google.protobuf.message import DecodeError
from matplotlib.image import imsave
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from mia_gen.errors import MiaGenError
from mia_gen.experiments.tracking import NullTracker, flatten, make_tracker

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "logger"


def _wandb_records(path):
    """Protobuf records of a `.wandb` file (a LevelDB-style log: 32 KiB blocks of chunks with
    a 7-byte header, crc32 / length / type, after a 7-byte file header)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer too short for a header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _finished_run_records(run_dir, timeout_s=20.0):
    """Records of the one offline run under run_dir, once its `exit` record is on disk (the
    wandb service writes the file shortly after `finish()` returns)."""
    (offline_run,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = _wandb_records(next(offline_run.glob("run-*.wandb")))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return offline_run, records
        except (AssertionError, DecodeError, struct.error):
            pass  # not fully written yet
        assert time.monotonic() < deadline, f"{offline_run} has no exit record after {timeout_s} s"
        time.sleep(0.1)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B offline, quiet and inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    return tmp_path


def test_logger_configs():
    assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "none.yaml")) == {"name": "none"}
    assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "wandb.yaml")) == {
        "name": "wandb", "project": "mia-gen", "entity": None, "mode": "offline",
        "group": None, "tags": [], "dir": None,
    }  # fmt: skip


def test_flatten_joins_nested_keys():
    nested = {"pia": {"auc": 0.9, "tpr_at_fpr": {"0.01": 0.2}, "ci95": {"auc": [0.8, 0.95]}}, "seconds": 3}
    expected = {"pia/auc": 0.9, "pia/tpr_at_fpr/0.01": 0.2, "pia/ci95/auc": [0.8, 0.95], "seconds": 3}
    assert flatten(nested) == expected


def test_null_tracker_does_nothing(tmp_path):
    tracker = make_tracker(OmegaConf.load(CONFIGS / "none.yaml"), tmp_path, {"seed": 0}, "job")
    assert isinstance(tracker, NullTracker)
    calls = [
        tracker.log_summary({"a": {"b": 1}}),
        tracker.log_roc("pia", [0, 1], [0, 1]),
        tracker.log_table("t", ["x"], [[1]]),
        tracker.log_image("roc", tmp_path / "absent.png"),
        tracker.log_artifact("results", [tmp_path / "absent.json"], "results"),
        tracker.finish(),
    ]
    assert calls == [None] * 6
    assert list(tmp_path.iterdir()) == []


def test_offline_wandb_run_writes_summary_table_and_config(wandb_env):
    run_dir = wandb_env / "run"
    logger_cfg = OmegaConf.load(CONFIGS / "wandb.yaml")
    config = OmegaConf.create({"seed": 3, "attack": {"name": "pia", "t": 200}})
    tracker = make_tracker(logger_cfg, run_dir, config, "attack=pia")
    tracker.log_summary({"pia": {"auc": 0.91, "tpr_at_fpr": {"0.01": 0.25}}})
    tracker.log_roc("pia", np.array([0.0, 0.001, 1.0]), np.array([0.0, 0.3, 1.0]))
    tracker.log_table("scores", ["record_id", "is_member", "score"], [[0, 1, 0.5], [1, 0, -0.5]])
    imsave(run_dir / "roc.png", np.zeros((4, 4)))
    tracker.log_image("roc", run_dir / "roc.png")
    with pytest.raises(MiaGenError, match="does not exist"):
        tracker.log_image("hist", run_dir / "hist.png")
    (run_dir / "results.json").write_text(json.dumps([{"attack": "pia"}]))
    tracker.log_artifact("results", [run_dir / "results.json"], "results")
    tracker.finish()
    tracker.finish()  # harmless twice

    offline_run, records = _finished_run_records(run_dir)  # dir null -> run_dir
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert summary["pia/auc"] == 0.91 and summary["pia/tpr_at_fpr/0.01"] == 0.25
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "attack=pia" and run.project == "mia-gen"
    config_items = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config_items["attack"] == {"name": "pia", "t": 200}
    table_files = offline_run.glob("files/media/table/**/*.table.json")
    tables = {path.name.split("_")[0]: json.loads(path.read_text()) for path in table_files}
    assert tables["scores"]["columns"] == ["record_id", "is_member", "score"]
    assert tables["scores"]["data"] == [[0, 1, 0.5], [1, 0, -0.5]]
    assert len(list(offline_run.glob("files/media/images/roc_*.png"))) == 1
    assert tables["pia"]["data"] == [[0.0, 0.0], [0.001, 0.3], [1.0, 1.0]]  # roc/pia: low FPR kept


def test_a_new_tracker_finishes_the_previous_run(wandb_env):
    logger_cfg = {"name": "wandb", "mode": "offline"}
    first = make_tracker(logger_cfg, wandb_env / "job0", {"lr": 1}, "job0")
    second = make_tracker(logger_cfg, wandb_env / "job1", {"lr": 2}, "job1")
    assert first.run.id != second.run.id
    second.finish()
    assert len(list(wandb_env.glob("job*/wandb/offline-run-*/run-*.wandb"))) == 2


def test_wandb_start_failure_says_use_logger_none(tmp_path, monkeypatch):
    def broken_init(**kwargs):
        raise TimeoutError("service did not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.raises(MiaGenError, match="TimeoutError: service did not start.*logger=none"):
        make_tracker({"name": "wandb"}, tmp_path, {}, "job")


def test_wandb_init_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    seen = []

    def init(**kwargs):
        seen.append(kwargs["settings"].init_timeout)
        raise TimeoutError("no network")

    monkeypatch.setattr(wandb, "init", init)
    for value, expected in ((None, 60.0), ("7.5", 7.5)):
        if value is None:
            monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
        else:
            monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
        with pytest.raises(MiaGenError, match="W&B failed to start"):
            make_tracker({"name": "wandb"}, tmp_path, {}, "job")
        assert seen[-1] == expected
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")
    with pytest.raises(MiaGenError, match="WANDB_INIT_TIMEOUT='soon'.*positive number"):
        make_tracker({"name": "wandb"}, tmp_path, {}, "job")


def test_online_without_api_key_fails_instead_of_prompting(tmp_path, monkeypatch):
    asked = {}

    def login(prompt=True, verify=True):
        asked.update(prompt=prompt)
        return False

    monkeypatch.setattr(wandb, "login", login)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init must not run without a key"))
    with pytest.raises(MiaGenError, match="no W&B API key.*wandb login.*logger=none"):
        make_tracker({"name": "wandb", "mode": "online"}, tmp_path, {}, "job")
    assert asked["prompt"] is False


def test_bad_logger_configs():
    with pytest.raises(MiaGenError, match="Unknown logger 'tensorboard'.*logger=none"):
        make_tracker({"name": "tensorboard"}, ".", {}, "job")
    with pytest.raises(MiaGenError, match=r"Unknown logger option\(s\) \['projekt'\]"):
        make_tracker({"name": "wandb", "projekt": "x"}, ".", {}, "job")
