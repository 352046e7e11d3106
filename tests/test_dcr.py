"""The DCR share (mia_gen/dcr.py, SDMetrics' DCROverfittingProtection semantics) against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mia_gen.dcr import dcr_share


def plain_share(synthetic, training, holdout) -> float:
    """Per synthetic row: strictly closer to a training row than to every holdout row (a tie goes to the holdout)."""
    closer = 0
    for row in synthetic.double():
        to_training = min(float(((row - t.double()) ** 2).sum()) for t in training)
        to_holdout = min(float(((row - h.double()) ** 2).sum()) for h in holdout)
        closer += to_training < to_holdout
    return closer / len(synthetic)


def test_the_share_equals_a_plain_loop_and_the_score_follows_sdmetrics():
    rng = torch.Generator().manual_seed(0)
    training, holdout = torch.randn(30, 5, generator=rng), torch.randn(30, 5, generator=rng)
    leaky = torch.cat([training[:20] + 0.01 * torch.randn(20, 5, generator=rng), torch.randn(20, 5, generator=rng)])
    result = dcr_share(leaky, training, holdout, seed=0)
    assert result["closer_to_training"] == pytest.approx(plain_share(leaky, training, holdout))
    assert result["closer_to_training"] > 0.5
    assert result["score"] == pytest.approx(min(2 * (1 - result["closer_to_training"]), 1.0))
    copies = torch.cat([training[:5], holdout[:5]])  # exact copies: distance 0 to their own set only
    assert dcr_share(copies, training, holdout, seed=0)["closer_to_training"] == pytest.approx(0.5)
    tie = dcr_share(training[:1], training[:1], training[:1], seed=0)  # equidistant: counts as the holdout's
    assert tie["closer_to_training"] == 0.0 and tie["score"] == 1.0


def test_the_larger_real_set_is_subsampled_to_the_smallers_size():
    rng = torch.Generator().manual_seed(1)
    synthetic, training, holdout = (torch.randn(n, 3, generator=rng) for n in (50, 10, 40))
    result = dcr_share(synthetic, training, holdout, seed=3)
    assert result["n_training"] == result["n_holdout"] == 10
    chosen = np.sort(np.random.default_rng([3, 7]).choice(40, 10, replace=False))
    assert result["closer_to_training"] == pytest.approx(plain_share(synthetic, training, holdout[chosen]))
