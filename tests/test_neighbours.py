"""Streaming exact kNN against a brute-force numpy loop, over every database kind and backend."""

import numpy as np
import pytest
import torch

from mia_gen.errors import MiaGenError
from mia_gen.neighbours import nearest_neighbours, pairwise_sq_distances_chunks
from mia_gen.sample_store import write_samples


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


@pytest.mark.parametrize("backend", ["faiss", "torch"])
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


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 5])
def test_matches_brute_force_on_sample_store(tmp_path, data, backend, k):
    queries, database = data

    def replay(n, generator):  # the store's shards are fixed rows of `database`
        start = replay.start
        replay.start += n
        return database[start : start + n], None

    replay.start = 0
    store = write_samples(tmp_path / "s", replay, len(database), shard_size=40, storage_dtype="float32", progress=False)
    ref_d, ref_i = brute_force_knn(queries, database, k)
    d, i = nearest_neighbours(queries, store, k, backend=backend, chunk_size=7)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)


def test_iterable_database_and_feature_fn(data):
    queries, database = data
    chunks = [(s, database[s : s + 25]) for s in range(0, len(database), 25)]

    def first_channel(x):
        return x[:, 0].reshape(len(x), -1) * 3.0

    ref_d, ref_i = brute_force_knn(first_channel(queries), first_channel(database), 5)
    for backend in ("faiss", "torch"):
        d, i = nearest_neighbours(queries, iter(chunks), 5, backend=backend, feature_fn=first_channel)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
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
    if not torch.cuda.is_available():
        with pytest.raises(MiaGenError, match="device=cpu"):
            nearest_neighbours(queries, database, device="cuda")
