"""Tabular generators from the SDV team's `ctgan` library, not re-implemented: CTGAN and TVAE (Xu et al.,
"Modeling Tabular Data using Conditional GAN", NeurIPS'19).

The library fits its own `DataTransformer` (a Bayesian GMM per continuous column, one-hot per discrete
column) and trains in its own loop, which cannot resume mid-way: a killed run trains again from its seed.
What is saved is no pickle: the trained network's weights as safetensors (CTGAN's generator, TVAE's
decoder) and `synthesizer.json` with the settings, written last (its presence means "finished"). The
`DataTransformer` and CTGAN's `DataSampler` are functions of the training table alone (`rdt` seeds its
Gaussian mixtures), so loading refits them on the same members and reloads the weights; a test holds the
reloaded model to the live one, sample for sample.

Samples come back as a table with the real table's columns, are conformed to its schema and encoded with
its encoding (`mia_gen.tables`), so attacks compare them with real rows exactly as they compare a
synthetic CSV.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.extras import require
from mia_gen.tables import NUMERIC_TYPES, Column, TableEncoding, conform, pandas, table_fingerprint

SYNTHESIZERS = ("ctgan", "tvae")
LIBRARY_MISSING = "<missing>"  # a missing categorical / boolean value, as the library sees it
FINISHED_JSON = "synthesizer.json"
WEIGHTS = "network.safetensors"


def discrete_columns(schema: list[Column]) -> list[str]:
    return [c.name for c in schema if c.type not in NUMERIC_TYPES]


def library_frame(table, schema: list[Column]):
    """A conformed table as the library takes it: integer columns as int64 (so samples come back rounded),
    a missing category as its own category.

    Raises:
        MiaGenError: a numeric column has missing values (the library refuses them in continuous columns).
    """
    pd = pandas()
    out = {}
    for column in schema:
        values = table[column.name]
        if column.type in NUMERIC_TYPES:
            if values.isna().any():
                raise MiaGenError(f"CTGAN / TVAE cannot train on missing values in the numeric column '{column.name}' "
                                  "(the ctgan library refuses them); impute them in the table first.")
            out[column.name] = values.astype(np.int64) if column.type == "integer" else values.astype(np.float64)
        else:
            out[column.name] = values.map(lambda v: LIBRARY_MISSING if v is None else v).astype(object)
    return pd.DataFrame(out)


def from_library(frame, schema: list[Column]):
    """The library's samples with its missing category turned back into missing values."""
    frame = frame.copy()
    for column in schema:
        if column.type not in NUMERIC_TYPES:
            frame[column.name] = frame[column.name].map(lambda v: None if v == LIBRARY_MISSING else v).astype(object)
    return frame


def library_versions() -> dict[str, str]:
    """What refitting the library's transformer depends on: a cached model reloads only under the same."""
    from importlib.metadata import version

    return {name: version(name) for name in ("ctgan", "rdt", "scikit-learn")}


def _settings(model_cfg: DictConfig) -> tuple[str, dict, int, int]:
    synthesizer = str(model_cfg.get("synthesizer"))
    if synthesizer not in SYNTHESIZERS:
        raise MiaGenError(f"model.synthesizer={synthesizer!r}: use one of {SYNTHESIZERS}.")
    params = OmegaConf.to_container(model_cfg.get("params") or {}, resolve=True)
    training = model_cfg.training
    epochs, seed = int(training.epochs), int(training.seed)
    if epochs < 1:
        raise MiaGenError(f"model.training.epochs must be a positive integer, got {training.epochs!r}.")
    return synthesizer, params, epochs, seed


def _build(synthesizer: str, params: dict, epochs: int, device: torch.device):
    ctgan = require("ctgan", f"model={synthesizer}")
    logging.getLogger("rdt").setLevel(logging.WARNING)  # its per-column INFO "guidance" would flood the run log
    cls = ctgan.CTGAN if synthesizer == "ctgan" else ctgan.TVAE
    try:
        if synthesizer == "ctgan":
            return cls(epochs=epochs, verbose=False, enable_gpu=device.type == "cuda", **params)
        return cls(epochs=epochs, enable_gpu=device.type == "cuda", **params)
    except TypeError as error:
        raise MiaGenError(f"model.params for {synthesizer}: {error}; see the installed ctgan's "
                          f"{cls.__name__} arguments.") from error


def _network(model, synthesizer: str) -> torch.nn.Module:
    return model._generator if synthesizer == "ctgan" else model.decoder


def train_tabular(model_cfg: DictConfig, table, schema: list[Column], out_dir: Path, device: torch.device) -> None:
    """Fit CTGAN / TVAE on the members' rows `table` (conformed to `schema`) into `out_dir`, or find it finished."""
    if (out_dir / FINISHED_JSON).is_file():
        return
    synthesizer, params, epochs, seed = _settings(model_cfg)
    frame = library_frame(table, schema)
    model = _build(synthesizer, params, epochs, device)
    model.set_random_state(seed)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own deprecation / convergence chatter
        model.fit(frame, discrete_columns(schema))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in _network(model, synthesizer).state_dict().items()},
              str(out_dir / WEIGHTS))
    record = {"synthesizer": synthesizer, "params": params, "epochs": epochs, "seed": seed,
              "library_versions": library_versions(),
              "schema": [[c.name, c.type] for c in schema], "n_rows": len(frame),
              "table_fingerprint": table_fingerprint(table, schema)}
    tmp = out_dir / f"{FINISHED_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_dir / FINISHED_JSON)


class TabularSampler:
    """A trained CTGAN / TVAE that draws tables with the real table's columns.

    `table(n, rng)` returns a conformed `DataFrame`; `__call__`-free on purpose: `encoded(n, rng)` gives the
    rows `(n, D)` float32 in the real encoding, what the sample store keeps.
    """

    def __init__(self, model, synthesizer: str, encoding: TableEncoding):
        self.model, self.synthesizer, self.encoding = model, synthesizer, encoding

    def table(self, n: int, rng: torch.Generator):
        """n rows, seeded by `rng` alone (the library's numpy and torch states are set from one draw)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
        self.model.set_random_state(seed)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = self.model.sample(n)
        return conform(from_library(frame, self.encoding.schema), self.encoding.schema, f"{self.synthesizer} samples")

    def encoded(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(self.encoding.transform(self.table(n, rng), f"{self.synthesizer} samples"))


def load_tabular(model_dir: Path, table, encoding: TableEncoding, device: torch.device) -> TabularSampler:
    """The synthesizer trained into `model_dir` on the rows `table`: its transformer (and CTGAN's data sampler)
    refitted on them, its network's weights loaded.

    Raises:
        MissingAssetError: nothing finished in `model_dir`.
        MiaGenError: `table` is not the table it was trained on (its fingerprint differs).
    """
    record_path = model_dir / FINISHED_JSON
    if not record_path.is_file():
        raise MissingAssetError(f"no trained tabular model at {model_dir} ({FINISHED_JSON} missing); train it first "
                                "(`mia-gen-train` with the same overrides).")
    record = json.loads(record_path.read_text())
    schema = [Column(name, kind) for name, kind in record["schema"]]
    if schema != encoding.schema or table_fingerprint(table, schema) != record["table_fingerprint"]:
        raise MiaGenError(f"{model_dir} was trained on another table (schema or rows differ); its transformer can "
                          "only be rebuilt from the rows it was trained on.")
    installed = library_versions()
    if record.get("library_versions") != installed:
        raise MiaGenError(f"{model_dir} was trained with {record.get('library_versions')}, but {installed} is installed; "
                          "its transformer is refitted on load and may differ under other versions. Install those "
                          f"versions, or delete {model_dir} to train it again.")
    synthesizer = record["synthesizer"]
    model = _build(synthesizer, record["params"], int(record["epochs"]), device)
    from ctgan.data_transformer import DataTransformer

    frame = library_frame(table, schema)
    transformer = DataTransformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.fit(frame, discrete_columns(schema))
    weights = load_file(str(model_dir / WEIGHTS))
    if synthesizer == "ctgan":
        from ctgan.data_sampler import DataSampler
        from ctgan.synthesizers.ctgan import Generator

        model._transformer = transformer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model._data_sampler = DataSampler(transformer.transform(frame), transformer.output_info_list,
                                              model._log_frequency)
        model._generator = Generator(model._embedding_dim + model._data_sampler.dim_cond_vec(),
                                     model._generator_dim, transformer.output_dimensions)
        network = model._generator
    else:
        from ctgan.synthesizers.tvae import Decoder

        model.transformer = transformer
        model.decoder = Decoder(model.embedding_dim, model.decompress_dims, transformer.output_dimensions)
        network = model.decoder
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise MiaGenError(f"{model_dir / WEIGHTS} does not fit the {synthesizer} its settings describe: {error}") from error
    network.to(model._device)  # the mode the library leaves it in: CTGAN samples in training mode, TVAE sets eval
    return TabularSampler(model, synthesizer, encoding)


SYNTHETIC_CSV = "synthetic.csv"


def write_table_csv(path: Path, sampler: TabularSampler, n_samples: int, shard_size: int, seed: int) -> None:
    """The rows of a store written by `write_samples(..., lambda n, rng: (sampler.encoded(n, rng), None), ...)` as
    the table they were: each shard drawn again from its shard seed, in order (row i = sample i); written
    atomically, once."""
    if path.is_file():
        return
    from mia_gen.sample_store import shard_seed

    pd = pandas()
    parts = []
    for index, start in enumerate(range(0, n_samples, shard_size)):
        rng = torch.Generator(device="cpu").manual_seed(shard_seed(seed, index))
        parts.append(sampler.table(min(shard_size, n_samples - start), rng))
    table = pd.concat(parts, ignore_index=True)
    for column in sampler.encoding.schema:
        if column.type == "integer":  # whole numbers written as such (conform keeps them as float64)
            table[column.name] = table[column.name].astype("Int64")
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)
