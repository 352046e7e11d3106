"""The "DCR share" that synthetic-data vendors report: SDMetrics' `DCROverfittingProtection`
(sdv-dev/SDMetrics@230a8d5, `sdmetrics/single_table/privacy/dcr_overfitting_protection.py`).

For every synthetic row, its distance to the closest training row (the members) and to the closest holdout
row (records the generator never saw) is compared; `closer_to_training` is the share of synthetic rows
strictly closer to the training rows (a tie counts as closer to the holdout, as there), and
score = min(2 (1 - closer_to_training), 1): 1 when a synthetic row is no likelier to sit by a training row
than by a holdout row. Two differences from SDMetrics, both stated in the output: the distance is the one
the attacks use (for `data=table` the stated mixed-type distance of `mia_gen.tables`, not SDMetrics'
range-normalised one), and the larger of the two real sets is subsampled (seeded) to the smaller's size, so
that 0.5 is what no leakage gives on average (SDMetrics only warns when the holdout is under half the
training set). No interval is given: the share depends on which real rows are compared as much as on the
synthetic draw (at 50 + 50 real rows it moves by about ±0.04–0.12 between splits of one table while the
synthetic rows alone would give ±0.01), so compare it across seeds, as `experiment=tabular_ctgan` does.
It is a dataset-level summary, not a per-record attack: the gate's verdict does not use it.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.errors import MiaGenError
from mia_gen.neighbours import nearest_neighbours

REFERENCE = "sdv-dev/SDMetrics@230a8d5 DCROverfittingProtection"


def dcr_share(synthetic: torch.Tensor, training: torch.Tensor, holdout: torch.Tensor, seed: int,
              backend: str = "auto") -> dict:
    """synthetic `(S, D)`, training `(M, D)`, holdout `(H, D)` rows in one feature space (float).

    Returns `{"score", "closer_to_training", "closer_to_holdout", "n_synthetic", "n_training", "n_holdout",
    "reference", "differences"}`.
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
    return {"score": min(2.0 * (1.0 - share), 1.0), "closer_to_training": share, "closer_to_holdout": 1.0 - share,
            "n_synthetic": int(len(synthetic)), "n_training": size, "n_holdout": size, "reference": REFERENCE,
            "differences": "the attacks' distance (for data=table the stated mixed-type one); the larger real set "
                           "subsampled to the smaller's size (seeded)"}
