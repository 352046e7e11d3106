"""Streaming exact kNN against a brute-force numpy loop and sklearn, over every database kind and backend."""

import logging
import sys

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from mia_gen import neighbours
from mia_gen.errors import MiaGenError, MissingExtraError
from mia_gen.extras import available
from mia_gen.neighbours import nearest_neighbours, pairwise_sq_distances_chunks
from mia_gen.sample_store import write_samples

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not available("faiss"), reason="no faiss-cpu"))]


def brute_force_knn(queries, database, k):
    """One query at a time, float64, full sort: the obvious reference."""
    q = queries.reshape(len(queries), -1).double().numpy()
    x = database.reshape(len(database), -1).double().numpy()
    dists, idxs = [], []
    for row in q:
        d = ((x - row) ** 2).sum(1)
        order = np.lexsort((np.arange(len(d)), d))[:k]  # by distance, then index
        dists.append(d[order])
        idxs.append(order)
    return np.array(dists), np.array(idxs)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    queries = torch.rand(13, 2, 3, 3, generator=gen) * 2 - 1
    database = torch.rand(103, 2, 3, 3, generator=gen) * 2 - 1
    return queries, database


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk_size", [3, 10, 103, 4096])  # smaller than k; N % chunk != 0; exact; one chunk
def test_matches_brute_force_on_tensor(data, backend, k, chunk_size):
    queries, database = data
    ref_d, ref_i = brute_force_knn(queries, database, k)
    d, i = nearest_neighbours(queries, database, k, backend=backend, chunk_size=chunk_size)
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == (13, k)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)
    assert (d[:, 1:] >= d[:, :-1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("storage_dtype", ["uint8", "float16", "float32"])
def test_matches_brute_force_on_sample_store(tmp_path, data, backend, k, storage_dtype):
    queries, database = data

    def replay(n, generator):  # the store's shards are fixed rows of `database`
        start = replay.start
        replay.start += n
        return database[start : start + n], None

    replay.start = 0
    store = write_samples(
        tmp_path / "s", replay, len(database), shard_size=40, storage_dtype=storage_dtype, progress=False
    )
    stored = store.get(np.arange(len(store)))  # what the store hands back: uint8 / float16 decoded to float32
    assert stored.dtype == torch.float32
    ref_d, ref_i = brute_force_knn(queries, stored, k)
    d, i = nearest_neighbours(queries, store, k, backend=backend, chunk_size=7)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)


def test_iterable_database_and_feature_fn(data):
    queries, database = data
    chunks = [(s, database[s : s + 25]) for s in range(0, len(database), 25)]

    def first_channel(x):
        return x[:, 0].reshape(len(x), -1) * 3.0

    ref_d, ref_i = brute_force_knn(first_channel(queries), first_channel(database), 5)
    for backend in ("faiss", "torch") if available("faiss") else ("torch",):
        d, i = nearest_neighbours(queries, iter(chunks), 5, backend=backend, feature_fn=first_channel)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_deterministic_and_near_copies_exact(backend):
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(10, 50, generator=gen) * 200  # large norms: the matmul expansion loses digits
    database = torch.cat([base, base, base])  # every row three times
    queries = base[[2, 7]] + 1e-3
    runs = [nearest_neighbours(queries, database, 3, backend=backend, chunk_size=7) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    d, i = runs[0]
    assert i[0].tolist() == [2, 12, 22] and i[1].tolist() == [7, 17, 27]  # smaller index first
    # distances are recomputed directly: 50 * (1e-3)^2 = 5e-5, far below expansion error at |x|^2 ~ 7e5
    np.testing.assert_allclose(d.numpy(), 5e-5, rtol=2e-2)


def test_pairwise_chunks_cover_all_distances(data):
    queries, database = data
    parts = list(pairwise_sq_distances_chunks(queries, database, chunk_size=30))
    assert [s for s, _ in parts] == [0, 30, 60, 90]
    full = torch.cat([d for _, d in parts], 1).double().numpy()
    q = queries.reshape(13, -1).double().numpy()
    x = database.reshape(103, -1).double().numpy()
    expected = np.array([[((qi - xj) ** 2).sum() for xj in x] for qi in q])
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_errors_say_what_to_do(data):
    queries, database = data
    with pytest.raises(MiaGenError, match="only 103 samples.*lower k"):
        nearest_neighbours(queries, database, 104)
    with pytest.raises(MiaGenError, match="same shape"):
        nearest_neighbours(queries[:, :1], database)
    with pytest.raises(MiaGenError, match="k must be a positive integer"):
        nearest_neighbours(queries, database, 0)
    with pytest.raises(MiaGenError, match="use one of"):
        nearest_neighbours(queries, database, backend="annoy")
    with pytest.raises(MiaGenError, match="torch.from_numpy"):
        nearest_neighbours(queries, database.numpy())
    with pytest.raises(MiaGenError, match="contiguous and in order"):
        nearest_neighbours(queries, [(0, database[:5]), (10, database[10:])])
    with pytest.raises(MiaGenError, match="queries\\[None\\]"):
        nearest_neighbours(queries[0, 0, 0], database[:, 0, 0])
    broken = database.clone()
    broken[50, 0, 0, 0] = float("nan")  # one diverged sample
    with pytest.raises(MiaGenError, match="are NaN.*generator's output"):
        nearest_neighbours(queries, broken, backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(MiaGenError, match="device=cpu"):
            nearest_neighbours(queries, database, device="cuda")


def small_tiles(monkeypatch, q_block, rows):
    """Force the torch backend's cache-sized (query block, tile) down to test sizes."""
    monkeypatch.setattr(neighbours, "_tile_shape", lambda n_queries, n_rows, device: (q_block, min(rows, n_rows)))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(
    ("q_block", "rows", "chunk_size"),
    # ragged tiles and chunks; rows % 32 == 0: the grouped first-argmin
    [(8, 30, 50), (13, 64, 1000), (5, 160, 333), (40, 1000, 1000)],
)
def test_tiles_match_sklearn_and_a_per_query_loop(monkeypatch, k, q_block, rows, chunk_size):
    gen = torch.Generator().manual_seed(2)
    queries, database = torch.randn(37, 24, generator=gen), torch.randn(1000, 24, generator=gen)
    small_tiles(monkeypatch, q_block, rows)
    d, i = nearest_neighbours(queries, database, k, backend="torch", chunk_size=chunk_size)
    ref_d, ref_i = brute_force_knn(queries, database, k)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-5)
    sk_d, sk_i = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(database.numpy()).kneighbors(queries.numpy())
    np.testing.assert_array_equal(i.numpy(), sk_i)
    np.testing.assert_allclose(d.numpy(), sk_d**2, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("q_block", "rows"), [(3, 7), (8, 64), (20, 4096)])
def test_exact_duplicates_across_tiles_and_chunks_go_to_the_smaller_index(monkeypatch, k, q_block, rows):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(50, 16, generator=gen)
    database = torch.cat([base, base, base, base])  # row j = row j + 50 = ...: equal distances across tiles
    queries = torch.cat([base[[0, 9, 49]] + 0.01, torch.randn(6, 16, generator=gen)])
    small_tiles(monkeypatch, q_block, rows)
    d, i = nearest_neighbours(queries, database, k, backend="torch", chunk_size=90)
    ref_d, ref_i = brute_force_knn(queries, database, k)  # by distance, then index
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)
    assert i[0].tolist() == [0, 50, 100][:k] and i[2].tolist() == [49, 99, 149][:k]


@pytest.mark.parametrize(("q_block", "rows", "bad_row"), [(4, 32 * 5, 0), (4, 32 * 5, 400), (13, 30, 77)])
def test_nan_anywhere_is_an_error_not_a_skipped_block(monkeypatch, q_block, rows, bad_row):
    gen = torch.Generator().manual_seed(5)
    queries, database = torch.randn(9, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    database[bad_row, 3] = float("nan")
    small_tiles(monkeypatch, q_block, rows)
    with pytest.raises(MiaGenError, match="are NaN"):
        nearest_neighbours(queries, database, backend="torch")


def test_first_argmin_is_argmin_with_ties():
    gen = torch.Generator().manual_seed(4)
    d = torch.randint(0, 5, (64, 32 * 9), generator=gen).float()  # many equal minima per row
    d[3] = 7.0  # a whole row tied
    expected = [int(np.flatnonzero(row == row.min())[0]) for row in d.numpy()]  # first minimum, by a loop
    assert neighbours._first_argmin(d).tolist() == expected
    assert neighbours._first_argmin(d[:, :100]).tolist() == d[:, :100].argmin(1).tolist()  # not a group multiple


def test_tile_shape_follows_the_cache(monkeypatch):
    cpu = torch.device("cpu")
    budget = 100 << 20
    monkeypatch.setattr(neighbours, "_cache_share_bytes", lambda: budget)  # blocks of ~100 MiB
    q_block, rows = neighbours._tile_shape(2000, 100_000, cpu)
    n_tiles = -(-100_000 // rows)
    assert q_block == 2000 and rows % 32 == 0 and 2000 * rows * 4 <= budget * 1.01
    assert 2000 * (100_000 // (n_tiles - 1)) * 4 > budget  # no fewer tiles would fit
    assert n_tiles * rows - 100_000 < 32 * n_tiles  # and they are of equal length
    q_block, rows = neighbours._tile_shape(10**6, 100_000, cpu)  # many queries: blocks of them, long tiles
    assert 7000 < rows <= 8192 and q_block * rows * 4 <= budget * 1.01
    assert neighbours._tile_shape(7, 50, cpu) == (7, 50)  # small problems: one block
    monkeypatch.setattr(neighbours, "_cache_share_bytes", lambda: 1 << 10)  # tiny or unknown cache: 64 MiB floor
    assert 2000 * neighbours._tile_shape(2000, 100_000, cpu)[1] * 4 <= (64 << 20) * 1.01
    monkeypatch.setattr(neighbours, "_cache_share_bytes", lambda: 1 << 40)  # and a 256 MiB ceiling
    assert 2000 * neighbours._tile_shape(2000, 10**6, cpu)[1] * 4 <= (256 << 20) * 1.01


def test_cache_size_parsing():
    assert neighbours._parse_cache_size("48K\n") == 48 << 10 and neighbours._parse_cache_size("32M") == 32 << 20
    assert neighbours._count_cpus("0-3,8,10-11\n") == 7 and neighbours._count_cpus("0") == 1
    assert neighbours._cache_share_bytes() > 0


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(neighbours, "_LOGGED_BACKENDS", set())
    caplog.set_level(logging.INFO, logger="mia_gen.neighbours")
    return caplog


def test_default_backend_is_torch_and_logged_once_with_why(fresh_log, data):
    queries, database = data
    ref = nearest_neighbours(queries, database, 2, backend="torch")
    fresh_log.clear()
    for _ in range(2):
        got = nearest_neighbours(queries, database, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert fresh_log.records == [], "torch was already logged in this process"
    neighbours._LOGGED_BACKENDS.clear()
    nearest_neighbours(queries, database, 2)
    nearest_neighbours(queries, database, 1, backend="auto")
    lines = [r.getMessage() for r in fresh_log.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("nearest neighbours: torch (default; faiss is opt-in (backend='faiss')")
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in lines[0]


def test_log_names_a_slow_faiss_blas(fresh_log, monkeypatch, data):
    """The Xeon of the issue: faiss-cpu's OpenBLAS detected it as Prescott, numpy's as SkylakeX."""
    blas = [
        {"internal_api": "openblas", "version": "0.3.15", "architecture": "Prescott", "num_threads": 2,
         "filepath": "/venv/site-packages/faiss_cpu.libs/libopenblas.so", "user_api": "blas"},
        {"internal_api": "openblas", "version": "0.3.31", "architecture": "SkylakeX", "num_threads": 2,
         "filepath": "/venv/site-packages/numpy.libs/libscipy_openblas64_.so", "user_api": "blas"},
    ]
    monkeypatch.setattr(neighbours, "_blas_libraries", lambda: blas)
    queries, database = data
    nearest_neighbours(queries, database)
    (line,) = [r.getMessage() for r in fresh_log.records]
    assert "torch (default; faiss is opt-in (backend='faiss'): its bundled BLAS detected this CPU as Prescott)" in line
    assert "core type Prescott" in line and "core type SkylakeX" in line and "numpy.libs" in line
    if available("faiss"):
        fresh_log.clear()
        nearest_neighbours(queries, database, backend="faiss")
        warning = [r for r in fresh_log.records if r.levelno == logging.WARNING]
        assert len(warning) == 1 and "detected this CPU as Prescott (no AVX)" in warning[0].getMessage()


def test_faiss_is_opt_in_and_missing_says_how_to_install(monkeypatch, data):
    queries, database = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(MissingExtraError, match=r'backend=faiss.*pip install "mia-gen\[faiss\]"'):
        nearest_neighbours(queries, database, backend="faiss")
    d, i = nearest_neighbours(queries, database, 3)  # the default needs no faiss
    ref_d, ref_i = brute_force_knn(queries, database, 3)
    np.testing.assert_array_equal(i.numpy(), ref_i)
