"""The IN/OUT membership matrix of a shadow-model zoo, as data (the `shadow_models` access of DESIGN.md).

A zoo of K shadow models is trained on random halves of a population of N records. Its membership
matrix `membership[k, r]` says whether population record `record_ids[r]` is in shadow k's training set.
Drawn with the balanced scheme of LiRA's code (Carlini et al., S&P'22): for each record, a random
ordering of the K shadows, and the record is IN for the first K/2 of them, so every record is IN for
exactly K/2 shadows when K is even (K//2 or K//2 + 1, by a fair coin per record, when K is odd); the
shadows' training-set sizes are then about N/2 each.

A zoo file is JSON (`ZooMembership.save`): the dataset's name and fingerprint, `n_records`, the seed,
the population's `record_ids`, `membership` as one string of "0"/"1" per shadow (column r is
`record_ids[r]`), and `sha256`, a checksum of all the other fields that `load` verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mia_gen.datasets import RecordSet
from mia_gen.errors import MiaGenError
from mia_gen.json_files import read_json, write_json

FORMAT_VERSION = 1
_KEYS = ("dataset", "fingerprint", "seed", "n_records", "record_ids", "membership")
_SHOWN = 5  # offending entries quoted in an error message
_FIX = "draw the zoo again (mia_gen.zoo.draw_zoo) or restore the zoo file"


@dataclass(eq=False)
class ZooMembership:
    """Which population records each shadow model is trained on.

    Attributes:
        dataset: the dataset's name (`RecordSet.name`).
        fingerprint: the dataset's fingerprint (`RecordSet.fingerprint`) when the zoo was drawn.
        seed: the seed the matrix was drawn with.
        record_ids: int64 `np.ndarray` of shape `(N,)`, the population's record ids (indices into the
            dataset), distinct, each in `[0, n_records)`.
        membership: bool `np.ndarray` of shape `(K, N)`; `membership[k, r]`: record `record_ids[r]` is
            in shadow k's training set.
        n_records: the dataset's number of records.
    """

    dataset: str
    fingerprint: str
    seed: int
    record_ids: np.ndarray
    membership: np.ndarray
    n_records: int

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZooMembership) and self.to_dict() == other.to_dict()

    @property
    def n_shadows(self) -> int:
        return int(self.membership.shape[0])

    def training_records(self, shadow: int) -> np.ndarray:
        """Record ids `(n_k,)` of shadow `shadow`'s training set, in population order."""
        return self.record_ids[self.membership[shadow]]

    def validate(self, records: RecordSet | None = None) -> None:
        """Check types, shapes and ids; with `records`, also that the zoo was drawn on that dataset.

        Raises:
            MiaGenError: a malformed matrix, a record id out of range or repeated, or a dataset
                whose size or fingerprint differs.
        """
        if isinstance(self.n_records, bool) or not isinstance(self.n_records, (int, np.integer)):
            raise MiaGenError(f"Zoo n_records must be an integer, got {self.n_records!r}; {_FIX}.")
        ids = self.record_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) \
                or ids.size == 0:
            raise MiaGenError(f"Zoo record_ids must be a non-empty 1-D integer array; {_FIX}.")
        outside = ids[(ids < 0) | (ids >= self.n_records)]
        if outside.size:
            raise MiaGenError(f"Zoo record_ids has {outside.size} id(s) outside [0, {self.n_records}), e.g. "
                              f"{outside[:_SHOWN].tolist()}; {_FIX}.")
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise MiaGenError(f"Zoo record_ids lists {int((counts > 1).sum())} id(s) more than once, e.g. "
                              f"{values[counts > 1][:_SHOWN].tolist()}; {_FIX}.")
        matrix = self.membership
        if not isinstance(matrix, np.ndarray) or matrix.dtype != bool or matrix.ndim != 2 \
                or matrix.shape[0] < 1 or matrix.shape[1] != ids.size:
            shape = getattr(matrix, "shape", None)
            raise MiaGenError(f"Zoo membership must be a bool matrix of shape (K >= 1, {ids.size}) (one column "
                              f"per record id), got {getattr(matrix, 'dtype', type(matrix).__name__)} {shape}; "
                              f"{_FIX}.")
        if records is None:
            return
        if len(records) != self.n_records or records.fingerprint != self.fingerprint:
            raise MiaGenError(
                f"The zoo was drawn on dataset '{self.dataset}' ({self.n_records} records, fingerprint "
                f"{self.fingerprint[:12]}…) but the loaded dataset '{records.name}' has {len(records)} records "
                f"and fingerprint {records.fingerprint[:12]}…; the data differ. Load the data config the zoo "
                f"was drawn with, or {_FIX}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: format_version, the fields (membership as "0"/"1" strings) and sha256."""
        content = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "seed": int(self.seed),
            "n_records": int(self.n_records),
            "record_ids": self.record_ids.tolist(),
            "membership": [(row.astype(np.uint8) + ord("0")).tobytes().decode() for row in self.membership],
        }
        return {**content, "sha256": _checksum(content)}

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "zoo") -> ZooMembership:
        """Rebuild from `to_dict()` output, verifying the format, the checksum and the matrix."""
        if not isinstance(content, dict):
            raise MiaGenError(f"{source} must hold a JSON object, got {type(content).__name__}.")
        if content.get("format_version") != FORMAT_VERSION:
            raise MiaGenError(f"{source} has format_version={content.get('format_version')!r}; this mia-gen "
                              f"reads version {FORMAT_VERSION}: {_FIX}.")
        missing = [key for key in (*_KEYS, "sha256") if key not in content]
        if missing:
            raise MiaGenError(f"{source} lacks the key(s) {missing}; a zoo file has {[*_KEYS, 'sha256']}.")
        body = {key: value for key, value in content.items() if key != "sha256"}
        if _checksum(body) != content["sha256"]:
            raise MiaGenError(f"{source} does not match its sha256 checksum: the file was edited or damaged "
                              f"after it was saved; {_FIX}.")
        rows = content["membership"]
        ids = np.asarray(content["record_ids"])
        if ids.size == 0 or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise MiaGenError(f"{source}: record_ids must be a non-empty list of integers; {_FIX}.")
        if not isinstance(rows, list) or not rows or not all(
                isinstance(row, str) and len(row) == ids.size and set(row) <= {"0", "1"} for row in rows):
            raise MiaGenError(f"{source}: membership must be a non-empty list of strings of '0'/'1', one per "
                              f"shadow, each {ids.size} long (one character per record id); {_FIX}.")
        matrix = np.array([np.frombuffer(row.encode(), dtype=np.uint8) == ord("1") for row in rows])
        zoo = cls(dataset=content["dataset"], fingerprint=content["fingerprint"], seed=content["seed"],
                  record_ids=ids.astype(np.int64), membership=matrix, n_records=content["n_records"])
        zoo.validate()
        return zoo

    def save(self, path: str | os.PathLike) -> None:
        """Write the zoo as JSON to `path` (parent folders are created)."""
        self.validate()
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, records: RecordSet | None = None) -> ZooMembership:
        """Read a zoo file written by `save` and validate it (against `records` if given)."""
        path = os.fspath(path)
        content = read_json(path, "Zoo file", if_missing="point to an existing zoo file, or draw one with "
                            "mia_gen.zoo.draw_zoo and save it.", if_invalid=f"{_FIX}.")
        zoo = cls.from_dict(content, source=f"Zoo file {path!r}")
        zoo.validate(records)
        return zoo


def draw_zoo(records: RecordSet, population: np.ndarray, n_shadows: int, seed: int = 0) -> ZooMembership:
    """Draw the balanced IN/OUT matrix of `n_shadows` shadows over the `population` records.

    With `rng = np.random.default_rng(seed)`: `rng.permuted` gives each record (column) its own
    random ordering of the shadows, and the record is IN for the first `n_in[r]` of them, where
    `n_in[r] = K/2` for even K and `K//2 + coin` for odd K (LiRA's balanced scheme).

    Args:
        records: the dataset the population's ids index.
        population: distinct int record ids `(N,)`, N >= 1.
        n_shadows: K >= 2.
        seed: the seed of the draw.
    """
    if isinstance(n_shadows, bool) or not isinstance(n_shadows, (int, np.integer)) or n_shadows < 2:
        raise MiaGenError(f"A zoo needs n_shadows >= 2 (an integer), got {n_shadows!r}; every record must be "
                          "IN for some shadows and OUT for others.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MiaGenError(f"The zoo's seed must be an integer, got {seed!r}.")
    ids = np.asarray(population)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise MiaGenError(f"The zoo's population must be a non-empty 1-D array of integer record ids, got "
                          f"dtype {ids.dtype} and shape {ids.shape}.")
    k, n = int(n_shadows), ids.size
    rng = np.random.default_rng(int(seed))
    ranks = rng.permuted(np.broadcast_to(np.arange(k)[:, None], (k, n)), axis=0)
    n_in = np.full(n, k // 2) + (rng.integers(0, 2, size=n) if k % 2 else 0)
    zoo = ZooMembership(dataset=records.name, fingerprint=records.fingerprint, seed=int(seed),
                        record_ids=ids.astype(np.int64), membership=ranks < n_in[None, :], n_records=len(records))
    zoo.validate(records)
    return zoo


def _checksum(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a zoo file's fields (all but `sha256` itself)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
