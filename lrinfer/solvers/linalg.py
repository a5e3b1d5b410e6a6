"""Whitening: factor a Gram matrix G = XᵀX as L Lᵀ, robustly."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar

import torch

log = logging.getLogger(__name__)


_fallbacks: ContextVar[dict | None] = ContextVar("lrinfer_fallbacks", default=None)


def note_fallback(kind: str, name: str, message: str, *args) -> None:
    """An expected numerical fallback of layer `name`: the details as a DEBUG log line (`--verbose`),
    the layer counted under `kind` inside `collect_fallbacks` (one summary line per run)."""
    log.debug(message, *args)
    notes = _fallbacks.get()
    if notes is not None and name not in notes.setdefault(kind, []):
        notes[kind].append(name)


@contextmanager
def collect_fallbacks():
    """Yields {kind: [layer names]} of the fallbacks noted inside the `with` block (kinds:
    `report.FALLBACKS`)."""
    token = _fallbacks.set({})
    try:
        yield _fallbacks.get()
    finally:
        _fallbacks.reset(token)


def whitener(G: torch.Tensor, damp: float = 1e-6, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with L Lᵀ = G + δI, G [in, in] symmetric PSD, δ = damp · mean(diag G).

    Lower Cholesky when G + δI is positive definite. Otherwise (rank-deficient or indefinite
    from round-off) an eigendecomposition with eigenvalues clamped at δ' = max(δ, 1e-10·λ_max):
    L = Q Λ^{1/2}, which is noted. Either L gives ‖A L‖_F² = tr(A (G+δI) Aᵀ).
    A Cholesky that succeeds only thanks to δ (pivots ≤ 100δ: rank-deficient G) is noted too, and a
    zero G (no calibration energy at all) gives L = I (plain SVD), noted (`note_fallback`).
    """
    if not torch.isfinite(G).all():
        raise ValueError(f"{name}: Gram matrix holds NaN/Inf; the calibration activations overflowed "
                         "(use float32 or bfloat16 statistics input, or check the model weights)")
    G = G.double()
    n = G.shape[0]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    if not float(G.diagonal().max()) > 0:
        # no calibration energy at all (the layer only saw zero inputs): with L ~ sqrt(δ)·I the factors
        # would be scaled by δ^{±1/4} (1e±9, inf in float16), so whiten with the identity (plain SVD)
        note_fallback("identity", name, "%s: Gram matrix is zero (the layer saw only zero inputs); whitening "
                      "with the identity (plain SVD of W)", name or "whitener")
        return eye.clone(), eye.clone()
    scale = G.diagonal().mean().clamp_min(1e-30)
    L, info = torch.linalg.cholesky_ex(G + damp * scale * eye)
    if int(info) == 0:
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        if torch.isfinite(Linv).all():
            # a pivot near δ is a direction the calibration data does not excite (fewer tokens than
            # features, repeated text): the ridge alone stands in for it there
            weak = int((L.diagonal().pow(2) <= 100 * damp * scale).sum())
            if weak:
                note_fallback("ridge", name, "%s: Gram matrix is rank-deficient (%d of %d directions carry "
                              "almost no calibration energy: too few or repeated calibration tokens); the ridge "
                              "δ = %.3g stands in for them", name or "whitener", weak, n, float(damp * scale))
            return L, Linv
    evals, Q = torch.linalg.eigh((G + G.t()) / 2)
    floor = max(float(damp * scale), 1e-10 * float(evals.max().clamp_min(1e-30)))
    clamped = int((evals < floor).sum())
    note_fallback("eigh", name, "%s: Gram matrix not positive definite (%d of %d eigenvalues below %.3g); "
                  "using an eigendecomposition with clamped eigenvalues", name or "whitener", clamped, n, floor)
    root = evals.clamp_min(floor).sqrt()
    return Q * root, (Q / root).t()
