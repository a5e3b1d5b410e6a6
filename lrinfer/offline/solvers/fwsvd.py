"""FWSVD (arXiv 2207.00112): Fisher-weighted SVD.

The Fisher information of each weight, I = Σ_batches (∂L/∂W)² [out, in], is summed into a
per-row importance and the SVD is taken in the importance-weighted space:

    d_o = sqrt(Σ_i I[o, i] + ε·mean),   [diag(d) W]_r = U_r Σ_r V_rᵀ,   Ŵ = diag(d)⁻¹ U_r Σ_r V_rᵀ

which minimises ‖diag(d)(W − Ŵ)‖_F (a rank-r weighted problem with one diagonal weight has
this closed form).

Orientation: the FWSVD paper weights the *rows* of its weight matrix; in the
re-implementation we read, rows are the dimension summed over per importance, which for an
`nn.Linear` weight [out, in] we take to be the **output rows** (`axis="out"`, default). The
alternative `axis="in"` weights input columns (sum over outputs), which is ASVD's "fisher" scaling
orientation. ε is relative to the mean importance (Fisher values of an LLM are tiny in absolute
terms, so the re-implementation's absolute 1e-5 would swamp them).
"""
from __future__ import annotations

import logging
from typing import Literal

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import note_fallback, top_svd

log = logging.getLogger(__name__)


@register_solver("fwsvd", needs=("fisher",), summary="Fisher-weighted SVD (row importance from Σ(∂L/∂W)²)")
def solve(W: torch.Tensor, stats, rank: int, *, axis: Literal["out", "in"] = "out", eps: float = 1e-5) -> FactorPair:
    """W [out, in], stats.fisher [out, in] -> U [out, r], V [in, r].

    axis="out": minimises ‖diag(d)(W − U Vᵀ)‖_F, d [out]; axis="in": ‖(W − U Vᵀ) diag(d)‖_F, d [in].
    """
    if axis not in ("out", "in"):
        raise LrinferError(f"fwsvd: axis must be 'out' (weight output rows, default) or 'in'; got {axis!r}")
    if eps <= 0:
        raise LrinferError(f"fwsvd: eps must be > 0; got {eps}")
    if stats.fisher is None:
        raise LrinferError(f"fwsvd: {stats.name} has no Fisher information; it needs a backward pass on "
                           "calibration data")
    F = stats.fisher.double().to(W.device)
    if F.shape != W.shape:
        raise LrinferError(f"fwsvd: {stats.name}: Fisher shape {tuple(F.shape)} != weight shape {tuple(W.shape)}")
    imp = F.sum(1) if axis == "out" else F.sum(0)
    scale = float(imp.mean())
    if not scale > 0 or not torch.isfinite(imp).all():
        note_fallback("plain_svd", stats.name, "fwsvd: %s: Fisher information is zero or not finite; using the "
                      "plain SVD of W", stats.name)
        return FactorPair(*top_svd(W, rank))
    d = (imp + eps * scale).sqrt()
    if axis == "out":
        U, V = top_svd(d[:, None] * W, rank)
        return FactorPair(U / d[:, None], V)
    U, V = top_svd(W * d, rank)
    return FactorPair(U, V / d[:, None])
