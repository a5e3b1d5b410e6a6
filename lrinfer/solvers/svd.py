"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, data-free (the baseline every paper starts from)."""
from __future__ import annotations

import torch

from ..factors import FactorPair
from . import register_solver, split_sigma, truncated_svd


@register_solver("svd", needs=(), summary="plain truncated SVD of W (no calibration data)")
def solve(W: torch.Tensor, stats, rank: int) -> FactorPair:
    """W [out, in] -> U [out, r] = U_r Σ^{1/2}, V [in, r] = V_r Σ^{1/2}; minimises ‖W − U Vᵀ‖_F."""
    U, V = split_sigma(*truncated_svd(W, rank))
    return FactorPair(U, V)
