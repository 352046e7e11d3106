"""Dataset loaders against hand-computed / PIL references, on tiny files written by the tests."""

import os
import re
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mia_gen.datasets import RecordSet, load_dataset
from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.hashing import array_fingerprint

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def pil_resize(image_chw: np.ndarray, size: int) -> np.ndarray:
    """Reference resize: PIL bilinear (antialiased) of a uint8 (C, H, W) image, per channel."""
    return np.stack(
        [np.asarray(Image.fromarray(channel).resize((size, size), Image.BILINEAR)) for channel in image_chw]
    )


@pytest.fixture(scope="module")
def digits() -> RecordSet:
    return load_dataset({"name": "digits"})


# --- digits -------------------------------------------------------------------------------


def test_digits_shape_range_and_fingerprint(digits):
    assert digits.kind == "image" and len(digits) == 1797
    assert digits.data.dtype == torch.uint8 and digits.record_shape == (1, 16, 16)
    batch = digits.get(np.arange(len(digits)))
    assert batch.dtype == torch.float32 and batch.shape == (1797, 1, 16, 16)
    assert batch.min().item() == -1.0 and batch.max().item() == 1.0
    torch.testing.assert_close(batch, digits.data.float() / 127.5 - 1.0)
    assert digits.fingerprint == array_fingerprint(digits.data.numpy(), "image")
    assert digits.info() == {
        "name": "digits",
        "kind": "image",
        "n_records": 1797,
        "record_shape": [1, 16, 16],
        "fingerprint": digits.fingerprint,
    }


def test_digits_native_resolution_is_the_hand_scaled_sklearn_data():
    from sklearn.datasets import load_digits

    expected = np.rint(load_digits().images * 255.0 / 16.0).astype(np.uint8)
    for resolution in (8, None):  # null keeps the native size
        records = load_dataset({"name": "digits", "resolution": resolution})
        np.testing.assert_array_equal(records.data[:, 0].numpy(), expected)


def test_digits_resize_matches_pil_bilinear(digits):
    native = load_dataset({"name": "digits", "resolution": 8}).data.numpy()
    for index in (0, 1, 500, 1796):
        reference = pil_resize(native[index], 16).astype(int)
        assert np.abs(digits.data[index].numpy().astype(int) - reference).max() <= 1


def test_digits_is_deterministic_and_fingerprint_follows_content(digits):
    again = load_dataset(OmegaConf.create({"name": "digits", "resolution": 16, "channels": 1}))
    assert torch.equal(again.data, digits.data) and again.fingerprint == digits.fingerprint
    changed = digits.data.clone()
    changed[3, 0, 5, 5] ^= 1
    assert RecordSet.from_tensor("digits", "image", changed).fingerprint != digits.fingerprint
    smaller = load_dataset({"name": "digits", "resolution": 8})
    assert smaller.fingerprint != digits.fingerprint


def test_digits_rgb_and_max_records(digits):
    rgb = load_dataset({"name": "digits", "channels": 3, "max_records": 10})
    assert rgb.record_shape == (3, 16, 16) and len(rgb) == 10
    for channel in range(3):
        assert torch.equal(rgb.data[:, channel], digits.data[:10, 0])


def test_digits_carry_sklearns_labels_which_do_not_change_the_fingerprint(digits):
    from sklearn.datasets import load_digits

    assert digits.labels.tolist() == load_digits().target.tolist()
    assert load_dataset({"name": "digits", "max_records": 7}).labels.tolist() == load_digits().target[:7].tolist()
    unlabelled = RecordSet.from_tensor("digits", "image", digits.data)
    assert unlabelled.labels is None and unlabelled.fingerprint == digits.fingerprint
    with pytest.raises(MiaGenError, match="one per record"):
        RecordSet.from_tensor("digits", "image", digits.data, labels=np.zeros(3))


def test_get_checks_indices(digits):
    torch.testing.assert_close(digits.get([5, 5, 2]), digits.data[[5, 5, 2]].float() / 127.5 - 1)
    with pytest.raises(MiaGenError, match=r"\[1797\].*outside"):
        digits.get([0, 1797])
    with pytest.raises(MiaGenError, match="integer indices"):
        digits.get(np.array([0.0, 1.0]))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "mnsit"}, "choose one of"),
        ({"name": "digits", "resoluton": 8}, "check the spelling"),
        ({"name": "digits", "subset": "test"}, "no effect for data.name=digits"),
        ({"name": "digits", "channels": 2}, "1 .grayscale. or 3"),
        ({"name": "digits", "resolution": 0}, "positive integer"),
        ({"name": "mnist", "subset": "valid"}, "subset must be one of"),
    ],
)
def test_config_errors_say_what_to_do(cfg, message):
    with pytest.raises(MiaGenError, match=message):
        load_dataset(cfg)


def test_recordset_rejects_wrong_storage():
    with pytest.raises(MiaGenError, match="uint8"):
        RecordSet.from_tensor("x", "image", torch.zeros(2, 1, 4, 4))
    with pytest.raises(MiaGenError, match="float32"):
        RecordSet.from_tensor("x", "tabular", torch.zeros(2, 3, dtype=torch.float64))


# --- MNIST / Fashion-MNIST in torchvision's raw idx format -----------------------------------


def write_idx(folder: Path, prefix: str, images: np.ndarray) -> None:
    """torchvision's unzipped MNIST files: big-endian header (magic, sizes) then uint8 bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, rows, cols) + images.tobytes())
    labels = (np.arange(n) % 10).astype(np.uint8)
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + labels.tobytes())


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    for folder in ("MNIST", "FashionMNIST"):
        write_idx(root / folder / "raw", "train", train)
        write_idx(root / folder / "raw", "t10k", test)
    return root, train, test


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_loader_reads_idx_files(mnist_root, name):
    root, train, test = mnist_root
    base = {"name": name, "root": str(root), "resolution": 28, "channels": 1}
    np.testing.assert_array_equal(load_dataset(base).data[:, 0].numpy(), train)
    np.testing.assert_array_equal(load_dataset({**base, "subset": "test"}).data[:, 0].numpy(), test)
    both = load_dataset({**base, "subset": "all", "max_records": 6}).data[:, 0].numpy()
    np.testing.assert_array_equal(both, np.concatenate([train, test[:1]]))


def test_mnist_resize_and_rgb_match_pil(mnist_root):
    root, train, _ = mnist_root
    records = load_dataset({"name": "mnist", "root": str(root), "resolution": 32, "channels": 3})
    assert records.record_shape == (3, 32, 32)
    for index in range(len(train)):
        reference = pil_resize(train[index][None], 32)[0].astype(int)
        for channel in range(3):
            assert np.abs(records.data[index, channel].numpy().astype(int) - reference).max() <= 1


def test_mnist_missing_files_explain_both_fixes(tmp_path):
    with pytest.raises(MissingAssetError) as caught:
        load_dataset({"name": "mnist", "root": str(tmp_path), "resolution": 32})
    message = str(caught.value)
    assert "'mnist'" in message and "MNIST/raw/" in message
    assert "data.root=<dir>" in message and "data.download=true" in message
    assert isinstance(caught.value, FileNotFoundError)


# --- CIFAR-10 in torchvision's python-pickle batches ------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Fake cifar-10-batches-py: 2 images per batch (the pickle is written here, read by torchvision)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        entry = {"data": batches[name].reshape(2, 3072), "labels": [0, 1]}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    return root, train, batches["test_batch"]


def test_cifar10_files_with_wrong_md5_are_refused_with_the_fixes(cifar_root):
    # torchvision verifies the md5 sum of every batch even with download=False, so fake files
    # fail its integrity check: that is the error a user with corrupted files sees.
    root, _, _ = cifar_root
    with pytest.raises(MissingAssetError, match=r"cifar-10-batches-py.*data\.root=<dir>.*data\.download=true"):
        load_dataset({"name": "cifar10", "root": str(root)})


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(MissingAssetError, match="missing or corrupted and data.download=false"):
        load_dataset({"name": "cifar10", "root": str(tmp_path / "nowhere")})


def test_cifar10_conversion_with_md5_check_bypassed(cifar_root, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    root, train, test = cifar_root
    records = load_dataset({"name": "cifar10", "root": str(root), "resolution": 32, "channels": 3})
    np.testing.assert_array_equal(records.data.numpy(), train)
    records = load_dataset({"name": "cifar10", "root": str(root), "subset": "test", "channels": 1})
    for index in range(len(test)):
        reference = np.asarray(Image.fromarray(test[index].transpose(1, 2, 0)).convert("L")).astype(int)
        assert np.abs(records.data[index, 0].numpy().astype(int) - reference).max() <= 1


# --- CelebA (aligned faces + the .txt lists torchvision reads) --------------------------------------


def test_celeba_centre_crop_then_resize(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as celeba

    monkeypatch.setattr(celeba, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(6)
    faces, names = [], [f"00000{i}.jpg" for i in range(1, 4)]
    for name in names:  # PNG bytes under CelebA's .jpg names: lossless, PIL reads by content
        faces.append(rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8))
        Image.fromarray(faces[-1]).save(folder / "img_align_celeba" / name, format="PNG")
    rows = "\n".join(f"{name} {value}" for name, value in zip(names, (0, 2, 0)))
    (folder / "list_eval_partition.txt").write_text(rows + "\n")
    (folder / "identity_CelebA.txt").write_text("\n".join(f"{name} 1" for name in names) + "\n")
    for file, header in [("list_attr_celeba.txt", "Smiling"), ("list_bbox_celeba.txt", "x_1"),
                         ("list_landmarks_align_celeba.txt", "lefteye_x")]:
        (folder / file).write_text(f"3\n{header}\n" + "\n".join(f"{name} 1" for name in names) + "\n")

    records = load_dataset({"name": "celeba", "root": str(tmp_path), "resolution": 64, "channels": 3})
    assert records.record_shape == (3, 64, 64) and len(records) == 2  # the train partition: 1st and 3rd
    for stored, face in zip(records.data.numpy(), (faces[0], faces[2])):
        crop = face[39:179, 19:159]  # 140 px around the centre of 218 x 178
        reference = np.asarray(Image.fromarray(crop).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.abs(stored.astype(int) - reference.astype(int)).max() <= 1


# --- image folders ------------------------------------------------------------------------------


def test_image_folder_order_values_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)  # H=10, W=14
    square = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "b" / "0.png")
    Image.fromarray(square).save(tmp_path / "a" / "1.png")

    records = load_dataset({"name": "image_folder", "root": str(tmp_path), "resolution": 10, "channels": 3})
    assert records.record_shape == (3, 10, 10)
    np.testing.assert_array_equal(records.data[0].numpy(), square.transpose(2, 0, 1))  # a/ sorts first
    np.testing.assert_array_equal(records.data[1].numpy(), wide[:, 2:12].transpose(2, 0, 1))  # centre crop
    assert records.labels.tolist() == [0, 1]  # the sub-folder index, as ImageFolder's targets

    resized = load_dataset({"name": "image_folder", "root": str(tmp_path), "resolution": 6, "channels": 3})
    reference = pil_resize(wide[:, 2:12].transpose(2, 0, 1), 6).astype(int)
    assert np.abs(resized.data[1].numpy().astype(int) - reference).max() <= 1


def test_image_folder_mixed_shapes_and_missing_root(tmp_path):
    (tmp_path / "x").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x" / "gray.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x" / "rgb.png")
    with pytest.raises(MiaGenError, match="data.channels=1 or 3"):
        load_dataset({"name": "image_folder", "root": str(tmp_path)})
    gray = load_dataset({"name": "image_folder", "root": str(tmp_path), "channels": 1})
    assert gray.record_shape == (1, 8, 8)
    with pytest.raises(MissingAssetError, match="not a directory"):
        load_dataset({"name": "image_folder", "root": str(tmp_path / "absent")})
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "lonely.png")
    with pytest.raises(MissingAssetError, match="<root>/<class>/<image>"):
        load_dataset({"name": "image_folder", "root": str(flat)})


# --- arrays and CSV -------------------------------------------------------------------------------


def test_npy_tabular(tmp_path):
    table = np.random.default_rng(3).normal(size=(7, 4))
    np.save(tmp_path / "t.npy", table)
    records = load_dataset({"name": "array", "path": str(tmp_path / "t.npy"), "max_records": 5})
    assert records.kind == "tabular" and records.record_shape == (4,)
    np.testing.assert_array_equal(records.get(range(5)).numpy(), table[:5].astype(np.float32))
    table[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", table)
    with pytest.raises(MiaGenError, match=r"rows \[2\]"):
        load_dataset({"name": "array", "path": str(tmp_path / "nan.npy")})


def test_npy_images_uint8_and_float_ranges(tmp_path):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, size=(3, 1, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", raw)
    assert torch.equal(load_dataset({"name": "array", "path": str(tmp_path / "u8.npy")}).data, torch.from_numpy(raw))

    signed = rng.uniform(-1, 1, size=(3, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", signed)
    records = load_dataset({"name": "array", "path": str(tmp_path / "f.npy"), "value_range": [-1, 1]})
    expected = np.array([[[[round((v + 1) * 127.5) for v in row] for row in c] for c in image] for image in signed])
    np.testing.assert_array_equal(records.data.numpy(), expected)

    unit = (signed + 1) / 2
    np.save(tmp_path / "unit.npy", unit)
    records = load_dataset({"name": "array", "path": str(tmp_path / "unit.npy"), "value_range": [0, 1]})
    assert np.abs(records.data.numpy().astype(int) - expected).max() <= 1

    np.save(tmp_path / "wide.npy", signed * 3)
    with pytest.raises(MiaGenError, match=r"in \[-2\.\d+, 2\.\d+\].*rescale"):
        load_dataset({"name": "array", "path": str(tmp_path / "wide.npy"), "value_range": [-1, 1]})
    with pytest.raises(MiaGenError, match=r"data.value_range=\[-1,1\]"):
        load_dataset({"name": "array", "path": str(tmp_path / "f.npy"), "value_range": [0, 1]})
    with pytest.raises(MiaGenError, match="declare their range"):
        load_dataset({"name": "array", "path": str(tmp_path / "f.npy")})
    np.save(tmp_path / "nhwc.npy", signed.transpose(0, 2, 3, 1))
    with pytest.raises(MiaGenError, match="channels-last"):
        load_dataset({"name": "array", "path": str(tmp_path / "nhwc.npy")})


def test_csv_tabular_against_numpy(tmp_path):
    table = np.random.default_rng(5).normal(size=(6, 3))
    path = tmp_path / "t.csv"
    np.savetxt(path, table, delimiter=",", header="age,income,score", comments="")
    records = load_dataset({"name": "array", "path": str(path)})
    np.testing.assert_allclose(records.data.numpy(), np.loadtxt(path, delimiter=",", skiprows=1), rtol=1e-6)

    np.savetxt(tmp_path / "nohead.csv", table, delimiter=",")
    with pytest.raises(MiaGenError, match="header"):
        load_dataset({"name": "array", "path": str(tmp_path / "nohead.csv")})
    (tmp_path / "text.csv").write_text("a,b\n1,x\n")
    with pytest.raises(MiaGenError, match="line 2, column 'b'"):
        load_dataset({"name": "array", "path": str(tmp_path / "text.csv")})


@pytest.mark.parametrize("text, message", [
    ("", r"is empty; a CSV needs one header row of column names, then one row of numbers per record"),
    ("\n\n", "is empty; a CSV needs one header row"),
    ("age,income\n", r"has a header \(2 columns\) but no records below it; a CSV needs"),
    ("age,income\n1,2\n\n3\n", r"line 4 has 1 fields but the header has 2 columns.*exactly 2 fields"),
])
def test_csv_without_records_or_ragged_says_what_the_file_needs(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(MiaGenError, match=message):
        load_dataset({"name": "array", "path": str(tmp_path / "t.csv")})


@pytest.mark.parametrize("shape", [(0, 3), (0, 1, 4, 4)])
def test_npy_without_records_is_refused(tmp_path, shape):
    np.save(tmp_path / "empty.npy", np.zeros(shape, np.float32))
    with pytest.raises(MiaGenError, match=r"holds no records \(shape \(0, "):
        load_dataset({"name": "array", "path": str(tmp_path / "empty.npy"), "value_range": [-1, 1]})


def test_image_folder_conversion_is_logged(tmp_path, caplog):
    (tmp_path / "x").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x" / "gray.png")
    with caplog.at_level("INFO", logger="mia_gen.datasets"):
        load_dataset({"name": "image_folder", "root": str(tmp_path), "channels": 1})
        assert not caplog.records  # nothing converted
        load_dataset({"name": "image_folder", "root": str(tmp_path), "channels": 3, "resolution": 4})
    assert r"shape(s) [(1, 8, 8)] to (3, 4, 4)" in caplog.text


def test_array_missing_or_unsupported_path(tmp_path):
    with pytest.raises(MissingAssetError, match="data.path"):
        load_dataset({"name": "array", "path": str(tmp_path / "absent.npy")})
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(MiaGenError, match=".npy or .csv"):
        load_dataset({"name": "array", "path": str(tmp_path / "x.parquet")})
    with pytest.raises(MiaGenError, match="data.path is required"):
        load_dataset(OmegaConf.load(CONFIGS / "array.yaml"))


# --- the config files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "celeba"])
def test_torchvision_configs_fail_offline_with_the_layout(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MIA_GEN_DATA", str(tmp_path))
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert cfg.name == name and cfg.download is False
    with pytest.raises(MissingAssetError, match=re.escape(str(tmp_path))):
        load_dataset(cfg)


def test_digits_and_image_folder_configs():
    assert load_dataset(OmegaConf.load(CONFIGS / "digits.yaml")).record_shape == (1, 16, 16)
    with pytest.raises(MiaGenError, match=r"data.root is required .* data.root=<value>"):
        load_dataset(OmegaConf.load(CONFIGS / "image_folder.yaml"))


# --- captions -------------------------------------------------------------------------------------

# load_dataset({"name": "digits"}).fingerprint computed by the code before captions existed (commit
# 5f2f074, `.venv/bin/python -c "from mia_gen.datasets import load_dataset; print(load_dataset({'name':
# 'digits'}).fingerprint)"`): splits and models cached under it must keep matching.
DIGITS_FINGERPRINT = "f7126b7bc91d442d0c50647d08227ef03702b6decce13a73b3806180be3a302b"


def test_fingerprint_without_captions_is_unchanged(digits):
    assert not digits.has_captions and digits.texts is None
    assert digits.fingerprint == DIGITS_FINGERPRINT
    assert load_dataset(OmegaConf.load(CONFIGS / "digits.yaml")).fingerprint == DIGITS_FINGERPRINT
    assert load_dataset({"name": "digits", "captions": False}).fingerprint == DIGITS_FINGERPRINT


def test_digit_captions_name_sklearns_labels(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    captioned = load_dataset({"name": "digits", "captions": True})
    assert captioned.has_captions and torch.equal(captioned.data, digits.data)
    assert captioned.captions(np.arange(len(target))) == [f"a handwritten digit {label}" for label in target]
    assert captioned.captions(torch.tensor([5, 0, 5])) == [f"a handwritten digit {target[i]}" for i in (5, 0, 5)]
    first = load_dataset({"name": "digits", "captions": True, "max_records": 4})
    assert first.texts == [f"a handwritten digit {label}" for label in target[:4]]
    assert captioned.fingerprint != DIGITS_FINGERPRINT  # the captions are part of the data identity
    with pytest.raises(MiaGenError, match=r"outside"):
        captioned.captions([len(target)])
    with pytest.raises(MiaGenError, match="data.captions must be true"):
        load_dataset({"name": "digits", "captions": "yes"})
    with pytest.raises(MiaGenError, match="no effect for data.name=array"):
        load_dataset({"name": "array", "path": "x.npy", "captions": True})


def test_caption_edits_change_the_fingerprint(digits):
    captions = [f"record {i}" for i in range(len(digits))]
    base = RecordSet.from_tensor("digits", "image", digits.data, captions=captions)
    again = RecordSet.from_tensor("digits", "image", digits.data, captions=list(captions))
    assert again.fingerprint == base.fingerprint
    edited = list(captions)
    edited[17] = "record 17 "
    swapped = list(captions)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    empty = [""] * len(digits)
    prints = {base.fingerprint, DIGITS_FINGERPRINT}
    for other in (edited, swapped, empty):
        prints.add(RecordSet.from_tensor("digits", "image", digits.data, captions=other).fingerprint)
    assert len(prints) == 5
    with pytest.raises(MiaGenError, match="one per record"):
        RecordSet.from_tensor("digits", "image", digits.data, captions=captions[:-1])
    with pytest.raises(MiaGenError, match=r"must be strings.*\[3\]"):
        RecordSet.from_tensor("digits", "image", digits.data, captions=[*captions[:3], None, *captions[4:]])


def test_require_captions_says_how_to_give_them(digits):
    from mia_gen.datasets import require_captions

    with pytest.raises(MiaGenError) as caught:
        require_captions(digits, "model=ldm_text")
    message = str(caught.value)
    for fix in ("model=ldm_text", "'digits' has no captions", "metadata.jsonl", '"file_name"', '"text"',
                "data.captions=<file.csv>", "data.captions=true"):
        assert fix in message
    with pytest.raises(MiaGenError, match="metadata.jsonl"):
        digits.captions([0])
    require_captions(load_dataset({"name": "digits", "captions": True, "max_records": 2}), "model=ldm_text")


def caption_folder(root: Path) -> dict[str, int]:
    """Four 4x4 gray images, each a different constant value, in class folders (one nested deeper)."""
    values = {"b/0.png": 10, "a/1.png": 20, "a/deep/2.png": 30, "c/3.png": 40}
    for name, value in values.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(root / name)
    return values


CAPTIONS = {"b/0.png": "ein Hund, der läuft 🐕", "a/1.png": "猫", "a/deep/2.png": "",
            "c/3.png": 'a "quoted" cat\non two lines'}


def load_folder(root: Path, **options) -> RecordSet:
    return load_dataset({"name": "image_folder", "root": str(root), "channels": 1, "resolution": 4, **options})


def check_captions_follow_images(records: RecordSet, values: dict[str, int], captions: dict[str, str]) -> None:
    """Each record's caption is the one written for the file holding its pixel value."""
    by_value = {value: captions[name] for name, value in values.items()}
    assert records.texts == [by_value[int(image.flatten()[0])] for image in records.data]


def test_metadata_jsonl_captions_follow_the_loaders_order(tmp_path):
    import json

    values = caption_folder(tmp_path)
    plain = load_folder(tmp_path)
    assert not plain.has_captions and plain.fingerprint == array_fingerprint(plain.data.numpy(), "image")
    rows = [{"file_name": name, "text": CAPTIONS[name], "other": 1} for name in ("c/3.png", "a/deep/2.png",
                                                                                   "b/0.png", "a/1.png")]
    rows[0]["file_name"] = "./c/3.png"  # normalised like a path
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")

    records = load_folder(tmp_path)
    assert torch.equal(records.data, plain.data) and records.labels.tolist() == plain.labels.tolist()
    check_captions_follow_images(records, values, CAPTIONS)
    assert records.texts[1] == "" and "🐕" in records.captions([2])[0]  # a/1, a/deep/2, b/0, c/3
    assert records.fingerprint != plain.fingerprint
    assert load_folder(tmp_path).fingerprint == records.fingerprint
    ignored = load_folder(tmp_path, captions=False)
    assert not ignored.has_captions and ignored.fingerprint == plain.fingerprint
    assert load_folder(tmp_path, max_records=2).texts == records.texts[:2]

    rows[3]["text"] = "猫."
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    assert load_folder(tmp_path).fingerprint != records.fingerprint


def test_metadata_in_a_class_folder_names_files_relative_to_it(tmp_path):
    import json

    values = caption_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": name, "text": CAPTIONS[name]}) for name in ("b/0.png", "c/3.png")))
    (tmp_path / "a" / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": name[2:], "text": CAPTIONS[name]}) for name in ("a/1.png", "a/deep/2.png")))
    check_captions_follow_images(load_folder(tmp_path), values, CAPTIONS)
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps({"file_name": "../b/0.png", "text": "again"}))
    with pytest.raises(MiaGenError, match=r"Two caption rows name 'b/0.png'"):
        load_folder(tmp_path)


def test_missing_rows_and_rows_without_files_are_refused_by_name(tmp_path):
    import json

    caption_folder(tmp_path)
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("\n".join(json.dumps({"file_name": name, "text": "x"}) for name in ("b/0.png", "a/1.png")))
    with pytest.raises(MiaGenError, match=r"2 of 4 images have no caption row .*: a/deep/2\.png, c/3\.png\. "
                                          r".*data\.captions=false"):
        load_folder(tmp_path)
    assert load_folder(tmp_path, max_records=1).texts == ["x"]  # only the loaded images need rows
    assert not load_folder(tmp_path, captions=False).has_captions

    rows = [{"file_name": name, "text": "x"} for name in ("b/0.png", "a/1.png", "a/deep/2.png", "c/3.png")]
    rows += [{"file_name": "a/typo.png", "text": "x"}, {"file_name": "lonely.png", "text": "x"}]
    metadata.write_text("\n".join(json.dumps(row) for row in rows))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "lonely.png")
    with pytest.raises(MiaGenError, match=r"2 caption row\(s\) name files that are not among the 4 images .*"
                                          r"directly in data\.root.*a/typo\.png \(.*line 5\), lonely\.png"):
        load_folder(tmp_path)

    metadata.write_text('{"file_name": "b/0.png"}\n')
    with pytest.raises(MiaGenError, match=r"line 1: file_name 'b/0.png', text None; .*file_name and text"):
        load_folder(tmp_path)
    metadata.write_text("b/0.png,a caption\n")
    with pytest.raises(MiaGenError, match="line 1 is not JSON"):
        load_folder(tmp_path)


def test_csv_captions_by_option_or_metadata_csv(tmp_path):
    import csv

    values = caption_folder(tmp_path / "images")
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([name, text] for name, text in CAPTIONS.items())
    records = load_folder(tmp_path / "images", captions=str(path))
    check_captions_follow_images(records, values, CAPTIONS)

    (tmp_path / "images" / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # with a BOM
    automatic = load_folder(tmp_path / "images")
    assert automatic.texts == records.texts and automatic.fingerprint == records.fingerprint
    assert load_folder(tmp_path / "images", captions=True).texts == records.texts

    path.write_text("b/0.png,a dog\n")
    with pytest.raises(MiaGenError, match=r"needs a header row with the columns file_name and text"):
        load_folder(tmp_path / "images", captions=str(path))
    path.write_text("file_name,text\nb/0.png,a dog, running\n")
    with pytest.raises(MiaGenError, match=r"line 2 has more fields .*quote captions"):
        load_folder(tmp_path / "images", captions=str(path))
    with pytest.raises(MissingAssetError, match="data.captions="):
        load_folder(tmp_path / "images", captions=str(tmp_path / "absent.csv"))
    (tmp_path / "images" / "metadata.csv").unlink()
    with pytest.raises(MissingAssetError, match="data.captions=true but there is no metadata.jsonl"):
        load_folder(tmp_path / "images", captions=True)
