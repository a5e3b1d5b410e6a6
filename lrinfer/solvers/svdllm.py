"""SVD-LLM (arXiv 2403.07378): truncation-aware data whitening, the "SVD-LLM (W)" variant.

With G = XᵀX = L Lᵀ (X the dense model's inputs), ‖(W − Ŵ) Xᵀ‖_F = ‖(W − Ŵ) L‖_F, so the best
rank-r Ŵ is [W L]_r L⁻¹ and the loss is exactly the dropped singular values of W L (Thm 3.2).
The LoRA "sequential low-rank approximation" stage of the full SVD-LLM is not part of this solver.
"""
from __future__ import annotations

import torch

from ..factors import FactorPair
from . import register_solver, split_sigma, truncated_svd
from .linalg import whitener


def whitened_truncation(W: torch.Tensor, G: torch.Tensor, rank: int, damp: float = 1e-6,
                        name: str = "") -> FactorPair:
    """Best rank-`rank` Ŵ = U Vᵀ under ‖(W − Ŵ) L‖_F, L Lᵀ = G.  W [out, in], G [in, in]."""
    L, Linv = whitener(G, damp, name)
    U, V = split_sigma(*truncated_svd(W @ L, rank))
    return FactorPair(U, Linv.t() @ V)


@register_solver("svdllm", needs=("gram",), summary="SVD-LLM whitening (Cholesky of XᵀX, SVD of W·S)")
def solve(W: torch.Tensor, stats, rank: int, *, damp: float = 1e-6) -> FactorPair:
    """W [out, in], stats.gram [in, in] -> U [out, r], V [in, r] minimising ‖(W − U Vᵀ) Xᵀ‖_F."""
    return whitened_truncation(W, stats.gram, rank, damp, stats.name)
