"""Networks called on batches of one fixed shape (mia_gen/fixed_batches.py, `Denoiser.epsilon`): a record's
prediction is a function of the record alone, bit for bit, whatever N and whichever CPU."""

from __future__ import annotations

import pytest
import torch

from mia_gen.errors import MiaGenError
from mia_gen.fixed_batches import in_fixed_chunks, pad_rows
from mia_gen.models.denoiser import MICRO_BATCH, Denoiser
from test_diffusion_attacks import UNetDenoiser

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pad_rows_repeats_the_last_row():
    rows = torch.arange(6.0).view(3, 2)
    padded = pad_rows(rows, 5)
    assert padded.shape == (5, 2)
    assert torch.equal(padded[:3], rows) and torch.equal(padded[3:], rows[-1:].expand(2, 2))
    assert pad_rows(rows, 3) is rows


@pytest.mark.parametrize("n", [1, 4, 5, 9, 12])
def test_in_fixed_chunks_calls_with_one_shape_and_drops_the_padding(n):
    x, t = torch.randn(n, 3), torch.arange(n)
    seen = []

    def fn(a, b, c):
        seen.append((a.shape[0], b.shape[0], c))
        return a * 2 + b[:, None]

    out = in_fixed_chunks(fn, (x, t, None), 4)
    assert torch.equal(out, x * 2 + t[:, None])  # the plain, whole-batch computation
    assert seen == [(4, 4, None)] * -(-n // 4)
    assert torch.equal(in_fixed_chunks(lambda a: a + 1, x, 4), x + 1)  # one tensor: fn(chunk)
    with pytest.raises(ValueError, match="size"):
        in_fixed_chunks(fn, (x, t, None), 0)


@pytest.fixture(scope="module")
def denoiser():
    unet = UNetDenoiser()
    return Denoiser(unet.unet, unet.alphas_cumprod, unet.sample_shape)


def test_the_network_sees_only_calls_of_rows_per_call(denoiser):
    assert denoiser.rows_per_call == MICRO_BATCH["cpu"]
    rows = []
    handle = denoiser.network.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        sizes = (1, 3, denoiser.rows_per_call, denoiser.rows_per_call + 1, 3 * denoiser.rows_per_call - 1)
        for n in sizes:
            denoiser.epsilon(torch.zeros(n, *denoiser.sample_shape), torch.zeros(n, dtype=torch.int64))
    finally:
        handle.remove()
    assert set(rows) == {denoiser.rows_per_call}
    assert len(rows) == 1 + 1 + 1 + 2 + 3


def test_a_rows_prediction_is_bit_identical_for_every_batch_and_position(denoiser):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, *denoiser.sample_shape, generator=g)
    t = torch.randint(0, denoiser.num_train_timesteps, (80,), generator=g)
    everything = denoiser.epsilon(x, t)
    for n in (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 65):
        for start in (0, 5, 80 - n):
            part = slice(start, start + n)
            assert torch.equal(denoiser.epsilon(x[part], t[part]), everything[part]), (n, start)
    flipped = torch.flip(torch.arange(80), [0])  # other neighbours, other positions
    assert torch.equal(denoiser.epsilon(x[flipped], t[flipped]), everything[flipped])


def test_gradients_flow_through_one_call_of_the_callers_shape(denoiser):
    x = torch.randn(3, *denoiser.sample_shape, requires_grad=True)
    rows = []
    handle = denoiser.network.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        eps = denoiser.epsilon(x, torch.full((3,), 10), grad=True)
    finally:
        handle.remove()
    eps.sum().backward()
    assert rows == [3] and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(eps, denoiser.epsilon(x.detach(), torch.full((3,), 10)), atol=1e-5)


def test_micro_batch_is_settable_and_checked(denoiser):
    unet = UNetDenoiser()
    small = Denoiser(unet.unet, unet.alphas_cumprod, unet.sample_shape, micro_batch=4)
    assert small.rows_per_call == 4
    x = torch.randn(6, *small.sample_shape)
    assert torch.allclose(small.epsilon(x, torch.full((6,), 7)), denoiser.epsilon(x, torch.full((6,), 7)), atol=1e-5)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(MiaGenError, match="micro_batch must be a positive integer"):
            Denoiser(unet.unet, unet.alphas_cumprod, unet.sample_shape, micro_batch=bad)
