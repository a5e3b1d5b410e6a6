"""ResSVD's partial-layer compression (PLC, arXiv 2505.20112): only the last k decoder blocks are
compressed, each at R_l = ratio·(all params)/(selected params) (= N·ratio/k for identical blocks)."""
from __future__ import annotations

from lrinfer.errors import LrinferError
from lrinfer.factors import check_ratio
from .base import ratio_within, register_selection


@register_selection("last", summary="ResSVD partial-layer compression: only the last k decoder blocks")
def select_last(linears, ratio: float, *, k: int | None = None, cap: float = 0.6):
    """Keep the linears of the last `k` decoder blocks; they must remove ratio·(all params).

    linears: every compressible LinearInfo. Returns (selected, R_l) with
    R_l = ratio·Σ_all params / Σ_selected params (= N·ratio/k for identical blocks).
    k=None: the smallest k whose R_l ≤ `cap` (all blocks if even k = N exceeds it, then R_l = ratio).
    The paper searches k by calibration error (Alg. 3, criterion unpublished); this rule is ours:
    cap = 0.6 keeps every compressed block at ≥ 40 % of its parameters, well inside the
    feasibility limit R_l < 1 − β (the residual rank of ResSVD, lrinfer/offline/solvers/ressvd.py, must fit).
    """
    check_ratio(ratio)
    if not 0.0 < cap < 1.0:
        raise LrinferError(f"last: cap (largest per-layer ratio when k is derived) must be in (0, 1); got {cap}")
    blocks = sorted({f.block for f in linears})
    n = len(blocks)
    if n == 0:
        raise LrinferError("last: no compressible linears")

    def pick(kk):
        keep = set(blocks[n - kk:])
        return [f for f in linears if f.block in keep]

    if k is not None:
        if not isinstance(k, int) or not 1 <= k <= n:
            raise LrinferError(f"last: k must be an integer in [1, {n}] (the number of decoder blocks); got {k}")
        sel = pick(k)
        return sel, ratio_within(sel, linears, ratio)
    total = sum(f.dense_params for f in linears)
    for kk in range(1, n + 1):
        sel = pick(kk)
        if ratio * total / sum(f.dense_params for f in sel) <= cap + 1e-12:
            return sel, ratio_within(sel, linears, ratio)
    return linears, ratio
