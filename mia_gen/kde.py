"""Gaussian kernel density estimate in log space (the density model of DOMIAS).

Same estimator as `scipy.stats.gaussian_kde` (full data covariance scaled by Scott's factor
n^(-1/(d+4))), but evaluated with logsumexp in chunks so densities far in the tails are not 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mia_gen.errors import MiaGenError


class GaussianKDE:
    """points (`torch.Tensor` of shape `(n, d)`): the data the density is estimated from."""

    def __init__(self, points: torch.Tensor, bandwidth: str | float = "scott", regularization: float = 0.0,
                 label: str = "data"):
        points = points.double().cpu()
        n, d = points.shape
        if n < 2:
            raise MiaGenError(f"a KDE of the {label} needs at least 2 points, got {n}.")
        factor = n ** (-1.0 / (d + 4)) if bandwidth == "scott" else float(bandwidth)
        data_cov = torch.from_numpy(np.atleast_2d(np.cov(points.numpy(), rowvar=False)))
        data_cov = data_cov + regularization * torch.eye(d, dtype=torch.float64)
        eigenvalues = torch.linalg.eigvalsh(data_cov)
        if eigenvalues.min() <= 1e-10 * max(eigenvalues.max().item(), 1e-300):
            rank = int((eigenvalues > 1e-10 * eigenvalues.max()).sum())
            raise MiaGenError(
                f"the covariance of the {label} ({n} points in {d} dimensions) is singular (rank "
                f"{rank}): a Gaussian KDE would divide by zero. Use fewer features (the attack's "
                f"`n_components` <= {max(rank, 1)}), more points, or set the attack's "
                "`kde_regularization` > 0 to add a ridge to the covariance."
            )
        cholesky = torch.linalg.cholesky(data_cov) * factor
        self.points = points
        self.factor = factor
        self._inverse_cholesky = torch.linalg.inv(cholesky)  # whitening: cov^-1 = L^-T L^-1
        self._whitened_points = points @ self._inverse_cholesky.T
        log_det = 2.0 * torch.log(torch.diagonal(cholesky)).sum().item()
        self._log_norm = -0.5 * (d * math.log(2 * math.pi) + log_det) - math.log(n)

    def log_density(self, x: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
        """x (`torch.Tensor` of shape `(q, d)`) -> log p(x), `(q,)` float64."""
        whitened = x.double().cpu() @ self._inverse_cholesky.T
        result = torch.full((len(x),), -math.inf, dtype=torch.float64)
        for start in range(0, len(self._whitened_points), chunk_size):
            block = self._whitened_points[start : start + chunk_size]
            sq_dist = torch.cdist(whitened, block).square()
            result = torch.logaddexp(result, torch.logsumexp(-0.5 * sq_dist, dim=1))
        return result + self._log_norm
