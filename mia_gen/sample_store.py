"""Generated samples (and their latents z) on disk in shards, written resumably and read by mmap.

Layout of a store directory::

    manifest.json                     settings + per-shard count, bytes, sha256; `complete`
    shard_00000.samples.npy           (n, *sample_shape) in the storage dtype
    shard_00000.latents.npy           (n, latent_dim) float32, only when sample_fn returns z
    shard_00000.captions.npy          (n,) int32, only for a store drawn from captions: each sample's
                                      caption, an index into the manifest's sorted `captions`

Shard i is drawn from a fresh `torch.Generator` seeded from (seed, i), so regenerating one shard
gives the same bytes as an uninterrupted run: a resumed store equals a fresh one, byte for byte.

Opening a store checks every shard against the manifest (`mia_gen.checksums`): its size each time,
its sha256 the first time a process opens it (or when its size or mtime changed), and
`SampleStore.verify()` re-hashes on demand. A damaged shard is a CorruptStoreError, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mia_gen.checksums import check_file, record_file
from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.hashing import config_hash, to_plain

MANIFEST = "manifest.json"
FORMAT = "mia-gen-sample-store"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("uint8", "float16", "float32")
_UINT8_SCALE = 127.5
# uint8 rounding already tolerates this much outside [-1, 1]; beyond it the data are not images.
_IMAGE_RANGE_TOLERANCE = 1e-3
_RESUME_HINT = (
    "Rerun `mia-gen-sample` (or write_samples) with the same settings: it keeps the verified "
    "shards and rewrites only the missing or damaged ones."
)
_DAMAGED_HINT = (
    "Delete {path} and sample again (`mia-gen-sample` or write_samples with the settings that wrote "
    "it rewrites only the damaged shards)."
)

# sample_fn(n, generator) -> (x, z); for a store drawn from captions, sample_fn(n, generator, captions).
SampleFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
SHARD_KINDS = ("samples", "latents", "captions")


def shard_seed(seed: int, shard_index: int) -> int:
    """Seed of shard `shard_index`'s generator: a hash of (seed, index), independent of other shards."""
    digest = hashlib.sha256(f"mia-gen-shard|{int(seed)}|{int(shard_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _shard_name(index: int, kind: str) -> str:
    return f"shard_{index:05d}.{kind}.npy"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write `array` as .npy under a temp name, then rename; returns the manifest entry."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    entry = {"file": path.name, **record_file(tmp)}
    os.replace(tmp, path)
    return entry


def encode_samples(x: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Float samples -> the on-disk array.

    x (`torch.Tensor` of shape `(n, *sample_shape)`; images in [-1, 1] for "uint8").
    uint8 stores round((x + 1) * 127.5) clipped to [0, 255]; decoding error is <= 0.5 / 127.5.
    """
    x = x.detach().to("cpu", torch.float32)
    if storage_dtype == "uint8":
        return torch.round((x + 1.0) * _UINT8_SCALE).clamp_(0, 255).to(torch.uint8).numpy()
    return x.numpy().astype(storage_dtype, copy=False)


def decode_samples(array: np.ndarray) -> torch.Tensor:
    """On-disk array -> float32 tensor (uint8 mapped back to [-1, 1])."""
    out = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    if array.dtype == np.uint8:
        out = out / _UINT8_SCALE - 1.0
    return out


class SampleStore:
    """Read access to a complete sample store; open with `SampleStore.open(path)`.

    Shards are memory-mapped, so memory does not grow with the number of samples.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self._manifest = manifest
        self._shards: list[dict[str, Any]] = sorted(manifest["shards"], key=lambda s: s["index"])
        self._starts = np.array([s["start"] for s in self._shards], dtype=np.int64)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "SampleStore":
        """Open a finished store; CorruptStoreError if it is incomplete or a shard differs from the
        manifest (size, and sha256 the first time this process opens it: `mia_gen.checksums`)."""
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise CorruptStoreError(
                f"No sample store at {path}: {MANIFEST} is missing (sampling never started or was "
                f"interrupted before its first shard). {_RESUME_HINT}"
            )
        if not manifest.get("complete", False):
            done = len(manifest.get("shards", []))
            total = _n_shards(manifest["n_samples"], manifest["shard_size"])
            raise CorruptStoreError(
                f"Sample store {path} is incomplete: {done} of {total} shards were written before "
                f"sampling stopped. {_RESUME_HINT}"
            )
        store = cls(path, manifest)
        store._check_shards(full=False)
        return store

    # --------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self._manifest["n_samples"])

    def __repr__(self) -> str:
        return (
            f"SampleStore({str(self.path)!r}, n={len(self)}, sample_shape={self.sample_shape}, "
            f"latent_dim={self.latent_dim}, storage_dtype={self.storage_dtype!r})"
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._manifest["sample_shape"])

    @property
    def latent_dim(self) -> int | None:
        return self._manifest["latent_dim"]

    @property
    def storage_dtype(self) -> str:
        return self._manifest["storage_dtype"]

    @property
    def metadata(self) -> dict[str, Any]:
        return self._manifest["metadata"]

    @property
    def seed(self) -> int:
        return int(self._manifest["seed"])

    @property
    def captions(self) -> list[str] | None:
        """The distinct captions (sorted) the samples were drawn from; None for a store not drawn from captions."""
        return self._manifest.get("captions")

    def caption_index(self) -> np.ndarray:
        """`(N,)` int64: sample i was drawn from the caption `captions[caption_index()[i]]`."""
        if self.captions is None:
            raise MiaGenError(f"Sample store {self.path} was not drawn from captions; it has no caption per sample.")
        return self._read_range(0, len(self), "captions").astype(np.int64)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    # ------------------------------------------------------------------ reading
    def _array(self, shard_pos: int, kind: str) -> np.ndarray:
        """A fresh read-only memmap of one shard file.

        Not cached on purpose: mapped pages count as resident memory until unmapped, so a
        long-lived map of every shard would make a full pass grow RSS with the store's size.
        """
        shard = self._shards[shard_pos]
        array = np.load(self.path / shard[kind]["file"], mmap_mode="r", allow_pickle=False)
        if array.shape[0] != shard["count"]:
            raise CorruptStoreError(
                f"Sample store {self.path}: shard {shard['index']} holds {array.shape[0]} rows, "
                f"the manifest says {shard['count']}. {_RESUME_HINT}"
            )
        return array

    def _require_latents(self) -> None:
        if self.latent_dim is None:
            raise MiaGenError(
                f"Sample store {self.path} has no latents (its sample_fn returned z=None); "
                "resample with a sample_fn that returns (x, z) to use latent-based attacks."
            )

    def _read_range(self, start: int, stop: int, kind: str) -> np.ndarray:
        """Rows [start, stop) of `kind`, possibly spanning shards (copied out of the mmaps)."""
        parts = []
        pos = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            shard = self._shards[pos]
            lo = start - shard["start"]
            hi = min(stop - shard["start"], shard["count"])
            parts.append(np.asarray(self._array(pos, kind)[lo:hi]))
            start = shard["start"] + hi
            pos += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def iter_chunks(
        self, chunk_size: int = 8192, with_latents: bool = False
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Yield `(start, x, z)` covering all samples in order.

        x (`torch.Tensor` float32 of shape `(n, *sample_shape)`, uint8 stores decoded to [-1, 1]);
        z (`(n, latent_dim)` float32) when `with_latents`, else None. n <= chunk_size.
        """
        if chunk_size < 1:
            raise MiaGenError(f"chunk_size must be >= 1, got {chunk_size}.")
        if with_latents:
            self._require_latents()
        for start in range(0, len(self), chunk_size):
            stop = min(start + chunk_size, len(self))
            x = decode_samples(self._read_range(start, stop, "samples"))
            z = None
            if with_latents:
                z = torch.from_numpy(np.array(self._read_range(start, stop, "latents"), copy=True))
            yield start, x, z

    def _gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise MiaGenError(
                f"Index out of range for sample store {self.path} with {len(self)} samples "
                f"(got min {idx.min()}, max {idx.max()})."
            )
        idx = np.where(idx < 0, idx + len(self), idx)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        first = self._array(0, kind)
        out = np.empty((idx.size, *first.shape[1:]), dtype=first.dtype)
        del first
        for pos in np.unique(shard_of):
            mask = shard_of == pos
            out[mask] = self._array(int(pos), kind)[idx[mask] - self._starts[pos]]
        return out

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Samples at `indices` (in that order), float32 `(len(indices), *sample_shape)`."""
        return decode_samples(self._gather(indices, "samples"))

    def get_latents(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Latents at `indices` (in that order), float32 `(len(indices), latent_dim)`."""
        self._require_latents()
        return torch.from_numpy(self._gather(indices, "latents"))

    def verify(self) -> None:
        """Re-hash every shard file now; CorruptStoreError naming the first shard that differs."""
        self._check_shards(full=True)

    def _check_shards(self, full: bool) -> None:
        for shard in self._shards:
            problem = _shard_problem(self.path, shard, full, with_captions=self.captions is not None)
            if problem is not None:
                raise CorruptStoreError(
                    f"Sample store {self.path}: shard {shard['index']} {problem}; it must not be read. "
                    + _DAMAGED_HINT.format(path=self.path)
                )


def index_captions(captions: Sequence[str], n_samples: int) -> tuple[list[str], np.ndarray]:
    """One caption per sample -> (the distinct captions sorted, `(n_samples,)` int32 index of each sample's)."""
    if isinstance(captions, str) or len(captions) != n_samples or not all(isinstance(c, str) for c in captions):
        got = "a single string" if isinstance(captions, str) else f"{len(captions)} item(s)"
        raise MiaGenError(f"captions must be one string per sample ({n_samples} strings), got {got}.")
    caption_list = sorted(set(captions))
    position = {caption: i for i, caption in enumerate(caption_list)}
    return caption_list, np.array([position[caption] for caption in captions], dtype=np.int32)


# ---------------------------------------------------------------------- writing
def _n_shards(n_samples: int, shard_size: int) -> int:
    return -(-n_samples // shard_size)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptStoreError(
            f"{file} is not valid JSON ({exc}); delete {path} and resample."
        ) from exc
    if manifest.get("format") != FORMAT:
        raise CorruptStoreError(
            f"{file} is not a mia-gen sample store manifest; use a new path or delete {path}."
        )
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _shard_problem(path: Path, shard: dict[str, Any], full: bool, with_captions: bool = False) -> str | None:
    """None if every file of `shard` holds what the manifest recorded, else what is wrong with one."""
    if with_captions and shard.get("captions") is None:
        return "has no caption file, though the store was drawn from captions"
    for kind in SHARD_KINDS:
        entry = shard.get(kind)
        if entry is None:
            continue
        problem = check_file(path / entry["file"], entry, full=full)
        if problem is not None:
            return f"file {entry['file']} {problem}"
    return None


def _check_batch(x: Any, z: Any, n: int, storage_dtype: str, shard_index: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] != n:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MiaGenError(
            f"sample_fn({n}, generator) must return (x, z) with x a tensor of shape (n, ...) = "
            f"({n}, ...); for shard {shard_index} it returned x of {got}."
        )
    if not torch.isfinite(x).all():
        raise MiaGenError(
            f"sample_fn returned non-finite values in shard {shard_index}; the generator diverged "
            "or the checkpoint is damaged. Check the model before sampling."
        )
    if storage_dtype == "uint8":
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - _IMAGE_RANGE_TOLERANCE or hi > 1 + _IMAGE_RANGE_TOLERANCE:
            raise MiaGenError(
                f"storage_dtype='uint8' is for images in [-1, 1], but shard {shard_index} has values "
                f"in [{lo:.3g}, {hi:.3g}]. Map images to [-1, 1] (e.g. tanh output, or 2x-1 for "
                "[0, 1]), or use storage_dtype='float32' for tabular data."
            )
    if z is not None and (not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != n):
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise MiaGenError(
            f"sample_fn must return z of shape (n, latent_dim) = ({n}, latent_dim) or None; "
            f"shard {shard_index} returned {got}."
        )


def write_samples(
    path: str | os.PathLike,
    sample_fn: SampleFn,
    n_samples: int,
    *,
    shard_size: int = 10_000,
    seed: int = 0,
    storage_dtype: str = "uint8",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    captions: Sequence[str] | None = None,
) -> SampleStore:
    """Draw `n_samples` from `sample_fn` into a sharded store at `path`; resumes a partial store.

    sample_fn(n, generator) -> (x, z): x float `(n, *sample_shape)` (images in [-1, 1]),
    z float `(n, latent_dim)` or None. `generator` is a CPU `torch.Generator` seeded from
    (seed, shard index); draw all randomness from it (on CPU, then move to the model's device)
    for results that do not depend on earlier shards or on the device.
    captions: one caption per sample (`n_samples` strings), or None. When given, sample_fn is called as
    sample_fn(n, generator, captions_of_the_shard) and draws row i from its caption i; the store keeps
    each sample's caption (`SampleStore.captions`, `SampleStore.caption_index`), checked like the samples.
    Memory holds one shard at a time (`shard_size` samples).
    """
    path = Path(path)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise MiaGenError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise MiaGenError(f"shard_size must be a positive integer, got {shard_size!r}.")
    if storage_dtype not in STORAGE_DTYPES:
        raise MiaGenError(
            f"storage_dtype={storage_dtype!r} is not supported; use 'uint8' (images in [-1, 1]), "
            "'float16' or 'float32' (tabular)."
        )
    n_samples, shard_size, seed = int(n_samples), int(shard_size), int(seed)
    plain_metadata = to_plain(metadata or {})
    settings = {
        "n_samples": n_samples,
        "shard_size": shard_size,
        "seed": seed,
        "storage_dtype": storage_dtype,
        "metadata_hash": config_hash(plain_metadata),
    }
    caption_list, caption_index = None, None
    if captions is not None:
        caption_list, caption_index = index_captions(captions, n_samples)
        settings["captions_hash"] = config_hash(list(captions))

    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob(".shard_*.tmp"):
        leftover.unlink()  # a kill between write and rename leaves these behind

    manifest = _read_manifest(path)
    if manifest is None:
        if any(path.glob("shard_*.npy")):
            raise MiaGenError(
                f"{path} holds shard files but no {MANIFEST}; it was not written by this version of "
                "mia-gen. Use a new path or delete the directory."
            )
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **settings,
            "metadata": plain_metadata,
            "sample_shape": None,
            "latent_dim": None,
            "shards": [],
            "complete": False,
        }
        if caption_list is not None:
            manifest["captions"] = caption_list
    else:
        differing = [
            f"{key}: stored {manifest.get(key)!r}, requested {value!r}"
            for key, value in {"captions_hash": None, **settings}.items()
            if manifest.get(key) != value
        ]
        if differing:
            raise MiaGenError(
                f"{path} already holds a sample store written with different settings ("
                + "; ".join(differing)
                + "). Use a new path for these settings, or delete the directory to replace it."
            )

    n_total = _n_shards(n_samples, shard_size)
    kept = [s for s in manifest["shards"]
            if _shard_problem(path, s, full=False, with_captions=caption_list is not None) is None]
    if len(kept) != len(manifest["shards"]) or (manifest["complete"] and len(kept) < n_total):
        manifest["complete"] = False
    manifest["shards"] = kept
    _write_manifest(path, manifest)
    done = {s["index"] for s in kept}

    todo = [i for i in range(n_total) if i not in done]
    iterator: Any = todo
    if progress and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc=f"sampling into {path.name}", unit="shard")
    for index in iterator:
        start = index * shard_size
        count = min(shard_size, n_samples - start)
        generator = torch.Generator(device="cpu").manual_seed(shard_seed(seed, index))
        with torch.no_grad():
            if caption_list is None:
                out = sample_fn(count, generator)
            else:
                out = sample_fn(count, generator, list(captions[start : start + count]))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise MiaGenError(
                "sample_fn(n, generator) must return a pair (x, z) (z may be None); "
                f"it returned {type(out).__name__}."
            )
        x, z = out
        _check_batch(x, z, count, storage_dtype, index)
        sample_shape = list(x.shape[1:])
        latent_dim = None if z is None else int(z.shape[1])
        if manifest["sample_shape"] is None:
            manifest["sample_shape"], manifest["latent_dim"] = sample_shape, latent_dim
        elif manifest["sample_shape"] != sample_shape or manifest["latent_dim"] != latent_dim:
            raise MiaGenError(
                f"Shard {index} has sample shape {sample_shape} and latent_dim {latent_dim}, but the "
                f"store at {path} holds shape {manifest['sample_shape']} and latent_dim "
                f"{manifest['latent_dim']}. Use a new path for a different model, or delete it."
            )
        shard = {
            "index": index,
            "start": start,
            "count": count,
            "samples": _atomic_save_npy(path / _shard_name(index, "samples"), encode_samples(x, storage_dtype)),
            "latents": None,
        }
        if z is not None:
            latents = z.detach().to("cpu", torch.float32).numpy()
            shard["latents"] = _atomic_save_npy(path / _shard_name(index, "latents"), latents)
        if caption_index is not None:
            shard["captions"] = _atomic_save_npy(path / _shard_name(index, "captions"),
                                                 caption_index[start : start + count])
        manifest["shards"] = sorted(manifest["shards"] + [shard], key=lambda s: s["index"])
        _write_manifest(path, manifest)

    if not manifest["complete"]:
        manifest["complete"] = True
        _write_manifest(path, manifest)
    return SampleStore.open(path)


def import_samples(
    path: str | os.PathLike,
    samples: torch.Tensor,
    *,
    shard_size: int = 10_000,
    storage_dtype: str = "uint8",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SampleStore:
    """Write records generated elsewhere (a synthetic dataset) as a store, so every sample-based
    attack can audit them exactly like a model's samples.

    samples (`torch.Tensor` of shape `(N, ...)`): images in [-1, 1] or tabular rows; no latents.
    Goes through `write_samples`, so it is atomic and resumable too: each shard's generator seed
    identifies which rows the shard holds, whatever shards an interrupted import left behind.
    """
    seed = 0
    n_shards = _n_shards(len(samples), int(shard_size))
    shard_of_seed = {shard_seed(seed, index): index for index in range(n_shards)}

    def rows_of_shard(n: int, generator: torch.Generator):
        start = shard_of_seed[generator.initial_seed()] * int(shard_size)
        return samples[start : start + n].float(), None

    return write_samples(path, rows_of_shard, len(samples), shard_size=shard_size, seed=seed,
                         storage_dtype=storage_dtype, metadata=metadata, progress=progress)


class InMemorySampleStore(SampleStore):
    """Generated samples held in memory, read exactly like an on-disk `SampleStore`.

    For samples that are already a tensor (a notebook, a synthetic dataset, a test): every attack
    reads it through the same methods (`len`, `sample_shape`, `latent_dim`, `iter_chunks`, `get`,
    `get_latents`), and the values it hands out equal those of a store written with the same
    `storage_dtype` (`write_samples` / `import_samples`), bit for bit.

    Args:
        samples (`torch.Tensor` or `np.ndarray` of shape `(N, *sample_shape)`, N >= 1): images in
            [-1, 1] (required for "uint8") or tabular rows.
        latents (`(N, latent_dim)`, optional): the generator inputs z of the samples.
        storage_dtype: "float32" keeps the values; "uint8" / "float16" round them as a store on disk does.
        metadata: free-form, JSON-serialisable notes (a store's `metadata`).
        captions (`list[str]` of length N, optional): the caption each sample was drawn from, as
            `write_samples(..., captions=)` keeps them (`captions`, `caption_index`).
    """

    def __init__(self, samples: Any, latents: Any = None, *, storage_dtype: str = "float32",
                 metadata: dict[str, Any] | None = None, captions: Sequence[str] | None = None):
        samples = as_float_tensor(samples, "samples")
        if samples.ndim < 2 or len(samples) == 0:
            raise MiaGenError(
                f"samples must have shape (N, *sample_shape) with N >= 1, got {tuple(samples.shape)}; "
                "a single sample needs a leading axis (x[None])."
            )
        if storage_dtype not in STORAGE_DTYPES:
            raise MiaGenError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}.")
        if not torch.isfinite(samples).all():
            raise MiaGenError("samples hold non-finite values (NaN or inf); check the generator that made them.")
        if storage_dtype == "uint8":
            lo, hi = float(samples.min()), float(samples.max())
            if lo < -1 - _IMAGE_RANGE_TOLERANCE or hi > 1 + _IMAGE_RANGE_TOLERANCE:
                raise MiaGenError(
                    f"storage_dtype='uint8' is for images in [-1, 1], but the samples lie in [{lo:.3g}, {hi:.3g}]; "
                    "map them to [-1, 1] or keep storage_dtype='float32'."
                )
        arrays = {"samples": encode_samples(samples, storage_dtype)}
        latent_dim = None
        if latents is not None:
            latents = as_float_tensor(latents, "latents")
            if latents.ndim != 2 or len(latents) != len(samples):
                raise MiaGenError(
                    f"latents must have shape (N, latent_dim) = ({len(samples)}, latent_dim), one row per "
                    f"sample, got {tuple(latents.shape)}."
                )
            arrays["latents"] = latents.numpy().astype(np.float32)
            latent_dim = int(latents.shape[1])
        caption_list = None
        if captions is not None:
            caption_list, arrays["captions"] = index_captions(captions, len(samples))
        for array in arrays.values():
            array.setflags(write=False)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "n_samples": len(samples), "shard_size": len(samples),
            "seed": None, "storage_dtype": storage_dtype, "metadata": to_plain(metadata or {}),
            "sample_shape": list(samples.shape[1:]), "latent_dim": latent_dim, "complete": True,
            "shards": [{"index": 0, "start": 0, "count": len(samples)}],
        }
        if caption_list is not None:
            manifest["captions"] = caption_list
        self._arrays = arrays
        super().__init__(Path("<memory>"), manifest)

    def __repr__(self) -> str:
        return (f"InMemorySampleStore(n={len(self)}, sample_shape={self.sample_shape}, "
                f"latent_dim={self.latent_dim}, storage_dtype={self.storage_dtype!r})")

    @property
    def seed(self) -> None:
        """None: the samples were not drawn by `write_samples` from a seed."""
        return None

    def _array(self, shard_pos: int, kind: str) -> np.ndarray:
        return self._arrays[kind]

    def _check_shards(self, full: bool) -> None:
        """Nothing to check: the arrays never left memory."""


def as_float_tensor(values: Any, what: str) -> torch.Tensor:
    """A tensor or array as a float32 CPU tensor (a copy, so later edits of `values` do not leak in)."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.asarray(values))
    if not isinstance(values, torch.Tensor):
        raise MiaGenError(f"{what} must be a torch.Tensor or a numpy array, got {type(values).__name__}.")
    if values.is_complex() or values.dtype == torch.bool:
        raise MiaGenError(f"{what} must hold real numbers, got dtype {values.dtype}.")
    if values.dtype == torch.uint8:
        raise MiaGenError(f"{what} are uint8; images are floats in [-1, 1] inside mia-gen: pass x / 127.5 - 1.")
    return values.detach().to("cpu", torch.float32).clone()
