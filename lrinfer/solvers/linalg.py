"""Whitening: factor a Gram matrix G = XᵀX as L Lᵀ, robustly."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def whitener(G: torch.Tensor, damp: float = 1e-6, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with L Lᵀ = G + δI, G [in, in] symmetric PSD, δ = damp · mean(diag G).

    Lower Cholesky when G + δI is positive definite. Otherwise (rank-deficient or indefinite
    from round-off) an eigendecomposition with eigenvalues clamped at δ' = max(δ, 1e-10·λ_max):
    L = Q Λ^{1/2}, which is logged. Either L gives ‖A L‖_F² = tr(A (G+δI) Aᵀ).
    """
    if not torch.isfinite(G).all():
        raise ValueError(f"{name}: Gram matrix holds NaN/Inf; the calibration activations overflowed "
                         "(use float32 or bfloat16 statistics input, or check the model weights)")
    G = G.double()
    n = G.shape[0]
    scale = G.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + damp * scale * eye)
    if int(info) == 0:
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        if torch.isfinite(Linv).all():
            return L, Linv
    evals, Q = torch.linalg.eigh((G + G.t()) / 2)
    floor = max(float(damp * scale), 1e-10 * float(evals.max().clamp_min(1e-30)))
    clamped = int((evals < floor).sum())
    log.info("%s: Gram matrix not positive definite (%d of %d eigenvalues below %.3g); "
             "using an eigendecomposition with clamped eigenvalues", name or "whitener", clamped, n, floor)
    root = evals.clamp_min(floor).sqrt()
    return Q * root, (Q / root).t()
