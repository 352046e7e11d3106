"""The "DCR share" that synthetic-data vendors report: SDMetrics' `DCROverfittingProtection`
(sdv-dev/SDMetrics@230a8d5, `sdmetrics/single_table/privacy/dcr_overfitting_protection.py`).

For every synthetic row, its distance to the closest training row (the members) and to the closest holdout
row (records the generator never saw) is compared; `closer_to_training` is the share of synthetic rows
strictly closer to the training rows (a tie counts as closer to the holdout, as there), and
score = min(2 (1 - closer_to_training), 1): 1 when a synthetic row is no likelier to sit by a training row
than by a holdout row. Two differences from SDMetrics, both stated in the output: the distance is the one
the attacks use (for `data=table` the stated mixed-type distance of `mia_gen.tables`, not SDMetrics'
range-normalised one), and the larger of the two real sets is subsampled (seeded) to the smaller's size, so
that 0.5 is what no leakage gives (SDMetrics only warns when the holdout is under half the training set).
Its 95% interval (Wilson) treats the synthetic rows as independent draws, which a generator's samples are.
It is a dataset-level summary, not a per-record attack: the gate's verdict does not use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

from mia_gen.errors import MiaGenError
from mia_gen.neighbours import nearest_neighbours

REFERENCE = "sdv-dev/SDMetrics@230a8d5 DCROverfittingProtection"


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson's score interval for a binomial proportion."""
    z = float(norm.ppf((1.0 + level) / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def dcr_share(synthetic: torch.Tensor, training: torch.Tensor, holdout: torch.Tensor, seed: int,
              backend: str = "auto") -> dict:
    """synthetic `(S, D)`, training `(M, D)`, holdout `(H, D)` rows in one feature space (float).

    Returns `{"score", "closer_to_training", "closer_to_training_ci95", "closer_to_holdout", "n_synthetic",
    "n_training", "n_holdout", "reference", "differences"}`.
    """
    if min(len(synthetic), len(training), len(holdout)) == 0:
        raise MiaGenError("the DCR share needs synthetic, training and holdout rows; one of them is empty.")
    size = min(len(training), len(holdout))
    rng = np.random.default_rng([int(seed), 7])
    if len(training) > size:
        training = training[torch.as_tensor(np.sort(rng.choice(len(training), size, replace=False)))]
    if len(holdout) > size:
        holdout = holdout[torch.as_tensor(np.sort(rng.choice(len(holdout), size, replace=False)))]
    to_training, _ = nearest_neighbours(synthetic, training, k=1, backend=backend)
    to_holdout, _ = nearest_neighbours(synthetic, holdout, k=1, backend=backend)
    closer = int((to_training[:, 0] < to_holdout[:, 0]).sum())
    share = closer / len(synthetic)
    return {"score": min(2.0 * (1.0 - share), 1.0), "closer_to_training": share,
            "closer_to_training_ci95": wilson_interval(closer, len(synthetic)), "closer_to_holdout": 1.0 - share,
            "n_synthetic": int(len(synthetic)), "n_training": size, "n_holdout": size, "reference": REFERENCE,
            "differences": "the attacks' distance (for data=table the stated mixed-type one); the larger real set "
                           "subsampled to the smaller's size (seeded)"}
