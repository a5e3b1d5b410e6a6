"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, data-free (the baseline every paper starts from).

Computed as the projection onto the top eigenvectors of the smaller Gram of W (`linalg.top_svd`):
the same truncation as an SVD, in float64, at the cost of one symmetric eigendecomposition."""
from __future__ import annotations

import torch

from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import top_svd


@register_solver("svd", needs=(), summary="plain truncated SVD of W (no calibration data)")
def solve(W: torch.Tensor, stats, rank: int) -> FactorPair:
    """W [out, in] -> U [out, r] = U_r Σ^{1/2}, V [in, r] = V_r Σ^{1/2}; minimises ‖W − U Vᵀ‖_F."""
    U, V = top_svd(W, rank)
    return FactorPair(U, V)
