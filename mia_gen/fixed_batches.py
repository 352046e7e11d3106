"""Networks called on batches of one fixed shape, so that a record's output never depends on its batch.

CPU and GPU libraries pick their kernels (and so their float rounding) by the shape of a call: on an AMD
EPYC machine a diffusers UNet takes another path below 16 rows (outputs ~1e-6 apart, bit-identical from 16
rows up), on an Intel Xeon for one row alone. A t-error's cancellation, a classifier trained on t-error maps
or LiRA's Gaussian fit amplify that rounding into visibly different scores. Calling a network only on
batches of exactly `size` rows (the last padded by repeating its last row, the padding dropped) makes a
record's output a function of the record alone, on any CPU (DESIGN.md "Batch invariance"). A row's
output does not depend on its position in a call or on the other rows of it (tests/test_fixed_batches.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def pad_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` `(n, ...)`, 1 <= n <= size, with its last row repeated up to `size` rows."""
    n = len(rows)
    if n == size:
        return rows
    return torch.cat([rows, rows[-1:].expand(size - n, *rows.shape[1:])])


def in_fixed_chunks(fn: Callable[..., torch.Tensor], rows: torch.Tensor | Sequence[torch.Tensor | None],
                    size: int) -> torch.Tensor:
    """`fn` over `rows` in calls of exactly `size` rows, the outputs concatenated, padding dropped.

    Args:
        fn: called as `fn(chunk)` for one tensor, `fn(*chunks)` for a sequence (None entries passed as None).
        rows: a tensor `(N, ...)`, or a sequence of tensors sharing their first dimension N >= 1 (e.g. x_t,
            t and the conditions of a denoiser call).
        size: rows per call (>= 1).

    Gradients flow where the caller enables them; the padding's outputs are dropped, so they add nothing.
    """
    single = isinstance(rows, torch.Tensor)
    parts = [rows] if single else list(rows)
    n = len(parts[0])
    size = int(size)
    if size < 1:
        raise ValueError(f"in_fixed_chunks: size must be >= 1, got {size}")
    outputs = []
    for start in range(0, n, size):
        chunk = [None if part is None else pad_rows(part[start : start + size], size) for part in parts]
        outputs.append(fn(*chunk)[: min(size, n - start)])
    return torch.cat(outputs)
