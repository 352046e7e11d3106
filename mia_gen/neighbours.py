"""Exact k nearest neighbours in squared L2, streamed over a database too large for memory.

The database is read chunk by chunk (a Tensor, a `SampleStore`, or any iterable of
`(start, chunk)` pairs); each chunk's top k is found with a matmul expansion
||q||^2 - 2 q.x + ||x||^2 (torch, any device; the default) or faiss `IndexFlatL2` (CPU, on request), the chosen candidates' distances
are recomputed directly as sum((q - x)^2) (the expansion loses digits when q ~ x, which is
exactly the case membership inference cares about), and the running top k is merged exactly.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from mia_gen.device import resolve_device
from mia_gen.errors import MiaGenError
from mia_gen.sample_store import SampleStore

log = logging.getLogger(__name__)
_LOGGED_BACKENDS: set[str] = set()

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "faiss", "torch")
# Largest (query block x chunk) distance matrix the torch backend materialises at once (floats).
_DISTANCE_BLOCK_ELEMENTS = 1 << 25
# Largest (query block x k x D) difference tensor of the exact re-computation (floats).
_REFINE_BLOCK_ELEMENTS = 1 << 24

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
    return torch.cat(
        [_features(queries[s : s + chunk_size], feature_fn, device) for s in range(0, len(queries), chunk_size)]
    )


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
    if backend == "auto":
        # torch everywhere: its matmul runs on torch's own BLAS, which detects the CPU correctly;
        # faiss-cpu's bundled OpenBLAS was seen detecting an AVX-512 Xeon as `Prescott` (no AVX) and
        # running 4x slower than one matmul (BENCHMARKS.md (a)). faiss stays available on request.
        _log_backend_once("torch", "auto: torch's BLAS on every device; backend='faiss' opts in to faiss-cpu")
        return "torch"
    _log_backend_once(backend, "requested")
    if backend == "faiss" and device.type != "cpu":
        raise MiaGenError(
            f"backend='faiss' runs on CPU (faiss-cpu) but device={device}; use backend='torch' "
            "(or 'auto') on CUDA, or device='cpu'."
        )
    return backend


def _log_backend_once(backend: str, why: str) -> None:
    if backend not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add(backend)
        log.info("nearest neighbours: backend %s (%s)", backend, why)


def _sq_distance_block(q: torch.Tensor, q_norm: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """||q - x||^2 for all pairs via the matmul expansion, clamped at 0: `(len(q), len(x))`."""
    d = torch.addmm(x_norm.unsqueeze(0), q, x.T, beta=1.0, alpha=-2.0)
    return d.add_(q_norm.unsqueeze(1)).clamp_(min=0.0)


def _query_block(n_chunk: int, n_queries: int) -> int:
    return max(1, min(n_queries, _DISTANCE_BLOCK_ELEMENTS // max(n_chunk, 1)))


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


def _chunk_topk_torch(q: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Local indices `(Q, k)` of each query's k nearest rows of x (ranking only).

    Ranks by ||x||^2 - 2 q.x: dropping ||q||^2 (constant per query) and the clamp saves two
    passes over the distance block; the exact distances are recomputed afterwards anyway.
    """
    x_norm = _sq_norms(x)
    step = _query_block(len(x), len(q))
    out = []
    for s in range(0, len(q), step):
        d = torch.addmm(x_norm.unsqueeze(0), q[s : s + step], x.T, beta=1.0, alpha=-2.0)
        if k == 1:  # one pass; argmin returns the first (smallest-index) minimum, so ties need no re-pick
            out.append(d.argmin(dim=1, keepdim=True))
            continue
        values, local = torch.topk(d, k, dim=1, largest=False, sorted=False)
        # topk picks an arbitrary row among equal distances (duplicate samples); rows whose k-th
        # distance is shared beyond the top k are re-picked by a stable sort: smaller index wins.
        tied = ((d <= values.max(1, keepdim=True).values).sum(1) > k).nonzero().flatten()
        for row in tied.tolist():
            local[row] = torch.sort(d[row], stable=True).indices[:k]
        out.append(local)
    return torch.cat(out)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Row sums of squares `(n,)` without materialising x * x (a copy the size of the chunk)."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _chunk_topk_faiss(q_np: np.ndarray, x: torch.Tensor, k: int) -> torch.Tensor:
    import faiss

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
        out.append((diff * diff).sum(-1))
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
    backend: "torch" (matmul, any device), "faiss" (IndexFlatL2 per chunk, CPU), "auto" (torch; the
    run log says which backend ran and why). Returns `(sq_distances, indices)`: float32 `(Q, k)` ascending, >= 0, and
    int64 `(Q, k)` database row indices; ties go to the smaller index. Results are on CPU.
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
    n_seen = 0
    for start, raw in _database_chunks(database, chunk_size):
        x = _features(raw, feature_fn, device)
        _check_dims(q, x, start)
        k_chunk = min(k, len(x))
        if backend == "faiss":
            local = _chunk_topk_faiss(q_np, x, k_chunk)
        else:
            local = _chunk_topk_torch(q, x, k_chunk)
        d = _exact_sq_distances(q, x, local)
        best_d, best_i = _merge_topk(best_d, best_i, d, local + start, k)
        n_seen = start + len(x)
    if n_seen < k:
        raise MiaGenError(
            f"k={k} nearest neighbours were requested but the database has only {n_seen} samples; "
            "lower k or generate more samples."
        )
    return best_d.cpu(), best_i.cpu()
