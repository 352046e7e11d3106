"""The shadow zoo's IN/OUT matrix (mia_gen/zoo.py): balanced, seeded, saved and validated as data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mia_gen.datasets import RecordSet
from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.zoo import ZooMembership, draw_zoo


@pytest.fixture
def records() -> RecordSet:
    return RecordSet.from_tensor("toy", "tabular", torch.randn(300, 2, generator=torch.Generator().manual_seed(0)))


@pytest.fixture
def population() -> np.ndarray:
    return np.random.default_rng(5).permutation(300)[:200]


@pytest.mark.parametrize("k", [2, 4, 16])
def test_even_zoo_puts_every_record_in_exactly_half_the_shadows(records, population, k):
    zoo = draw_zoo(records, population, n_shadows=k, seed=3)
    assert zoo.membership.shape == (k, 200) and zoo.membership.dtype == bool
    assert (zoo.membership.sum(axis=0) == k // 2).all()
    sizes = zoo.membership.sum(axis=1)  # each shadow trains on about half the population
    assert (abs(sizes - 100) < 40).all() and sizes.sum() == 100 * k
    assert np.array_equal(zoo.record_ids, population)
    assert np.array_equal(np.sort(zoo.training_records(0)), np.sort(population[zoo.membership[0]]))


def test_odd_zoo_puts_every_record_in_about_half_the_shadows(records, population):
    counts = draw_zoo(records, population, n_shadows=5, seed=0).membership.sum(axis=0)
    assert set(counts.tolist()) == {2, 3}
    assert 60 < (counts == 3).sum() < 140  # a fair coin per record


def test_each_record_has_its_own_random_shadows(records, population):
    """Columns are drawn independently: no two records share one IN set more than chance allows, and
    every shadow gets both IN and OUT records."""
    membership = draw_zoo(records, population, n_shadows=8, seed=1).membership
    patterns = {row.tobytes() for row in membership.T}
    assert len(patterns) > 50  # C(8, 4) = 70 possible IN sets
    together = (membership[0] & membership[1]).mean()  # P(IN both) = 4/8 * 3/7 = 0.214
    assert abs(together - 3 / 14) < 0.08


def test_the_seed_fixes_the_matrix(records, population):
    first = draw_zoo(records, population, n_shadows=6, seed=11)
    assert first == draw_zoo(records, population, n_shadows=6, seed=11)
    assert not np.array_equal(first.membership, draw_zoo(records, population, n_shadows=6, seed=12).membership)


def test_save_load_roundtrip(records, population, tmp_path):
    zoo = draw_zoo(records, population, n_shadows=4, seed=2)
    path = tmp_path / "zoos" / "zoo.json"
    zoo.save(path)
    loaded = ZooMembership.load(path, records)
    assert loaded == zoo
    assert np.array_equal(loaded.membership, zoo.membership) and np.array_equal(loaded.record_ids, population)
    content = json.loads(path.read_text())
    assert content["membership"][0] == "".join("1" if v else "0" for v in zoo.membership[0])
    assert len(content["sha256"]) == 64


def test_a_zoo_for_other_data_is_refused(records, population, tmp_path):
    other = RecordSet.from_tensor("toy", "tabular", torch.randn(300, 2, generator=torch.Generator().manual_seed(9)))
    path = tmp_path / "zoo.json"
    draw_zoo(records, population, n_shadows=4, seed=2).save(path)
    with pytest.raises(MiaGenError, match="the data differ"):
        ZooMembership.load(path, other)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["membership"].__setitem__(0, "1" + c["membership"][0][1:]
                                            if c["membership"][0][0] == "0" else "0" + c["membership"][0][1:]),
     "sha256 checksum"),
    (lambda c: c["record_ids"].__setitem__(0, c["record_ids"][1]), "sha256 checksum"),
    (lambda c: c.__setitem__("seed", 3), "sha256 checksum"),
    (lambda c: c.__setitem__("sha256", "0" * 64), "sha256 checksum"),
    (lambda c: c.pop("sha256"), "lacks the key"),
    (lambda c: c.__setitem__("format_version", 99), "format_version=99"),
])
def test_a_corrupted_zoo_file_is_refused(records, population, tmp_path, edit, message):
    path = tmp_path / "zoo.json"
    draw_zoo(records, population, n_shadows=4, seed=2).save(path)
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    with pytest.raises(MiaGenError, match=message):
        ZooMembership.load(path, records)


def _resealed(content: dict) -> dict:
    """The content with a recomputed checksum: an edit made by someone who re-sealed the file."""
    from mia_gen.zoo import _checksum

    body = {key: value for key, value in content.items() if key != "sha256"}
    return {**body, "sha256": _checksum(body)}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["membership"].__setitem__(1, c["membership"][1][:-1]), "each 200 long"),
    (lambda c: c["membership"].__setitem__(1, "2" * 200), "strings of '0'/'1'"),
    (lambda c: c["record_ids"].__setitem__(0, c["record_ids"][1]), "more than once"),
    (lambda c: c["record_ids"].__setitem__(0, 300), r"outside \[0, 300\)"),
])
def test_a_malformed_zoo_is_refused_even_with_a_valid_checksum(records, population, tmp_path, edit, message):
    path = tmp_path / "zoo.json"
    draw_zoo(records, population, n_shadows=4, seed=2).save(path)
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(_resealed(content)))
    with pytest.raises(MiaGenError, match=message):
        ZooMembership.load(path, records)


def test_missing_or_unreadable_files_and_bad_arguments(records, population, tmp_path):
    with pytest.raises(MissingAssetError, match="does not exist"):
        ZooMembership.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MiaGenError, match="not valid JSON"):
        ZooMembership.load(tmp_path / "bad.json")
    with pytest.raises(MiaGenError, match="n_shadows >= 2"):
        draw_zoo(records, population, n_shadows=1)
    with pytest.raises(MiaGenError, match="integer record ids"):
        draw_zoo(records, population.astype(float), n_shadows=4)
    with pytest.raises(MiaGenError, match="more than once"):
        draw_zoo(records, np.array([1, 2, 2]), n_shadows=4)
