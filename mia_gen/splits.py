"""Membership splits as data: which records are members, non-members and reference records.

A split names its dataset and the dataset's fingerprint, the seed it was drawn with, and
three disjoint index lists into the `RecordSet`:

- `members`: the records the target model is trained on;
- `non_members`: records the model never saw, evaluated against the members;
- `reference`: records from the same distribution, disjoint from both, for attacks with
  `reference_data` access (DOMIAS, calibration, reference models).

Lists are kept in **draw order** (the order of one seeded permutation), not sorted, so that
any prefix of a list is itself a uniform random subset (e.g. "the first 1,000 reference
records"). Split files are JSON; SecMI / PIA `.npz` split files can be imported; a members file
(the record ids a model was trained on) becomes a split with non-members and reference records
drawn from the other records.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from mia_gen.datasets import RecordSet
from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.json_files import read_json, write_json

FORMAT_VERSION = 1
SET_NAMES = ("members", "non_members", "reference")
_SHOWN = 5  # offending indices quoted in an error message


@dataclass(eq=False)
class Split:
    """Members / non-members / reference indices into one dataset.

    Attributes:
        dataset: the dataset's name (`RecordSet.name`).
        fingerprint: the dataset's fingerprint (`RecordSet.fingerprint`) when the split was made.
        seed: the seed of the permutation the lists were drawn from.
        members, non_members, reference: int64 `np.ndarray` of shape `(K,)`, in draw order.
        n_records: the dataset's number of records; every index lies in `[0, n_records)`.
    """

    dataset: str
    fingerprint: str
    seed: int
    members: np.ndarray
    non_members: np.ndarray
    reference: np.ndarray
    n_records: int

    def __post_init__(self) -> None:
        for name in SET_NAMES:
            setattr(self, name, _as_indices(getattr(self, name), name))
        if isinstance(self.n_records, bool) or not isinstance(self.n_records, (int, np.integer)):
            raise MiaGenError(f"Split n_records must be an integer, got {self.n_records!r}.")
        self.n_records = int(self.n_records)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Split) and self.to_dict() == other.to_dict()

    def validate(self, records: RecordSet | None = None) -> None:
        """Check the split; with `records`, also check that it belongs to that dataset.

        Raises:
            MiaGenError: an index out of range, a duplicate, an index in two lists, or a
                dataset whose size or fingerprint differs; the message names the indices.
        """
        fix = "draw a new split (split.path=null) or fix the split file"
        for name in SET_NAMES:
            indices = getattr(self, name)
            outside = indices[(indices < 0) | (indices >= self.n_records)]
            if outside.size:
                raise MiaGenError(
                    f"Split {name} has {outside.size} index(es) outside [0, {self.n_records}), e.g. "
                    f"{outside[:_SHOWN].tolist()}; {fix}."
                )
            values, counts = np.unique(indices, return_counts=True)
            repeated = values[counts > 1]
            if repeated.size:
                raise MiaGenError(
                    f"Split {name} lists {repeated.size} index(es) more than once, e.g. "
                    f"{repeated[:_SHOWN].tolist()}; each record may appear once: {fix}."
                )
        for i, first in enumerate(SET_NAMES):
            for second in SET_NAMES[i + 1 :]:
                shared = np.intersect1d(getattr(self, first), getattr(self, second))
                if shared.size:
                    raise MiaGenError(
                        f"Split {first} and {second} share {shared.size} record(s), e.g. "
                        f"{shared[:_SHOWN].tolist()}; the three lists must be disjoint or the "
                        f"membership labels are wrong: {fix}."
                    )
        if records is None:
            return
        if len(records) != self.n_records or records.fingerprint != self.fingerprint:
            raise MiaGenError(
                f"The split was made for dataset '{self.dataset}' ({self.n_records} records, fingerprint "
                f"{self.fingerprint[:12]}…) but the loaded dataset '{records.name}' has {len(records)} "
                f"records and fingerprint {records.fingerprint[:12]}…; the data differ (data.name, "
                "resolution, channels, subset, max_records or the files changed). Load the data config "
                f"the split was made with, or {fix}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: format_version, dataset, fingerprint, seed, n_records and the three lists."""
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "n_records": self.n_records,
            **{name: getattr(self, name).tolist() for name in SET_NAMES},
        }

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "split") -> Split:
        """Rebuild a split from `to_dict()` output (not validated; see `validate`)."""
        if not isinstance(content, dict):
            raise MiaGenError(f"{source} must hold a JSON object, got {type(content).__name__}.")
        if content.get("format_version") != FORMAT_VERSION:
            raise MiaGenError(
                f"{source} has format_version={content.get('format_version')!r}; this mia-gen reads "
                f"version {FORMAT_VERSION}. Re-create the split (split.path=null) or convert the file."
            )
        keys = ("dataset", "fingerprint", "seed", "n_records", *SET_NAMES)
        missing = [key for key in keys if key not in content]
        if missing:
            raise MiaGenError(f"{source} lacks the key(s) {missing}; a split file has {list(keys)}.")
        return cls(**{key: content[key] for key in keys})

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON to `path` (parent folders are created)."""
        self.validate()
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, records: RecordSet | None = None) -> Split:
        """Read a split file written by `save` and validate it (against `records` if given)."""
        path = os.fspath(path)
        content = read_json(path, "Split file", if_missing="set split.path=<file.json> to an existing split, "
                            "or split.path=null to draw a new one.", if_invalid="re-create it.")
        split = cls.from_dict(content, source=f"Split file {path!r}")
        split.validate(records)
        return split


def make_split(
    records: RecordSet, n_members: int, n_non_members: int, n_reference: int = 0, seed: int = 0
) -> Split:
    """Draw a split from one seeded permutation of the records.

    `np.random.default_rng(seed).permutation(len(records))` is cut into members, then
    non-members, then reference records, so members do not change when only the number of
    non-members or reference records changes.

    Args:
        records: the dataset.
        n_members: number of members (>= 1).
        n_non_members: number of non-members (>= 0).
        n_reference: number of reference records (>= 0), or -1 for all remaining records.
        seed: the permutation's seed.
    """
    counts = {"n_members": n_members, "n_non_members": n_non_members, "n_reference": n_reference}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise MiaGenError(f"split.{key} must be an integer, got {value!r}.")
    if n_members < 1 or n_non_members < 0 or n_reference < -1:
        raise MiaGenError(
            f"Invalid split sizes {counts}: n_members must be >= 1, n_non_members >= 0, "
            "n_reference >= 0 or -1 (all remaining records)."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MiaGenError(f"split.seed must be an integer, got {seed!r}.")
    if n_members > len(records):
        raise MiaGenError(
            f"The split asks for {n_members} members, but dataset '{records.name}' has only {len(records)} "
            "records. Lower split.n_members, or load more data (data.max_records=null, data.subset=all)."
        )
    order = np.random.default_rng(int(seed)).permutation(len(records))
    return _split_around(records, order[:n_members], order[n_members:], n_non_members, n_reference, seed)


def split_from_members(
    records: RecordSet, members: np.ndarray, n_non_members: int, n_reference: int = 0, seed: int = 0
) -> Split:
    """A split around the given members (the true training set of a model trained elsewhere).

    Non-members, then reference records, are cut from one seeded permutation of the records
    that are not members (`np.random.default_rng(seed).permutation(len(records))` with the
    members removed), so the three lists are disjoint.

    Args:
        records: the dataset the member ids index.
        members: int record ids of shape `(M,)`, each in `[0, len(records))`, no repeats.
        n_non_members: number of non-members (>= 1).
        n_reference: number of reference records (>= 0), or -1 for all remaining records.
        seed: the permutation's seed.
    """
    members = _as_indices(members, "members")
    if members.size == 0:
        raise MiaGenError("The members file lists no record ids; it must name the model's training records.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MiaGenError(f"split.seed must be an integer, got {seed!r}.")
    if isinstance(n_non_members, bool) or not isinstance(n_non_members, (int, np.integer)) or n_non_members < 1:
        raise MiaGenError(f"split.n_non_members must be an integer >= 1 to evaluate members against, "
                          f"got {n_non_members!r}.")
    order = np.random.default_rng(int(seed)).permutation(len(records))
    return _split_around(records, members, order[~np.isin(order, members)], n_non_members, n_reference, seed)


def _split_around(
    records: RecordSet, members: np.ndarray, rest: np.ndarray, n_non_members: int, n_reference: int, seed: int
) -> Split:
    """Members as given; non-members, then reference records, cut from `rest` (the others, in draw order)."""
    if n_reference == -1:
        n_reference = max(len(rest) - n_non_members, 0)
    if n_non_members + n_reference > len(rest):
        raise MiaGenError(
            f"The split asks for {len(members)} members + {n_non_members} non-members + {n_reference} "
            f"reference records = {len(members) + n_non_members + n_reference}, but dataset '{records.name}' "
            f"has only {len(records)} records. Lower split.n_members / split.n_non_members / split.n_reference "
            "(split.n_reference=-1 takes all remaining records), or load more data (data.max_records=null, "
            "data.subset=all)."
        )
    split = Split(
        dataset=records.name,
        fingerprint=records.fingerprint,
        seed=int(seed),
        members=members,
        non_members=rest[:n_non_members],
        reference=rest[n_non_members : n_non_members + n_reference],
        n_records=len(records),
    )
    split.validate(records)
    return split


def read_record_ids(path: str | os.PathLike) -> np.ndarray:
    """Record ids (indices into the dataset) from a members file: `.npy` (1-D integers), `.json`
    (a list of integers), or text with one id per line (blank lines and `#` comments ignored).

    Returns:
        int64 `np.ndarray` of shape `(M,)`, in file order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingAssetError(
            f"Members file {path!r} does not exist; set split.members_file=<file> to the record ids the "
            "model was trained on (one per line, a JSON list, or a .npy array), or use split.path=<split.json>."
        )
    what = f"Members file {path!r}"
    try:
        if path.endswith(".npy"):
            ids = np.load(path, allow_pickle=False)
        elif path.endswith(".json"):
            with open(path) as handle:
                ids = json.load(handle)
            if not isinstance(ids, list):
                raise MiaGenError(f"{what} must hold a JSON list of record ids, got {type(ids).__name__}.")
        else:
            ids = []
            with open(path) as handle:
                for number, line in enumerate(handle, start=1):
                    line = line.split("#", 1)[0].strip()
                    if not line:
                        continue
                    if not line.lstrip("-").isdigit():
                        raise MiaGenError(f"{what}, line {number}: {line!r} is not an integer record id; "
                                          "write one record id (an index into the dataset) per line.")
                    ids.append(int(line))
    except (ValueError, OSError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise MiaGenError(f"{what} cannot be read ({error}); re-create it.") from error
    return _as_indices(np.asarray(ids), "members")


def import_secmi_split(
    npz_path: str | os.PathLike, records: RecordSet, reference: str = "rest", seed: int = 0
) -> Split:
    """Import a SecMI / PIA split file (`mia_train_idxs` = members, `mia_eval_idxs` = non-members).

    The indices refer to the dataset the file was made for (SecMI's CIFAR-10 files index the
    50,000 training images: load `data=cifar10 data.subset=train` without `max_records`).

    Args:
        npz_path: the `.npz` file (other keys such as `ratio` are ignored).
        records: the dataset the indices point into.
        reference: `"rest"` for all records in neither list (in the draw order of a
            permutation seeded by `seed`), or `"none"` for no reference records.
        seed: the seed of that permutation; recorded in the split.
    """
    path = os.fspath(npz_path)
    if reference not in ("rest", "none"):
        raise MiaGenError(f"reference must be 'rest' or 'none', got {reference!r}.")
    if not os.path.isfile(path):
        raise MissingAssetError(
            f"SecMI split file {path!r} does not exist; set split.secmi_npz=<file.npz> (e.g. SecMI's "
            "CIFAR10_train_ratio0.5.npz) or split.secmi_npz=null."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            found = sorted(archive.files)
            if "mia_train_idxs" not in found or "mia_eval_idxs" not in found:
                raise MiaGenError(
                    f"{path!r} has keys {found}; a SecMI / PIA split file has 'mia_train_idxs' (members) "
                    "and 'mia_eval_idxs' (non-members). Rename the arrays, or write a mia-gen split "
                    "file (Split.save) and use split.path."
                )
            members = archive["mia_train_idxs"]
            non_members = archive["mia_eval_idxs"]
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise MiaGenError(
            f"Cannot read {path!r} as a numeric .npz archive ({error}); re-create it."
        ) from error
    members = _as_indices(members, "mia_train_idxs")
    non_members = _as_indices(non_members, "mia_eval_idxs")
    if reference == "rest":
        order = np.random.default_rng(int(seed)).permutation(len(records))
        rest = order[~np.isin(order, np.concatenate([members, non_members]))]
    else:
        rest = np.empty(0, dtype=np.int64)
    split = Split(
        dataset=records.name,
        fingerprint=records.fingerprint,
        seed=int(seed),
        members=members,
        non_members=non_members,
        reference=rest,
        n_records=len(records),
    )
    split.validate(records)
    return split


# The split settings that give the true training membership (a file); without one, the split is drawn.
MEMBERSHIP_KEYS = ("path", "secmi_npz", "members_file")


def membership_source(split_cfg: Any) -> str | None:
    """The `split` setting the membership comes from (`"path"`, `"secmi_npz"` or `"members_file"`),
    or None when the split is drawn at random."""
    split_cfg = _as_mapping(split_cfg)
    given = [key for key in MEMBERSHIP_KEYS if split_cfg.get(key) is not None]
    if len(given) > 1:
        named = " and ".join(f"split.{key}={split_cfg[key]!r}" for key in given)
        raise MiaGenError(f"Both {named} are set, but the membership comes from one file; set all but one of "
                          "them to null.")
    return given[0] if given else None


def load_or_make_split(split_cfg: Any, records: RecordSet) -> Split:
    """The split a `split` config asks for (Hydra group `configs/split/`).

    `split_cfg.path` set: load that split file; `split_cfg.secmi_npz` set: import that SecMI /
    PIA file (reference = all remaining records); `split_cfg.members_file` set: those record
    ids are the members, `n_non_members` and `n_reference` are drawn with `seed` from the rest
    (`split_from_members`); none: draw `n_members`, `n_non_members` and `n_reference` records
    with `seed`. The sizes are not used when a split file is given.
    """
    split_cfg = _as_mapping(split_cfg)
    source = membership_source(split_cfg)
    seed = split_cfg.get("seed", 0)
    if source is not None:
        path = os.path.expanduser(str(split_cfg[source]))
        if source == "path":
            return Split.load(path, records)
        if source == "secmi_npz":
            return import_secmi_split(path, records, reference="rest", seed=seed)
    needed = ("n_non_members",) if source == "members_file" else ("n_members", "n_non_members")
    missing = [key for key in needed if split_cfg.get(key) is None]
    if missing:
        raise MiaGenError(
            f"The split config lacks {missing}; set {' '.join(f'split.{key}=<int>' for key in missing)}."
        )
    if source == "members_file":
        return split_from_members(records, read_record_ids(path), n_non_members=split_cfg["n_non_members"],
                                  n_reference=split_cfg.get("n_reference") or 0, seed=seed)
    return make_split(
        records,
        n_members=split_cfg["n_members"],
        n_non_members=split_cfg["n_non_members"],
        n_reference=split_cfg.get("n_reference") or 0,
        seed=seed,
    )


def _as_mapping(split_cfg: Any) -> dict:
    """The split config as a plain dict (a DictConfig is resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(split_cfg, DictConfig):
            split_cfg = OmegaConf.to_container(split_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    except OmegaConfBaseException as error:
        raise MiaGenError(
            f"The split config cannot be resolved ({error}); compose it inside the root config (which "
            "defines `seed`) or set the value explicitly, e.g. split.seed=<int>."
        ) from error
    if not isinstance(split_cfg, dict):
        raise MiaGenError(f"The split config must be a mapping, got {type(split_cfg).__name__}.")
    return split_cfg


def _as_indices(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 array of record indices; integer-valued floats are refused (they hide bugs)."""
    array = np.asarray(values)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise MiaGenError(
            f"Split {name} must be a 1-D list of integer record indices, got dtype {array.dtype} and "
            f"shape {array.shape}; fix the split file."
        )
    return array.astype(np.int64)
