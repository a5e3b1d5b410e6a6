"""SVD-LLM (arXiv 2403.07378): truncation-aware data whitening, the "SVD-LLM (W)" variant.

With G = XᵀX = L Lᵀ (X the dense model's inputs), ‖(W − Ŵ) Xᵀ‖_F = ‖(W − Ŵ) L‖_F, so the best
rank-r Ŵ is [W L]_r L⁻¹ and the loss is exactly the dropped singular values of W L (Thm 3.2).
The LoRA "sequential low-rank approximation" stage of the full SVD-LLM is not part of this solver.

Computed without an SVD or L⁻¹ (`linalg.whitened_factors`): one Cholesky of G + δI, then one
symmetric eigendecomposition of the smaller Gram of W L — [W L]_r L⁻¹ = U_r U_rᵀ W with U_r the top
eigenvectors of W L Lᵀ Wᵀ when out ≤ in (SVD-LLM V2 and Swift-SVD's reading), or (W L V_r)(L⁻ᵀ V_r)ᵀ
with V_r those of Lᵀ Wᵀ W L otherwise. The same Ŵ as the SVD of W L, in float64.
"""
from __future__ import annotations

import torch

from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import whitened_factors


def whitened_truncation(W: torch.Tensor, G: torch.Tensor, rank: int, damp: float = 1e-6,
                        name: str = "") -> FactorPair:
    """Best rank-`rank` Ŵ = U Vᵀ under ‖(W − Ŵ) L‖_F, L Lᵀ = G + δI.  W [out, in], G [in, in]."""
    return FactorPair(*whitened_factors(W, G, rank, damp, name))


@register_solver("svdllm", needs=("gram",), summary="SVD-LLM whitening (Cholesky of XᵀX, SVD of W·S)")
def solve(W: torch.Tensor, stats, rank: int, *, damp: float = 1e-6) -> FactorPair:
    """W [out, in], stats.gram [in, in] -> U [out, r], V [in, r] minimising ‖(W − U Vᵀ) Xᵀ‖_F."""
    return whitened_truncation(W, stats.gram, rank, damp, stats.name)
