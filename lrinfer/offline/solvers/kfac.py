"""KFAC-SVD (arXiv 2610.32878): the truncation taken in a space whitened on both sides, by the input
covariance and by the covariance of the loss's output gradients (a Kronecker-factored curvature).

Row convention: X [N, in] the dense model's inputs of the linear, Γ [N, out] the gradients of the
summed next-token NLL L with respect to its outputs Y = X Wᵀ (one backward pass of the dense model on
the calibration text). Statistics: S = XᵀX = `gram` [in, in], G = ΓᵀΓ = `grad_gram` [out, out].

Loss minimised. Under K-FAC (per-linear, per-token Fisher F ≈ S ⊗ G: inputs and output gradients
taken independent), the second-order Taylor model of the NLL increase when W becomes Ŵ is

    ΔL ≈ ½ vec(ΔW)ᵀ (S ⊗ G) vec(ΔW) = ½ tr(G ΔW S ΔWᵀ),   ΔW = W − Ŵ,

and with any factors R Rᵀ = G, L Lᵀ = S, tr(G ΔW S ΔWᵀ) = ‖Rᵀ ΔW L‖_F². By Eckart–Young the best
rank-k Rᵀ Ŵ L is [Rᵀ W L]_k, so

    Ŵ = R⁻ᵀ [Rᵀ W L]_k L⁻¹        (= G^{-1/2} [G^{1/2} W S^{1/2}]_k S^{-1/2} with symmetric roots),

and the loss is exactly the sum of the dropped squared singular values of Rᵀ W L (unique when σ_k >
σ_{k+1}). G = I gives SVD-LLM (‖(W − Ŵ) L‖), S = I the output-weighted SVD (‖Rᵀ(W − Ŵ)‖).

Computed like `linalg.whitened_factors`, in float64, without an SVD or an explicit inverse: one
Cholesky (eigendecomposition fallback, `factor_gram`) of each side, then one symmetric
eigendecomposition of the smaller Gram of A = Rᵀ W L (`linalg.truncation`):
  out ≤ in:  B = top left singular vectors of A,  Ŵ = (R⁻ᵀ B)(Wᵀ R B)ᵀ
  out > in:  B = top right singular vectors of A, Ŵ = (W L B)(L⁻ᵀ B)ᵀ

Damping. S + δ_in I with δ_in = `damp`·mean(diag S) (1e-6, SVD-LLM's: S is full rank from thousands
of tokens, the ridge only guards round-off). G + δ_out I with δ_out = `grad_damp`·mean(diag G): G
is the curvature of the *local* Taylor model, estimated from a few dozen sequences; it is often
rank-deficient or very ill-conditioned (output directions the calibration loss barely moves, e.g.
value/key heads a few tokens dominate), and without the ridge the solver would treat errors in those
directions as free, which the Taylor model (exact only for small ΔW) and other text do not. The ridge
is the minimiser of tr(G ΔW S ΔWᵀ) + δ_out tr(ΔW S ΔWᵀ): K-FAC's Tikhonov damping, and a blend toward
SVD-LLM, which it becomes as grad_damp → ∞ (the solution is invariant to the scale of G + δ_out I).
grad_damp = 0 is the undamped K-FAC solution (a singular G then falls back to clamped eigenvalues).
Default 1.0: on SmolLM2 at 20% (bench/kfac_damping.py, test windows no result reports) held-apart
perplexity fell from 67.0 (0) through 66.4 (0.01) and 64.6 (0.1) to 62.6 (1.0); SVD-LLM (∞) 78.5.

SAES composition. SAES's CEALC objective whitened on the output side too,
‖(X̂(W − Ŵ)ᵀ) R‖² + α‖(XWᵀ − X̂Ŵᵀ) R‖², is by SAES's derivation (1+α)‖Rᵀ(Ŵ M − T)‖² + const with
M Mᵀ = X̂ᵀX̂ and the same target T = W M + β W Δ M⁻ᵀ, so Ŵ = R⁻ᵀ [Rᵀ T]_k M⁻¹: the KFAC truncation
with W L replaced by SAES's target. `kfac-saes` implements it (β by ACES on Rᵀ(W M) and Rᵀ(W Δ M⁻ᵀ));
it uses the dense model's G on the compressed stream (the K-FAC curvature at the dense point).
"""
from __future__ import annotations

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import Whitening, split_factor, factor_gram, truncation
from .saes import aces_beta, cealc_targets


def _factor_times(w: Whitening, B: torch.Tensor) -> torch.Tensor:
    """L B for the whitening factor L (L Lᵀ = G + δI), B [n, k]."""
    return B if w.kind == "identity" else w.L @ B


def output_whitening(G: torch.Tensor, grad_damp: float, name: str = "", device=None) -> Whitening:
    """R with R Rᵀ = G + grad_damp·mean(diag G)·I, G [out, out] the output-gradient Gram (float32 sums
    are read in float64). The ridge is added here, not as `factor_gram`'s round-off guard, so that a
    deliberate damping is not reported as a rank-deficient Gram."""
    if G is None:
        raise LrinferError(f"kfac: {name} has no output-gradient statistics; they need a backward pass of the "
                           "whole model on calibration data (compress an in-memory model, not a streamed one)")
    G = G.double().to(device)
    if not torch.isfinite(G).all():
        raise LrinferError(f"kfac: {name}: output-gradient Gram holds NaN/Inf; check the model and calibration text")
    shifted = G + grad_damp * float(G.diagonal().mean().clamp_min(0)) * torch.eye(G.shape[0], dtype=G.dtype,
                                                                                   device=G.device)
    return factor_gram(shifted, 1e-12, name)


def _check(W: torch.Tensor, S: torch.Tensor, G: torch.Tensor, damp: float, grad_damp: float, name: str) -> None:
    if damp < 0 or grad_damp < 0:
        raise LrinferError(f"kfac: damp and grad_damp must be >= 0; got damp={damp}, grad_damp={grad_damp}")
    if G is not None and tuple(G.shape) != (W.shape[0], W.shape[0]):
        raise LrinferError(f"kfac: {name}: output-gradient Gram {tuple(G.shape)} does not match the weight's "
                           f"{W.shape[0]} outputs")
    if S is not None and tuple(S.shape) != (W.shape[1], W.shape[1]):
        raise LrinferError(f"kfac: {name}: input Gram {tuple(S.shape)} does not match the weight's "
                           f"{W.shape[1]} inputs")


def two_sided_truncation(W: torch.Tensor, S: torch.Tensor, G: torch.Tensor, rank: int, damp: float = 1e-6,
                         grad_damp: float = 1.0, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, r], V [in, r]) with U Vᵀ = R⁻ᵀ [Rᵀ W L]_r L⁻¹ (L Lᵀ = S + δ_in I, R Rᵀ = G + δ_out I): the
    rank-r Ŵ minimising tr((G + δ_out I)(W − Ŵ)(S + δ_in I)(W − Ŵ)ᵀ). W [out, in], S [in, in], G [out, out]."""
    _check(W, S, G, damp, grad_damp, name)
    W = W.double()
    R = output_whitening(G, grad_damp, name, W.device)
    L = factor_gram(S.double().to(W.device), damp, name)
    A = L.right(R.right(W.t()).t())                  # Rᵀ W L
    B, s, side = truncation(A, rank)
    if side == "left":
        U, V = R.inv_t(B), W.t() @ _factor_times(R, B)
    else:
        U, V = W @ _factor_times(L, B), L.inv_t(B)
    return split_factor(U, V, s, side)


@register_solver("kfac", needs=("gram", "grad_gram"),
                 summary="KFAC-SVD: truncation whitened by input and output-gradient covariances (whole model)")
def solve(W: torch.Tensor, stats, rank: int, *, damp: float = 1e-6, grad_damp: float = 1.0) -> FactorPair:
    """W [out, in], stats.gram [in, in], stats.grad_gram [out, out] -> U [out, r], V [in, r] minimising
    tr((G + δ_out I) ΔW (S + δ_in I) ΔWᵀ), δ_out = grad_damp·mean(diag G), δ_in = damp·mean(diag S)."""
    return FactorPair(*two_sided_truncation(W, stats.gram, stats.grad_gram, rank, damp, grad_damp, stats.name))


@register_solver("kfac-saes", needs=("gram_hat", "cross", "grad_gram"),
                 summary="SAES's error-compensating target truncated in KFAC's output-gradient whitening")
def solve_saes(W: torch.Tensor, stats, rank: int, *, damp: float = 1e-6, grad_damp: float = 1.0,
               beta: float | None = None, beta_min: float = 0.25, beta_max: float = 0.75) -> FactorPair:
    """W [out, in] -> U [out, r], V [in, r]: Ŵ = R⁻ᵀ [Rᵀ(S + βD)]_r M⁻¹ with SAES's S = W M, D = W Δ M⁻ᵀ
    (M Mᵀ = gram_hat + δ_in I); β fixed, or (None) by ACES in [beta_min, beta_max] on Rᵀ S, Rᵀ D."""
    _check(W, stats.gram_hat, stats.grad_gram, damp, grad_damp, stats.name)
    if beta is not None and not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise LrinferError(f"kfac-saes: beta must be None (adaptive, ACES) or a number in [0, 1); got {beta!r}")
    if not 0 <= beta_min <= beta_max < 1:
        raise LrinferError(f"kfac-saes: need 0 <= beta_min <= beta_max < 1; got [{beta_min}, {beta_max}]")
    W = W.double()
    R = output_whitening(stats.grad_gram, grad_damp, stats.name, W.device)
    S, D, M = cealc_targets(W, stats.gram_hat, stats.cross, damp, stats.name)
    RS, RD = R.right(S.t()).t(), R.right(D.t()).t()      # Rᵀ S, Rᵀ D  [out, in]
    beta = aces_beta(RS, RD, rank, beta_min, beta_max) if beta is None else float(beta)
    T = RS + beta * RD
    B, s, side = truncation(T, rank)
    if side == "left":      # Ŵ = R⁻ᵀ B (Tᵀ B)ᵀ M⁻¹ = (R⁻ᵀ B)(M⁻ᵀ Tᵀ B)ᵀ
        U, V = R.inv_t(B), M.inv_t(T.t() @ B)
    else:                   # Ŵ = R⁻ᵀ T B (M⁻ᵀ B)ᵀ
        U, V = R.inv_t(T @ B), M.inv_t(B)
    return FactorPair(*split_factor(U, V, s, side))
