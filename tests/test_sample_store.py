"""Sample store: resumable sharded writes equal an uninterrupted run; reads cover all samples."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mia_gen.errors import CorruptStoreError, MiaGenError
from mia_gen.sample_store import SampleStore, shard_seed, write_samples

SHAPE = (1, 4, 4)
LATENT_DIM = 3


def image_sample_fn(n, generator):
    """A stand-in generator: z ~ N(0, 1) from the shard's generator, x = tanh of a fixed map of z."""
    z = torch.randn(n, LATENT_DIM, generator=generator)
    weight = torch.linspace(-2, 2, LATENT_DIM * 16).reshape(LATENT_DIM, 16)
    x = torch.tanh(z @ weight).reshape(n, *SHAPE)
    return x, z


class KilledAfter:
    """Wraps a sample_fn and raises after `n_calls` shards, like a job killed mid-run."""

    def __init__(self, n_calls):
        self.n_calls = n_calls

    def __call__(self, n, generator):
        if self.n_calls == 0:
            raise KeyboardInterrupt("simulated kill")
        self.n_calls -= 1
        return image_sample_fn(n, generator)


def store_files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


WRITE = dict(n_samples=25, shard_size=10, seed=3, progress=False)


@pytest.fixture
def reference(tmp_path):
    write_samples(tmp_path / "ref", image_sample_fn, **WRITE)
    return store_files(tmp_path / "ref")


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, reference):
    path = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_samples(path, KilledAfter(2), **WRITE)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 2

    calls = []

    def counting_fn(n, generator):
        calls.append(n)
        return image_sample_fn(n, generator)

    write_samples(path, counting_fn, **WRITE)
    assert calls == [5]  # only the missing last shard was drawn
    assert store_files(path) == reference


def test_truncated_shard_is_detected_and_rewritten(tmp_path, reference):
    path = tmp_path / "damaged"
    write_samples(path, image_sample_fn, **WRITE)
    shard = path / "shard_00001.samples.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CorruptStoreError, match="shard 1.*mia-gen-sample"):
        SampleStore.open(path)
    write_samples(path, image_sample_fn, **WRITE)
    assert store_files(path) == reference


def test_damaged_bytes_fail_verify_and_are_rewritten(tmp_path, reference):
    path = tmp_path / "flipped"
    write_samples(path, image_sample_fn, **WRITE)
    shard = path / "shard_00002.latents.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="shard 2.*sha256"):
        SampleStore.open(path)  # same size: only the hash sees it, when the store is opened
    write_samples(path, image_sample_fn, **WRITE)
    SampleStore.open(path).verify()
    assert store_files(path) == reference


def test_incomplete_store_never_opens(tmp_path):
    path = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        write_samples(path, KilledAfter(1), **WRITE)
    with pytest.raises(CorruptStoreError, match="incomplete: 1 of 3 shards.*mia-gen-sample"):
        SampleStore.open(path)
    with pytest.raises(CorruptStoreError, match="manifest.json is missing"):
        SampleStore.open(tmp_path / "nothing")


def test_different_settings_are_refused(tmp_path):
    path = tmp_path / "store"
    write_samples(path, image_sample_fn, metadata={"model": "dcgan"}, **WRITE)
    for change in (dict(seed=4), dict(n_samples=26), dict(storage_dtype="float16")):
        with pytest.raises(MiaGenError, match="different settings.*new path.*delete"):
            write_samples(path, image_sample_fn, metadata={"model": "dcgan"}, **{**WRITE, **change})
    with pytest.raises(MiaGenError, match="metadata_hash"):
        write_samples(path, image_sample_fn, metadata={"model": "ddpm"}, **WRITE)


def test_shape_change_on_resume_is_refused(tmp_path):
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        write_samples(path, KilledAfter(1), **WRITE)

    def other_shape(n, generator):
        return torch.zeros(n, 1, 2, 2), None

    with pytest.raises(MiaGenError, match="sample shape.*new path"):
        write_samples(path, other_shape, **WRITE)


def test_uint8_roundtrip_and_reads(tmp_path):
    store = write_samples(tmp_path / "s", image_sample_fn, **WRITE)
    expected = []
    for index in range(3):
        generator = torch.Generator().manual_seed(shard_seed(3, index))
        expected.append(image_sample_fn(min(10, 25 - 10 * index), generator))
    x_ref = torch.cat([x for x, _ in expected])
    z_ref = torch.cat([z for _, z in expected])

    assert len(store) == 25 and store.sample_shape == SHAPE and store.latent_dim == LATENT_DIM
    x_all = store.get(np.arange(25))
    assert x_all.dtype == torch.float32
    assert (x_all - x_ref).abs().max() <= 1 / 127.5
    assert torch.equal(store.get_latents(range(25)), z_ref)

    # chunks cover everything in order, across shard boundaries (chunk 7 vs shard 10)
    starts, xs, zs = [], [], []
    for start, x, z in store.iter_chunks(chunk_size=7, with_latents=True):
        starts.append(start)
        xs.append(x)
        zs.append(z)
    assert starts == [0, 7, 14, 21]
    assert torch.equal(torch.cat(xs), x_all)
    assert torch.equal(torch.cat(zs), z_ref)

    picked = [24, 0, 13, 13, -1]
    assert torch.equal(store.get(picked), x_all[[24, 0, 13, 13, 24]])
    with pytest.raises(MiaGenError, match="out of range"):
        store.get([25])


def test_float_storage_and_no_latents(tmp_path):
    def tabular(n, generator):
        return 10 * torch.randn(n, 6, generator=generator), None

    store = write_samples(tmp_path / "t", tabular, 12, shard_size=5, storage_dtype="float32", progress=False)
    assert store.latent_dim is None and store.sample_shape == (6,)
    generator = torch.Generator()
    rows = []
    for index, count in enumerate((5, 5, 2)):
        generator.manual_seed(shard_seed(0, index))
        rows.append(tabular(count, generator)[0])
    assert torch.equal(store.get(range(12)), torch.cat(rows))
    with pytest.raises(MiaGenError, match="no latents"):
        store.get_latents([0])
    with pytest.raises(MiaGenError, match="no latents"):
        next(store.iter_chunks(with_latents=True))

    half = write_samples(tmp_path / "h", tabular, 12, shard_size=5, storage_dtype="float16", progress=False)
    assert torch.allclose(half.get(range(12)), torch.cat(rows), rtol=1e-3, atol=1e-3)


def test_bad_input_errors_say_what_to_do(tmp_path):
    def tabular(n, generator):
        return 10 * torch.randn(n, 6, generator=generator), None

    with pytest.raises(MiaGenError, match="uint8.*images in \\[-1, 1\\].*float32"):
        write_samples(tmp_path / "a", tabular, 4, progress=False)
    with pytest.raises(MiaGenError, match="storage_dtype='int8'.*use 'uint8'"):
        write_samples(tmp_path / "b", tabular, 4, storage_dtype="int8", progress=False)
    with pytest.raises(MiaGenError, match="n_samples must be a positive integer"):
        write_samples(tmp_path / "c", tabular, 0, progress=False)

    def wrong_count(n, generator):
        return torch.zeros(n + 1, 2), None

    with pytest.raises(MiaGenError, match="shape \\(n, ...\\)"):
        write_samples(tmp_path / "d", wrong_count, 4, storage_dtype="float32", progress=False)

    def diverged(n, generator):
        return torch.full((n, 2), float("nan")), None

    with pytest.raises(MiaGenError, match="non-finite"):
        write_samples(tmp_path / "e", diverged, 4, storage_dtype="float32", progress=False)


def test_rerun_on_complete_store_draws_nothing(tmp_path, reference):
    path = tmp_path / "done"
    write_samples(path, image_sample_fn, **WRITE)

    def must_not_sample(n, generator):
        raise AssertionError("a complete, intact store was resampled")

    store = write_samples(path, must_not_sample, **WRITE)
    assert len(store) == 25 and store_files(path) == reference


def test_import_samples_round_trips_and_repairs_a_damaged_shard(tmp_path):
    from mia_gen.sample_store import import_samples

    rows = torch.randn(2500, 7)
    store = import_samples(tmp_path / "s", rows, shard_size=1000, storage_dtype="float32", progress=False)
    assert torch.equal(store.get(np.arange(2500)), rows) and store.latent_dim is None
    middle = tmp_path / "s" / "shard_00001.samples.npy"
    middle.write_bytes(middle.read_bytes()[:100])  # a crash left it truncated
    repaired = import_samples(tmp_path / "s", rows, shard_size=1000, storage_dtype="float32", progress=False)
    assert torch.equal(repaired.get(np.arange(2500)), rows)  # rows land in their own shard again


def overwrite_keeping_size_and_mtime(file):
    """Flip one byte in place and put the old mtime back: only a hash can tell."""
    status = file.stat()
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(status.st_atime_ns, status.st_mtime_ns))


def test_each_process_hashes_a_store_on_first_open_and_verify_rehashes(tmp_path, monkeypatch):
    from mia_gen import checksums

    path = tmp_path / "s"
    write_samples(path, image_sample_fn, **WRITE)
    monkeypatch.setattr(checksums, "_hashed", {})  # as in a new process
    hashed = []
    real_sha256 = checksums.file_sha256
    monkeypatch.setattr(checksums, "file_sha256", lambda file: hashed.append(file.name) or real_sha256(file))
    SampleStore.open(path)
    assert sorted(hashed) == sorted(p.name for p in path.glob("shard_*.npy"))  # 3 shards, samples + latents
    SampleStore.open(path)
    assert len(hashed) == 6  # size and mtime unchanged: not hashed again in this process
    SampleStore.open(path).verify()
    assert len(hashed) == 12  # verify() re-hashes on demand

    # Damage that keeps size and mtime passes the cheap check in this process, but not verify() ...
    overwrite_keeping_size_and_mtime(path / "shard_00001.samples.npy")
    with pytest.raises(CorruptStoreError, match=f"shard 1 file shard_00001.samples.npy .*sha256.*Delete {path}"):
        SampleStore.open(path).verify()
    # ... nor the first open of the next process.
    monkeypatch.setattr(checksums, "_hashed", {})
    with pytest.raises(CorruptStoreError, match=f"shard 1 .*must not be read. Delete {path}"):
        SampleStore.open(path)
