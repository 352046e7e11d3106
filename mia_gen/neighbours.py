"""Exact k nearest neighbours in squared L2, streamed over a database too large for memory.

The database is read chunk by chunk (a Tensor, a `SampleStore`, or any iterable of
`(start, chunk)` pairs). The torch backend (any device; the default) ranks each chunk block by
block: one `addmm` per block computes ||x||^2 - 2 q.x (the norm add fused into the GEMM; ||q||^2
is constant per query and left out), then a min (k = 1) or topk reduces the block; blocks are
sized from the CPU's last-level cache. faiss `IndexFlatL2` (CPU; the `[faiss]` extra) runs on
request. The chosen candidates' distances are then recomputed directly as sum((q - x)^2) (the
expansion loses digits when q ~ x, which is exactly the case membership inference cares about),
and the running top k is merged exactly.

Ties: among equal distances the smaller database index wins. Candidates are picked by the float32
expansion, so two samples whose squared distances to a query differ by less than its rounding
error (about 1e-6 x (||q||^2 + ||x||^2)) may be ranked either way; exact duplicates always tie.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from mia_gen.device import resolve_device
from mia_gen.errors import MiaGenError
from mia_gen.extras import require
from mia_gen.sample_store import SampleStore

log = logging.getLogger(__name__)
_LOGGED_BACKENDS: set[tuple[str, str]] = set()

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "faiss", "torch")
# Largest (query block x tile) distance block on a GPU, where no CPU cache bounds it (floats).
_GPU_BLOCK_ELEMENTS = 1 << 25
# CPU distance blocks: about this process's share of the last-level cache, within these bounds
# (bytes). Small blocks lose to per-call GEMM overhead (re-packing the queries for every tile):
# 2,000 x 40,000 x 3,072 on a 2-core Xeon (105 MB L3), 2 threads: 8-16 MB blocks took 1.2-1.3x one
# bare matmul, 64-512 MB blocks 0.94-1.04x.
_CPU_BLOCK_BYTES = (64 << 20, 256 << 20)
# Fewer database rows per GEMM call than this and per-call packing of the queries starts to cost.
_MIN_TILE_ROWS = 8192
# Columns per group when searching a row's first minimum (`_first_argmin`); tiles are multiples of it.
_ARGMIN_GROUP = 32
# Largest (query block x k x D) difference tensor of the exact re-computation (floats).
_REFINE_BLOCK_ELEMENTS = 1 << 24
# OpenBLAS core types without AVX: a BLAS that detects one of these runs float32 GEMM several
# times slower than the CPU allows (faiss-cpu's bundled OpenBLAS was seen detecting an AVX-512
# Xeon as Prescott).
_PRE_AVX_CORES = frozenset(
    {"katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn",
     "dunnington", "nehalem", "opteron", "opteron_sse3", "barcelona", "bobcat", "athlon", "generic"}
)

Database = torch.Tensor | SampleStore | Iterable[tuple[int, torch.Tensor]]


def _database_chunks(database: Database, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(start, raw chunk)` for any supported database, checking that starts are contiguous."""
    if isinstance(database, torch.Tensor):
        chunks: Iterable = ((s, database[s : s + chunk_size]) for s in range(0, len(database), chunk_size))
    elif isinstance(database, SampleStore):
        chunks = ((s, x) for s, x, _ in database.iter_chunks(chunk_size))
    elif isinstance(database, np.ndarray):
        raise MiaGenError(
            "database is a numpy array; pass torch.from_numpy(array) (float32), a SampleStore, "
            "or an iterable of (start, chunk) pairs."
        )
    else:
        chunks = database
    expected = 0
    for item in chunks:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[1], torch.Tensor)):
            raise MiaGenError(
                "database must be a Tensor (N, ...), a SampleStore, or an iterable of "
                f"(start, chunk Tensor) pairs; got an item of type {type(item).__name__}."
            )
        start, chunk = int(item[0]), item[1]
        if start != expected:
            raise MiaGenError(
                f"database chunks must be contiguous and in order: expected a chunk starting at "
                f"{expected}, got {start}. Yield (start, chunk) with start = rows seen so far."
            )
        expected += len(chunk)
        if len(chunk):
            yield start, chunk


def _features(raw: torch.Tensor, feature_fn: FeatureFn | None, device: torch.device) -> torch.Tensor:
    """Raw rows `(n, ...)` -> float32 features `(n, D)` on `device`."""
    if feature_fn is not None:
        with torch.no_grad():
            feats = feature_fn(raw)
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != raw.shape[0]:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise MiaGenError(
                f"feature_fn must map a chunk of {raw.shape[0]} rows to a (n, D) tensor; it "
                f"returned {got}."
            )
    else:
        feats = raw.reshape(raw.shape[0], -1)
    return feats.to(device=device, dtype=torch.float32).contiguous()


def _query_features(
    queries: torch.Tensor, feature_fn: FeatureFn | None, chunk_size: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor) or queries.ndim < 1 or len(queries) == 0:
        raise MiaGenError(
            "queries must be a non-empty Tensor of shape (Q, ...); "
            f"got {tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__}."
        )
    if queries.ndim == 1:
        raise MiaGenError(
            f"queries has shape {tuple(queries.shape)}; a single record needs a leading batch "
            "dimension: pass queries[None]."
        )
    parts = [_features(queries[s : s + chunk_size], feature_fn, device) for s in range(0, len(queries), chunk_size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one part: no copy of float32 queries


def _check_dims(q: torch.Tensor, x: torch.Tensor, start: int) -> None:
    if q.shape[1] != x.shape[1]:
        raise MiaGenError(
            f"queries have {q.shape[1]} features but the database chunk at {start} has "
            f"{x.shape[1]}; queries and samples must have the same shape (same image size and "
            "channels, or the same feature_fn)."
        )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise MiaGenError(f"backend={backend!r} is unknown; use one of {BACKENDS}.")
    if backend == "faiss" and device.type != "cpu":
        raise MiaGenError(
            f"backend='faiss' runs on CPU (faiss-cpu) but device={device}; use backend='torch' "
            "(or 'auto') on CUDA, or device='cpu'."
        )
    if backend == "faiss":
        require("faiss", feature="backend=faiss (nearest-neighbour backend)")
    key = ("torch" if backend == "auto" else backend, device.type)
    if key not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add(key)
        _log_backend(backend, device)
    return key[0]


def _log_backend(backend: str, device: torch.device) -> None:
    """One INFO line per process and backend: which backend runs, why, and what BLAS it runs on."""
    blas = _blas_libraries()
    faiss_blas = [lib for lib in blas if "faiss" in lib["filepath"]]
    slow = [lib for lib in faiss_blas if str(lib.get("architecture", "")).lower() in _PRE_AVX_CORES]
    if backend == "faiss":
        why = "requested"
        if slow:
            log.warning(
                "nearest neighbours: faiss-cpu's bundled BLAS detected this CPU as %s (no AVX), so "
                "backend='faiss' may run several times slower than backend='torch' (the default).",
                slow[0]["architecture"],
            )
    elif device.type != "cpu":
        why = f"default; on {device} (faiss-cpu is CPU-only)"
    else:
        why = ("requested" if backend == "torch" else "default") + "; faiss is opt-in (backend='faiss'): "
        why += (
            f"its bundled BLAS detected this CPU as {slow[0]['architecture']}"
            if slow
            else "faiss-cpu's bundled OpenBLAS can detect a CPU as an older core (e.g. Prescott, no AVX) "
            "and then runs several times slower than torch's matmul"
        )
    log.info("nearest neighbours: %s (%s) on %s", backend if backend != "auto" else "torch", why, _describe_blas(blas))


def _blas_libraries() -> list[dict]:
    """threadpoolctl's record of each BLAS loaded in this process (the core type it detected)."""
    from threadpoolctl import threadpool_info  # imported here: only the once-per-process log line needs it

    return [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]


def _describe_blas(blas: list[dict]) -> str:
    """torch's own kernels, then every loaded BLAS: library, version, detected core type, threads."""
    torch_blas = "MKL" if torch.backends.mkl.is_available() else "its BLAS"
    parts = [f"torch {torch.__version__} ({torch_blas}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads)"]
    for lib in blas:
        owner = Path(lib["filepath"]).parent.name
        parts.append(
            f"{lib.get('internal_api')} {lib.get('version')} from {owner} "
            f"(core type {lib.get('architecture', 'not reported')}, {lib.get('num_threads')} threads)"
        )
    return "; ".join(parts)


def _sq_distance_block(q: torch.Tensor, q_norm: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """||q - x||^2 for all pairs via the matmul expansion, clamped at 0: `(len(q), len(x))`."""
    d = torch.addmm(x_norm.unsqueeze(0), q, x.T, beta=1.0, alpha=-2.0)
    return d.add_(q_norm.unsqueeze(1)).clamp_(min=0.0)


def pairwise_sq_distances_chunks(
    queries: torch.Tensor,
    database: Database,
    chunk_size: int = 65536,
    feature_fn: FeatureFn | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Stream all squared L2 distances between queries and the database.

    queries (`torch.Tensor` of shape `(Q, ...)`, flattened to `(Q, D)` or mapped by feature_fn);
    yields `(start, sq_dist)` with sq_dist float32 `(Q, n_chunk)` on `device`, >= 0, for database
    rows [start, start + n_chunk). Uses the matmul expansion (relative error ~1e-6 of the norms).
    """
    _check_chunk_size(chunk_size)
    device = resolve_device(str(device))
    q = _query_features(queries, feature_fn, chunk_size, device)
    q_norm = _sq_norms(q)
    for start, raw in _database_chunks(database, chunk_size):
        x = _features(raw, feature_fn, device)
        _check_dims(q, x, start)
        yield start, _sq_distance_block(q, q_norm, x, _sq_norms(x))


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise MiaGenError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


@functools.lru_cache(maxsize=1)
def _cache_share_bytes() -> int:
    """This process's share of the last-level CPU cache: its size x min(threads, CPUs sharing it) /
    CPUs sharing it, from Linux sysfs; else `os.sysconf`; else 8 MiB."""
    level, size, sharing = 0, 0, 1
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            this_level = int((index / "level").read_text())
            this_size = _parse_cache_size((index / "size").read_text())
            this_sharing = _count_cpus((index / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            continue
        if this_level > level and this_size > 0:
            level, size, sharing = this_level, this_size, this_sharing
    if not size:
        for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
            try:
                size = max(0, os.sysconf(name))
            except (ValueError, OSError):
                size = 0
            if size:
                break
    if not size:
        return 8 << 20
    return size * min(torch.get_num_threads(), sharing) // sharing


def _parse_cache_size(text: str) -> int:
    """sysfs cache size ("48K", "2048K", "32M") -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _count_cpus(cpu_list: str) -> int:
    """sysfs CPU list ("0-3,8,10-11") -> number of CPUs."""
    count = 0
    for part in cpu_list.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return max(count, 1)


def _tile_shape(n_queries: int, n_rows: int, device: torch.device) -> tuple[int, int]:
    """(queries, database rows) of one distance block: on CPU about the last-level cache share
    (`_CPU_BLOCK_BYTES`), so the min / topk reads much of it back from cache; as many rows as fit,
    at least about `_MIN_TILE_ROWS`, the queries split if need be; the chunk cut into tiles of
    equal length, each a multiple of `_ARGMIN_GROUP` (but the last)."""
    if device.type == "cpu":
        low, high = _CPU_BLOCK_BYTES
        elements = min(max(_cache_share_bytes(), low), high) // 4
    else:
        elements = _GPU_BLOCK_ELEMENTS
    rows = min(n_rows, max(_MIN_TILE_ROWS, elements // n_queries) // _ARGMIN_GROUP * _ARGMIN_GROUP)
    q_block = max(1, min(n_queries, elements // rows))
    n_tiles = -(-n_rows // rows)  # then tiles of equal length: no short, slow last GEMM
    balanced = -(-n_rows // n_tiles)
    return q_block, min(n_rows, -(-balanced // _ARGMIN_GROUP) * _ARGMIN_GROUP)


def _chunk_topk_torch(q: torch.Tensor, x: torch.Tensor, k: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Local indices `(Q, k)` of each query's k nearest rows of x (ranking only).

    Ranks by ||x||^2 - 2 q.x, one cache-sized (query block, tile) at a time: the tile's norms are
    taken while it is read anyway, `addmm` writes the ranking block in one GEMM, min / topk reduces
    it in cache. Ties go to the smaller index. `buffer` (floats) is reused for the blocks.
    """
    n_queries = len(q)
    q_block, rows = _tile_shape(n_queries, len(x), x.device)
    if buffer is None:
        buffer = torch.empty(0, device=x.device)
    if buffer.numel() < q_block * rows:
        buffer.resize_(q_block * rows)
    best_v = torch.full((n_queries, k), float("inf"), device=x.device)
    best_i = torch.zeros((n_queries, k), dtype=torch.int64, device=x.device)
    for t in range(0, len(x), rows):
        tile = x[t : t + rows]
        tile_norm = _sq_norms(tile)
        for s in range(0, n_queries, q_block):
            qs = q[s : s + q_block]
            d = buffer[: len(qs) * len(tile)].view(len(qs), len(tile))
            torch.addmm(tile_norm.unsqueeze(0), qs, tile.T, beta=1.0, alpha=-2.0, out=d)
            if k == 1:
                _update_min(d, best_v[s : s + q_block, 0], best_i[s : s + q_block, 0], t)
                continue
            values, local = _block_topk(d, min(k, len(tile)))
            best_v[s : s + q_block], best_i[s : s + q_block] = _merge_topk(
                best_v[s : s + q_block], best_i[s : s + q_block], values, local + t, k
            )
    return best_i[:, : min(k, len(x))]


def _update_min(d: torch.Tensor, best_v: torch.Tensor, best_i: torch.Tensor, offset: int) -> None:
    """Lower the running minimum `best_v` / its column `best_i` (views, `(q,)`; `best_v` all inf
    when offset == 0) of each row of the block d `(q, n)`, whose column j is row offset + j of the
    chunk; ties keep the earlier column.

    On CPU, `amin` is vectorised and ~10x faster per element than `min` with indices; after the
    first block the index is searched only in the rows whose minimum improved (few: a new record
    among i.i.d. rows is ever rarer).
    """
    if d.device.type != "cpu":
        values, local = d.min(dim=1)  # the first (smallest-column) minimum
        better = values < best_v
        best_v.copy_(torch.where(better, values, best_v))
        best_i.copy_(torch.where(better, local + offset, best_i))
        return
    if offset == 0:  # every row improves on inf: search all the indices at once
        local = _first_argmin(d)
        values = d.gather(1, local[:, None]).squeeze(1)
    else:
        values = d.amin(dim=1)
    if values.isnan().any():  # a NaN hides the row's real minimum
        raise MiaGenError(
            f"squared distances to database rows {offset}..{offset + d.shape[1] - 1} of a chunk are NaN: "
            "the queries or these samples hold NaN or inf; check the generator's output (e.g. a diverged model)."
        )
    if offset == 0:
        best_v.copy_(values)
        best_i.copy_(local)
        return
    better = (values < best_v).nonzero().flatten()
    if len(better) == 0:
        return
    rows = d if len(better) == len(d) else d.index_select(0, better)
    best_v[better] = values[better]
    best_i[better] = _first_argmin(rows) + offset


def _first_argmin(d: torch.Tensor) -> torch.Tensor:
    """Column of the first minimum of each row of d `(q, n)`, contiguous.

    Same answer as `d.argmin(1)` (which is not vectorised on CPU): the minima of groups of
    `_ARGMIN_GROUP` columns by the vectorised `amin`, the first group holding the row's minimum,
    then argmin inside that group only.
    """
    n_rows, n = d.shape
    if n % _ARGMIN_GROUP or n < 4 * _ARGMIN_GROUP:
        return d.argmin(dim=1)
    group = d.view(n_rows, n // _ARGMIN_GROUP, _ARGMIN_GROUP).amin(dim=2).argmin(dim=1)
    first = group * _ARGMIN_GROUP
    cols = first[:, None] + torch.arange(_ARGMIN_GROUP, device=d.device)
    return first + d.gather(1, cols).argmin(dim=1)


def _block_topk(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of d and their columns; ties go to the smaller column."""
    values, local = torch.topk(d, k, dim=1, largest=False, sorted=False)
    # topk picks an arbitrary column among equal values (duplicate samples); rows whose k-th value
    # is shared beyond the top k are re-picked by a stable sort: the smaller column wins.
    tied = ((d <= values.max(1, keepdim=True).values).sum(1) > k).nonzero().flatten()
    for row in tied.tolist():
        local[row] = torch.sort(d[row], stable=True).indices[:k]
        values[row] = d[row, local[row]]
    return values, local


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Row sums of squares `(n,)` without materialising x * x (a copy the size of the chunk)."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _chunk_topk_faiss(q_np: np.ndarray, x: torch.Tensor, k: int) -> torch.Tensor:
    faiss = require("faiss", feature="backend=faiss (nearest-neighbour backend)")
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x.numpy()))
    _, local = index.search(q_np, k)
    return torch.from_numpy(local)


def _exact_sq_distances(q: torch.Tensor, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """sum((q_i - x_j)^2) for the candidates `local` (Q, k) of each query, computed directly."""
    k, dim = local.shape[1], q.shape[1]
    step = max(1, _REFINE_BLOCK_ELEMENTS // max(k * dim, 1))
    out = []
    for s in range(0, len(q), step):
        diff = q[s : s + step, None, :] - x[local[s : s + step]]
        out.append(diff.square_().sum(-1))
    return torch.cat(out)


def _merge_topk(
    best_d: torch.Tensor, best_i: torch.Tensor, d: torch.Tensor, i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the union; among equal distances the smaller database index wins."""
    all_d, all_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    by_index = torch.argsort(all_i, dim=1, stable=True)
    all_d, all_i = all_d.gather(1, by_index), all_i.gather(1, by_index)
    by_distance = torch.argsort(all_d, dim=1, stable=True)[:, :k]
    return all_d.gather(1, by_distance), all_i.gather(1, by_distance)


def nearest_neighbours(
    queries: torch.Tensor,
    database: Database,
    k: int = 1,
    *,
    backend: str = "auto",
    chunk_size: int = 65536,
    feature_fn: FeatureFn | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest database rows of each query in squared L2.

    queries (`torch.Tensor` of shape `(Q, ...)`), database (Tensor `(N, ...)`, `SampleStore` or
    iterable of `(start, chunk)`); both flattened to D features, or mapped to `(n, D)` by
    `feature_fn` (applied to raw chunks on CPU; e.g. an `LPIPSEmbedding`).
    backend: "torch" (matmul, any device), "faiss" (IndexFlatL2 per chunk, CPU; the `[faiss]`
    extra), "auto" (torch; the run log says once which backend ran, why, and on which BLAS).
    Returns `(sq_distances, indices)`: float32 `(Q, k)` ascending, >= 0, and int64 `(Q, k)`
    database row indices; ties go to the smaller index. Results are on CPU.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MiaGenError(f"k must be a positive integer, got {k!r}.")
    _check_chunk_size(chunk_size)
    device = resolve_device(str(device))
    backend = _resolve_backend(backend, device)
    q = _query_features(queries, feature_fn, chunk_size, device)
    q_np = np.ascontiguousarray(q.numpy()) if backend == "faiss" else None

    n_queries = len(q)
    best_d = torch.full((n_queries, k), float("inf"), device=device)
    best_i = torch.full((n_queries, k), -1, dtype=torch.int64, device=device)
    buffer = torch.empty(0, device=device)  # the torch backend's distance blocks, reused across chunks
    n_seen = 0
    for start, raw in _database_chunks(database, chunk_size):
        x = _features(raw, feature_fn, device)
        _check_dims(q, x, start)
        k_chunk = min(k, len(x))
        if backend == "faiss":
            local = _chunk_topk_faiss(q_np, x, k_chunk)
        else:
            local = _chunk_topk_torch(q, x, k_chunk, buffer)
        d = _exact_sq_distances(q, x, local)
        best_d, best_i = _merge_topk(best_d, best_i, d, local + start, k)
        n_seen = start + len(x)
    if n_seen < k:
        raise MiaGenError(
            f"k={k} nearest neighbours were requested but the database has only {n_seen} samples; "
            "lower k or generate more samples."
        )
    return best_d.cpu(), best_i.cpu()
