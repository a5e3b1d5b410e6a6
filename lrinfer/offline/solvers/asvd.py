"""ASVD (arXiv 2312.05821): activation-aware SVD.

Input channels are scaled by their mean activation magnitude before the SVD, so channels that
carry large activations (outliers) are approximated more accurately:

    s_j = (Σ_tokens |x_j| / N)^α + ε,   W' = W·diag(s),   [W']_r = U_r Σ_r V_rᵀ,
    Ŵ = U_r Σ_r V_rᵀ diag(s)⁻¹        (α = 0.5, ε = 1e-6 as in the official code)

Only the scaling is implemented. ASVD's sensitivity-based truncation-rank search (STRS: a
calibration perplexity per layer and candidate ratio, then a binary search) needs hundreds of
model evaluations and is out of scope; ranks come from the chosen allocator (uniform by default).
"""
from __future__ import annotations

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import top_svd


@register_solver("asvd", needs=("abs_sum",),
                 summary="ASVD activation-aware scaling (mean|x|^α on input channels), then SVD")
def solve(W: torch.Tensor, stats, rank: int, *, alpha: float = 0.5, eps: float = 1e-6) -> FactorPair:
    """W [out, in], stats.abs_sum [in] (Σ|x| over stats.n tokens) -> U [out, r], V [in, r].

    Minimises ‖(W − U Vᵀ)·diag(s)‖_F with s = mean|x|^alpha + eps (scales undone on V).
    """
    if not 0.0 <= alpha <= 4.0:
        raise LrinferError(f"asvd: alpha must be in [0, 4] (the paper uses 0.5, sometimes 1); got {alpha}")
    if eps <= 0:
        raise LrinferError(f"asvd: eps must be > 0; got {eps}")
    if stats.abs_sum is None or not stats.n:
        raise LrinferError(f"asvd: {stats.name} has no activation statistics (abs_sum); calibrate first")
    mean_abs = stats.abs_sum.double().to(W.device) / stats.n
    s = mean_abs.clamp_min(0).pow(alpha) + eps                       # [in]
    U, V = top_svd(W * s, rank)                                      # W' = W diag(s)
    return FactorPair(U, V / s[:, None])                             # V = diag(s)⁻¹ V'
