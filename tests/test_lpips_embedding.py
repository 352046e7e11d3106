"""LPIPS embedding: squared L2 of embeddings equals the real `lpips.LPIPS`, offline."""

import warnings

import numpy as np
import pytest
import torch

from mia_gen.errors import MiaGenError, MissingAssetError
from mia_gen.lpips_embedding import (
    LPIPSEmbedding,
    _cached_lpips,
    backbone_checkpoint,
    lpips_pairwise,
)
from mia_gen.neighbours import nearest_neighbours

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS.*RANDOM backbone:UserWarning")


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path_factory, monkeypatch):
    """No backbone weights anywhere: tests never depend on (or download) real weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


def images(n, channels=1, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=gen) * 2 - 1


def embedding_sq_distance(embed, x, y):
    return ((embed(x) - embed(y)) ** 2).sum(1)


@pytest.mark.parametrize(
    "net, channels, size, resize",
    [("alex", 1, 16, 64), ("alex", 3, 40, 64), ("alex", 3, 70, None), ("squeeze", 1, 16, 48)],
)
def test_embedding_distance_equals_lpips(net, channels, size, resize):
    x, y = images(5, channels, size, seed=1), images(5, channels, size, seed=2)
    embed = LPIPSEmbedding(net, resize=resize, allow_random_backbone=True, batch_size=3)
    ours = embedding_sq_distance(embed, x, y)
    reference = lpips_pairwise(x, y, net, resize=resize, allow_random_backbone=True)
    assert reference.shape == (5,) and (reference > 0).all()
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-4)
    assert torch.allclose(embedding_sq_distance(embed, x, x), torch.zeros(5), atol=1e-7)


@pytest.mark.slow
def test_vgg_embedding_distance_equals_lpips():
    x, y = images(3, 1, 16, seed=1), images(3, 1, 16, seed=2)
    embed = LPIPSEmbedding("vgg", resize=32, allow_random_backbone=True)
    reference = lpips_pairwise(x, y, "vgg", resize=32, allow_random_backbone=True)
    np.testing.assert_allclose(embedding_sq_distance(embed, x, y).numpy(), reference.numpy(), rtol=1e-4)


def test_lpips_nearest_neighbour_equals_pairwise_argmin():
    queries, database = images(4, seed=3), images(24, seed=4)
    database[17] = (queries[2] + 0.05 * images(1, seed=5)[0]).clamp(-1, 1)  # a near-copy
    embed = LPIPSEmbedding("alex", allow_random_backbone=True)
    reference = torch.stack([lpips_pairwise(q[None], database, allow_random_backbone=True) for q in queries])
    for backend in ("faiss", "torch"):
        d, i = nearest_neighbours(queries, database, k=3, backend=backend, chunk_size=16, feature_fn=embed)
        expected = torch.argsort(reference, dim=1, stable=True)[:, :3]
        assert torch.equal(i, expected)
        np.testing.assert_allclose(d.numpy(), reference.gather(1, expected).numpy(), rtol=1e-4)
    assert i[2, 0] == 17


def test_missing_weights_error_says_where_and_how():
    checkpoint = backbone_checkpoint("alex")
    assert checkpoint.name == "alexnet-owt-7be5be79.pth" and not checkpoint.exists()
    with pytest.raises(MissingAssetError) as info:
        LPIPSEmbedding("alex")
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(checkpoint.parent) in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert "attack.lpips.allow_random_backbone=true" in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingAssetError, match="vgg16-397923af.pth"):
        lpips_pairwise(images(1), images(1), net="vgg")


def test_random_backbone_is_loud_and_seeded():
    x = images(2, seed=6)
    with pytest.warns(UserWarning, match="RANDOM backbone.*NOT LPIPS"):
        first = LPIPSEmbedding("alex", allow_random_backbone=True)
    assert first.backbone == "random"
    _cached_lpips.cache_clear()  # rebuild from scratch, with the global RNG in another state
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    second = LPIPSEmbedding("alex", allow_random_backbone=True)
    assert torch.equal(torch.get_rng_state(), state)  # building does not disturb the caller's RNG
    assert torch.equal(first(x), second(x))


def test_torchvision_checkpoint_is_loaded_like_lpips_loads_it(tmp_path, monkeypatch):
    """A stand-in `alexnet-owt-*.pth` in the cache: our loader must give lpips' own result."""
    import lpips
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = backbone_checkpoint("alex")
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(7)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), checkpoint)

    embed = LPIPSEmbedding("alex", resize=64)
    assert embed.backbone == "pretrained"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand=False: lpips asks torchvision, which finds the cached file (no download).
        reference_model = lpips.LPIPS(net="alex", pnet_rand=False, verbose=False).eval()
    x, y = images(3, seed=8), images(3, seed=9)

    def up(t):
        return torch.nn.functional.interpolate(t.expand(-1, 3, -1, -1), size=64, mode="bilinear")

    with torch.no_grad():
        reference = reference_model(up(x), up(y)).flatten()
    np.testing.assert_allclose(embedding_sq_distance(embed, x, y).numpy(), reference.numpy(), rtol=1e-4)
    np.testing.assert_allclose(lpips_pairwise(x, y).numpy(), reference.numpy(), rtol=1e-5)


def test_bad_input_errors_say_what_to_do():
    embed = LPIPSEmbedding("alex", allow_random_backbone=True)
    with pytest.raises(MiaGenError, match="x / 127.5 - 1"):
        embed(images(2) * 127.5 + 127.5)
    with pytest.raises(MiaGenError, match="C = 1 or 3.*tabular"):
        embed(torch.zeros(2, 10))
    with pytest.raises(MiaGenError, match="too small.*resize"):
        LPIPSEmbedding("alex", resize=None, allow_random_backbone=True)(images(2))
    with pytest.raises(MiaGenError, match="use one of"):
        LPIPSEmbedding("resnet", allow_random_backbone=True)
    with pytest.raises(MiaGenError, match="equal counts"):
        lpips_pairwise(images(2), images(3), allow_random_backbone=True)
