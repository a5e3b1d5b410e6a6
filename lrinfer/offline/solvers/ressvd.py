"""ResSVD / ERC-SVD (arXiv 2505.20112): residual compensation (REC) and partial-layer compression (PLC).

REC, per weight W [m=out, n=in] with total rank r (the paper; docs/methods.md):

    α = mn/(m+n),  r2 = round(β·α) (β = 0.05),  r1 = r − r2  (r2 clamped so that r1 ≥ 1)
    W1 = Trunc_A(W, r1),  R = W − W1,  W2 = Trunc_B(R, r2),  Ŵ = W1 + W2

returned as FactorPair(U, V, U2, V2) with U Vᵀ = W1 and U2 V2ᵀ = W2 (r1 + r2 = r, so the same
parameters as one rank-r pair). Trunc is either SVD-LLM's whitened truncation [· L]_k L⁻¹
(L Lᵀ = XᵀX of the dense-model inputs) or the plain SVD, chosen by `mode`:

* ``whiten_then_plain`` (default): stage 1 whitened, stage 2 plain SVD of the residual.
* ``same_metric``: both stages whitened. By Eckart–Young the top-r2 part of R·L is the next r2
  singular triplets of W·L, so this is exactly SVD-LLM at rank r (kept as a check / ablation).
* ``plain_then_plain``: both plain; exactly plain SVD at rank r.
* ``plain_then_whiten``: stage 1 plain, stage 2 whitened.

Why ``whiten_then_plain`` is the default: with one metric in both stages REC *is* a single
rank-r truncation (Eckart–Young, as `same_metric` shows), so the only reading in which REC can change anything is a
metric mismatch between the stages. The paper whitens with calibration data (SVD-LLM style) and
describes the residual step as plain "SVDTrunc(R)"; whitening the main stage and compensating
in weight space is the most literal reading. It is slightly worse than SVD-LLM on the whitened
objective (Eckart–Young) but keeps weight-space energy that whitening drops. No public source
settles this (the paper has no public code).

PLC is the layer selection ``"last"`` (lrinfer/offline/selection/last.py), this solver's default selection.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from .base import register_solver, split_sigma, truncated_svd
from .linalg import whitener

Mode = Literal["whiten_then_plain", "same_metric", "plain_then_plain", "plain_then_whiten"]
MODES = get_args(Mode)


def residual_rank(out_features: int, in_features: int, rank: int, beta: float) -> int:
    """r2 = round(β·mn/(m+n)), clamped to [0, rank − 1] so the main pair keeps rank ≥ 1."""
    alpha = out_features * in_features / (out_features + in_features)
    return max(0, min(int(round(beta * alpha)), rank - 1))


def _truncate(A: torch.Tensor, rank: int, L: torch.Tensor | None, Linv: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` (U [out, k], V [in, k]) of A [out, in]; under ‖· L‖_F when L is given."""
    if L is None:
        return split_sigma(*truncated_svd(A, rank))
    U, V = split_sigma(*truncated_svd(A @ L, rank))
    return U, Linv.t() @ V


@register_solver("ressvd", needs=("gram",), selection="last",
                 summary="ResSVD: whitened truncation + rank-β·α residual compensation; last-k-layer PLC")
def solve(W: torch.Tensor, stats, rank: int, *, beta: float = 0.05, mode: Mode = "whiten_then_plain",
          damp: float = 1e-6) -> FactorPair:
    """W [out, in], stats.gram [in, in] -> U [out, r1], V [in, r1], U2 [out, r2], V2 [in, r2], r1 + r2 = rank.

    W ≈ U Vᵀ + U2 V2ᵀ; U Vᵀ = Trunc_1(W, r1), U2 V2ᵀ = Trunc_2(W − U Vᵀ, r2) (see the module doc).
    With r2 = 0 (rank 1, or β = 0) there is no residual pair.
    """
    if not 0.0 <= beta < 1.0:
        raise LrinferError(f"ressvd: beta (residual rank / (mn/(m+n))) must be in [0, 1); got {beta}")
    if mode not in MODES:
        raise LrinferError(f"ressvd: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    first, second = {"whiten_then_plain": (True, False), "same_metric": (True, True),
                     "plain_then_plain": (False, False), "plain_then_whiten": (False, True)}[mode]
    L = Linv = None
    if first or second:
        if stats.gram is None:
            raise LrinferError(f"ressvd: {stats.name} has no Gram matrix; calibrate first")
        L, Linv = whitener(stats.gram, damp, stats.name)
    r2 = residual_rank(W.shape[0], W.shape[1], rank, beta)
    r1 = rank - r2
    U, V = _truncate(W, r1, L if first else None, Linv if first else None)
    if r2 == 0:
        return FactorPair(U, V)
    R = W - U @ V.t()
    U2, V2 = _truncate(R, r2, L if second else None, Linv if second else None)
    return FactorPair(U, V, U2, V2)
