"""Membership splits: drawn against a plain numpy permutation, validated, saved, imported."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mia_gen.datasets import RecordSet
from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.splits import (Split, import_secmi_split, load_or_make_split, make_split, membership_source,
                            read_record_ids, split_from_members)

SPLIT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "split" / "default.yaml"


@pytest.fixture(scope="module")
def records() -> RecordSet:
    return RecordSet.from_tensor("toy", "tabular", torch.randn(100, 2, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def other_records() -> RecordSet:
    return RecordSet.from_tensor("toy", "tabular", torch.randn(100, 2, generator=torch.Generator().manual_seed(1)))


def make(records, members, non_members, reference=()):
    return Split("toy", records.fingerprint, 0, np.array(members), np.array(non_members), np.array(reference), 100)


def test_make_split_is_the_seeded_permutation_cut_in_three(records):
    split = make_split(records, n_members=10, n_non_members=20, n_reference=30, seed=7)
    order = np.random.default_rng(7).permutation(100)
    np.testing.assert_array_equal(split.members, order[:10])
    np.testing.assert_array_equal(split.non_members, order[10:30])
    np.testing.assert_array_equal(split.reference, order[30:60])
    assert split.members.dtype == np.int64
    assert (split.dataset, split.fingerprint, split.seed, split.n_records) == ("toy", records.fingerprint, 7, 100)
    every = np.concatenate([split.members, split.non_members, split.reference])
    assert len(set(every.tolist())) == 60 and every.min() >= 0 and every.max() < 100


def test_make_split_determinism_and_seed(records):
    assert make_split(records, 10, 10, 10, seed=3) == make_split(records, 10, 10, 10, seed=3)
    assert make_split(records, 10, 10, 10, seed=3) != make_split(records, 10, 10, 10, seed=4)
    # members do not move when only the reference size changes
    np.testing.assert_array_equal(make_split(records, 10, 10, 0, 3).members, make_split(records, 10, 10, 80, 3).members)


def test_make_split_all_remaining_reference(records):
    split = make_split(records, 10, 15, n_reference=-1, seed=0)
    assert len(split.reference) == 75
    assert sorted(np.concatenate([split.members, split.non_members, split.reference]).tolist()) == list(range(100))


def test_make_split_asking_for_too_many(records):
    with pytest.raises(MiaGenError, match=r"64 members \+ 64 non-members \+ 0 reference records = 128.*only 100"):
        make_split(records, 64, 64, 0, seed=0)
    with pytest.raises(MiaGenError, match="n_members must be >= 1"):
        make_split(records, 0, 10, 0, seed=0)
    with pytest.raises(MiaGenError, match="must be an integer"):
        make_split(records, 10.0, 10, 0, seed=0)


def test_validate_detects_overlap_duplicates_and_range(records):
    make(records, [1, 2], [3, 4], [5]).validate(records)
    with pytest.raises(MiaGenError, match=r"members and non_members share 1 record\(s\), e.g. \[2\]"):
        make(records, [1, 2], [2, 4], [5]).validate()
    with pytest.raises(MiaGenError, match=r"non_members and reference share .* \[4\]"):
        make(records, [1], [3, 4], [4, 9]).validate()
    with pytest.raises(MiaGenError, match=r"reference lists 1 index\(es\) more than once, e.g. \[7\]"):
        make(records, [1], [3], [7, 8, 7]).validate()
    with pytest.raises(MiaGenError, match=r"outside \[0, 100\), e.g. \[100, -1\]"):
        make(records, [100, -1, 5], [3], []).validate()
    with pytest.raises(MiaGenError, match="integer record indices"):
        make(records, [1.0, 2.0], [3], [])


def test_validate_detects_another_dataset(records, other_records):
    split = make_split(records, 5, 5, 5, seed=0)
    split.validate(records)
    with pytest.raises(MiaGenError, match="the data differ.*draw a new split"):
        split.validate(other_records)
    shorter = RecordSet.from_tensor("toy", "tabular", records.data[:90].clone())
    with pytest.raises(MiaGenError, match="has 90 records"):
        split.validate(shorter)


def test_save_load_roundtrip(records, other_records, tmp_path):
    split = make_split(records, 5, 6, 7, seed=11)
    path = tmp_path / "sub" / "split.json"
    split.save(path)
    content = json.loads(path.read_text())
    assert content["format_version"] == 1 and content["members"] == split.members.tolist()
    assert set(content) == {"format_version", "dataset", "fingerprint", "seed", "n_records",
                            "members", "non_members", "reference"}
    assert Split.load(path, records) == split
    assert Split.load(path) == split
    with pytest.raises(MiaGenError, match="fingerprint"):
        Split.load(path, other_records)

    content["non_members"][0] = content["members"][0]
    path.write_text(json.dumps(content))
    with pytest.raises(MiaGenError, match=f"share 1 record.*{content['members'][0]}"):
        Split.load(path)
    content["format_version"] = 9
    path.write_text(json.dumps(content))
    with pytest.raises(MiaGenError, match="format_version=9"):
        Split.load(path)
    path.write_text("{not json")
    with pytest.raises(MiaGenError, match="not valid JSON"):
        Split.load(path)
    with pytest.raises(MissingAssetError, match="split.path=null"):
        Split.load(tmp_path / "absent.json")


def test_import_secmi_split(records, tmp_path):
    path = tmp_path / "CIFAR10_train_ratio0.5.npz"
    np.savez(path, mia_train_idxs=np.array([4, 0, 9]), mia_eval_idxs=np.array([1, 7]), ratio=np.array(0.5))
    split = import_secmi_split(path, records, reference="rest", seed=2)
    np.testing.assert_array_equal(split.members, [4, 0, 9])
    np.testing.assert_array_equal(split.non_members, [1, 7])
    assert sorted(split.reference.tolist()) == sorted(set(range(100)) - {0, 1, 4, 7, 9})
    order = np.random.default_rng(2).permutation(100)
    np.testing.assert_array_equal(split.reference, [i for i in order if i not in {0, 1, 4, 7, 9}])
    assert len(import_secmi_split(path, records, reference="none").reference) == 0

    np.savez(tmp_path / "keys.npz", train=np.array([0]), test=np.array([1]))
    with pytest.raises(MiaGenError, match=r"keys \['test', 'train'\].*mia_train_idxs"):
        import_secmi_split(tmp_path / "keys.npz", records)
    np.savez(tmp_path / "overlap.npz", mia_train_idxs=np.array([0, 1]), mia_eval_idxs=np.array([1, 2]))
    with pytest.raises(MiaGenError, match=r"share 1 record.*\[1\]"):
        import_secmi_split(tmp_path / "overlap.npz", records)
    np.savez(tmp_path / "big.npz", mia_train_idxs=np.array([0, 25000]), mia_eval_idxs=np.array([1]))
    with pytest.raises(MiaGenError, match=r"\[25000\]"):
        import_secmi_split(tmp_path / "big.npz", records)
    with pytest.raises(MissingAssetError, match="split.secmi_npz"):
        import_secmi_split(tmp_path / "absent.npz", records)


def test_load_or_make_split_follows_the_config(records, tmp_path):
    root = OmegaConf.create({"seed": 5, "split": OmegaConf.load(SPLIT_CONFIG)})
    root.split.n_members, root.split.n_non_members, root.split.n_reference = 8, 8, -1
    drawn = load_or_make_split(root.split, records)
    assert drawn == make_split(records, 8, 8, -1, seed=5)

    drawn.save(tmp_path / "s.json")
    root.split.path = str(tmp_path / "s.json")
    root.split.n_members = 50  # ignored: the file decides
    assert load_or_make_split(root.split, records) == drawn

    np.savez(tmp_path / "secmi.npz", mia_train_idxs=np.array([0, 1]), mia_eval_idxs=np.array([2]))
    root.split.secmi_npz = str(tmp_path / "secmi.npz")
    with pytest.raises(MiaGenError, match="set all but one of them to null"):
        load_or_make_split(root.split, records)
    root.split.path = None
    assert load_or_make_split(root.split, records).members.tolist() == [0, 1]

    with pytest.raises(MiaGenError, match="split.seed=<int>"):
        load_or_make_split(OmegaConf.load(SPLIT_CONFIG), records)


def test_a_members_file_gives_the_members_and_the_rest_is_drawn_around_them(records, tmp_path):
    members = np.array([42, 3, 77, 10])
    (tmp_path / "m.txt").write_text("# training records\n42\n3\n\n77  # a comment\n10\n")
    (tmp_path / "m.json").write_text(json.dumps(members.tolist()))
    np.save(tmp_path / "m.npy", members)
    for name in ("m.txt", "m.json", "m.npy"):
        np.testing.assert_array_equal(read_record_ids(tmp_path / name), members)

    split = split_from_members(records, members, n_non_members=20, n_reference=-1, seed=3)
    rest = [i for i in np.random.default_rng(3).permutation(100) if i not in members]  # plain reference
    np.testing.assert_array_equal(split.members, members)
    np.testing.assert_array_equal(split.non_members, rest[:20])
    np.testing.assert_array_equal(split.reference, rest[20:])
    assert len(split.reference) == 76  # disjoint, and together every record

    root = OmegaConf.create({"seed": 3, "split": OmegaConf.load(SPLIT_CONFIG)})
    root.split.members_file, root.split.n_non_members, root.split.n_reference = str(tmp_path / "m.txt"), 20, -1
    root.split.n_members = 50  # ignored: the file decides
    assert membership_source(root.split) == "members_file"
    assert load_or_make_split(root.split, records) == split
    root.split.path = str(tmp_path / "s.json")
    with pytest.raises(MiaGenError, match="split.path=.*split.members_file=.*all but one"):
        membership_source(root.split)
    assert membership_source(OmegaConf.create({"seed": 0, "split": OmegaConf.load(SPLIT_CONFIG)}).split) is None


def test_a_bad_members_file_is_explained(records, tmp_path):
    (tmp_path / "bad.txt").write_text("1\n2.5\n")
    with pytest.raises(MiaGenError, match="line 2: '2.5' is not an integer record id"):
        read_record_ids(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text('{"members": [1]}')
    with pytest.raises(MiaGenError, match="JSON list"):
        read_record_ids(tmp_path / "bad.json")
    with pytest.raises(MissingAssetError, match="split.members_file"):
        read_record_ids(tmp_path / "absent.txt")
    with pytest.raises(MiaGenError, match=r"outside \[0, 100\)"):
        split_from_members(records, np.array([5, 100]), n_non_members=10)
    with pytest.raises(MiaGenError, match="only 100 records"):
        split_from_members(records, np.array([5]), n_non_members=100)
    with pytest.raises(MiaGenError, match="no record ids"):
        split_from_members(records, np.array([], dtype=int), n_non_members=10)
