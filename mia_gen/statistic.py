"""What a per-record statistic is (DESIGN.md "Statistics and verdicts"), so that wrappers read it instead of
guessing: LiRA fits Gaussians to it, RMIA turns it into a probability, the gate and reports show it.

An attack's scores are "higher = member"; its statistic is the quantity it measures (a denoising loss, a
distance, a count), with

- `lower_is_member`: a loss or distance (the score is its negative) or a count / likelihood (the score itself);
- `reduction` over `dims` dimensions: "sum" (e.g. a squared error summed over pixels: it grows with `dims`),
  "mean", or "norm" (an L_p norm, `p`: it grows with dims^(1/p)); `scale` = the factor that brings one record's
  statistic to a per-dimension size (dims, dims^(1/p) or 1). A loss summed over 256 pixels is ~40 where its
  per-pixel mean is ~0.16: exp(-40) underflows every probability built from it, exp(-0.16) does not.
- `transform`: None, "log" (a positive, skewed statistic: distances, losses) or "logit" (one in (0, 1), as
  LiRA's reference code fits logit-scaled confidences), applied to the statistic before a wrapper fits it.

`values(scores)` turns an attack's scores into the statistic in the wrappers' convention (lower = member),
transformed; `per_dimension(values)` divides by `scale`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from mia_gen.errors import MiaGenError

REDUCTIONS = ("sum", "mean", "norm")
TRANSFORMS = (None, "log", "logit")


@dataclass(frozen=True)
class Statistic:
    """A per-record statistic's type.

    Attributes:
        name: what it measures, in words (e.g. "denoising loss (squared error summed over 256 dims)").
        lower_is_member: True for a loss or a distance, False for a count or a likelihood.
        reduction: "sum", "mean" or "norm" over `dims` dimensions.
        dims: the number of dimensions reduced over (>= 1).
        p: the order of the norm (reduction "norm").
        transform: None, "log" or "logit".
    """

    name: str
    lower_is_member: bool
    reduction: str
    dims: int
    p: float = 2.0
    transform: Optional[str] = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise MiaGenError(f"a statistic's reduction must be one of {REDUCTIONS}, got {self.reduction!r}.")
        if self.transform not in TRANSFORMS:
            raise MiaGenError(f"transform must be one of {list(TRANSFORMS)} (null: none), got {self.transform!r}.")
        if int(self.dims) < 1 or not float(self.p) >= 1:
            raise MiaGenError(f"a statistic needs dims >= 1 and p >= 1, got dims={self.dims}, p={self.p}.")

    @property
    def scale(self) -> float:
        """One record's statistic over this is its per-dimension size."""
        if self.reduction == "sum":
            return float(self.dims)
        if self.reduction == "norm":
            return float(self.dims) ** (1.0 / float(self.p))
        return 1.0

    def transformed(self, transform: Optional[str]) -> "Statistic":
        return replace(self, transform=transform)

    def values(self, scores: np.ndarray) -> np.ndarray:
        """An attack's scores (higher = member) -> the statistic, transformed, with lower = member."""
        scores = np.asarray(scores, dtype=np.float64)
        natural = -scores if self.lower_is_member else scores
        if self.transform == "log":
            finite = natural[np.isfinite(natural)]
            if (finite <= 0).any():
                raise MiaGenError(f"transform=log needs a positive statistic; {self.name} has "
                                  f"{int((finite <= 0).sum())} value(s) <= 0 (min {finite.min():.3g}).")
            natural = np.log(natural)
        elif self.transform == "logit":
            finite = natural[np.isfinite(natural)]
            if ((finite <= 0) | (finite >= 1)).any():
                raise MiaGenError(f"transform=logit needs a statistic in (0, 1); {self.name} ranges over "
                                  f"[{finite.min():.3g}, {finite.max():.3g}].")
            natural = np.log(natural) - np.log1p(-natural)
        return natural if self.lower_is_member else -natural

    def per_dimension(self, values: np.ndarray) -> np.ndarray:
        """Statistic values (untransformed) on a per-dimension scale."""
        return np.asarray(values, dtype=np.float64) / self.scale
