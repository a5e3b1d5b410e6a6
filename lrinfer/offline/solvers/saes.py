"""SAES-SVD (arXiv 2602.03051): CEALC closed form with ACES adaptive β.

Row convention (X [N, in]; the paper is column convention). X̂ = inputs of the compressed-so-far
model (sequential pass), X = the dense model's inputs for the same tokens. Statistics:
H = gram_hat = X̂ᵀX̂, C = cross = XᵀX̂, Δ = C − H = (X − X̂)ᵀX̂ (the paper's (X_f − X)Xᵀ).

CEALC objective (Eq. 3), with α ≥ 0:

    f(Ŵ) = ‖X̂(W − Ŵ)ᵀ‖_F² + α‖XWᵀ − X̂Ŵᵀ‖_F²

Derivation. Expanding both terms and dropping what does not depend on Ŵ:
    f = (1+α) tr(Ŵ H Ŵᵀ) − 2 tr(W H Ŵᵀ) − 2α tr(W C Ŵᵀ) + const
      = (1+α) [tr(Ŵ H Ŵᵀ) − 2 tr(W (H + βΔ) Ŵᵀ)] + const,     β = α/(1+α) ∈ [0, 1)
since (H + αC)/(1+α) = (1−β)H + βC = H + βΔ. With H = M Mᵀ (M from `whitener`, on H + δI),
    ‖Ŵ M − T‖² = tr(Ŵ H Ŵᵀ) − 2 tr(Ŵ M Tᵀ) + ‖T‖²,
which matches the bracket when M Tᵀ = (H+βΔ)ᵀ Wᵀ, i.e. T = W(H + βΔ)M⁻ᵀ. So
    f = (1+α)‖Ŵ M − G(β)‖² + const,   G(β) = W M + β W Δ M⁻ᵀ = S + βD   [out, in]
and by Eckart–Young Ŵ = [G(β)]_r M⁻¹: U = Ũ Σ^{1/2} [out, r], V = M⁻ᵀ Ṽ Σ^{1/2} [in, r], computed as
the projection onto the top eigenvectors of the smaller Gram of G(β) (`linalg.truncation`; no SVD, and
M⁻¹ only through triangular solves).
The ridge δI (`damp`, relative to mean diag H) is used in both H and the target, so the
solution is the exact minimiser of f + (1+α)δ‖W − Ŵ‖², and β = 0 equals SVD-LLM whitening on
the compressed-path inputs (`whitened_truncation(W, gram_hat, r)`) exactly.

ACES (Eq. 14–19, FS-FOA): β* maximises the retained energy ratio RER(β) = Σ_{i≤r}σ_i²(G)/‖G‖².
With U_r, V_r the top-r singular vectors of S, P_L = I − U_rU_rᵀ, P_R = I − V_rV_rᵀ,
S⊥ = P_L S P_R, D⊥ = P_L D P_R, the tail ratio is approximated by
    ρ̃²(β) = (a + 2bβ + cβ²)/(A + 2Bβ + Cβ²),  a=‖S⊥‖², b=⟨S⊥,D⊥⟩, c=‖D⊥‖², A=‖S‖², B=⟨S,D⟩, C=‖D‖²,
minimised over the stationary points (cB−bC)β² + (cA−aC)β + (bA−aB) = 0 inside
[beta_min, beta_max] and the two endpoints. Default interval [0.25, 0.75] (paper Table 4, read as
a β interval). The paper's optional β_cap / shrink ρ have no published defaults and are omitted
(β_cap is covered by beta_max). Cost: one symmetric eigendecomposition of the smaller Gram of S and
one of G(β*) per layer (each the same subspace as the SVD it replaces).
"""
from __future__ import annotations

import logging
import math

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from .base import register_solver
from .linalg import Whitening, split_factor, factor_gram, singular_pairs, truncation

log = logging.getLogger(__name__)


def cealc_targets(W: torch.Tensor, gram_hat: torch.Tensor, cross: torch.Tensor, damp: float = 1e-6,
                  name: str = "") -> tuple[torch.Tensor, torch.Tensor, Whitening]:
    """(S = W M [out, in], D = W Δ M⁻ᵀ [out, in], M) with M Mᵀ = gram_hat + δI (a `Whitening`: M⁻¹ is
    applied by triangular solves, never formed), Δ = cross − gram_hat."""
    M = factor_gram(gram_hat, damp, name)
    delta = cross.double().to(W.device) - gram_hat.double().to(W.device)
    return M.right(W), M.inv(delta.t() @ W.t()).t(), M


def retained_energy(G: torch.Tensor, rank: int) -> float:
    """Exact RER: Σ_{i≤rank} σ_i² / Σ σ_i² of G."""
    s2 = torch.linalg.svdvals(G).pow(2)
    return float(s2[:rank].sum() / s2.sum().clamp_min(1e-300))


def aces_beta(S: torch.Tensor, D: torch.Tensor, rank: int, beta_min: float = 0.25, beta_max: float = 0.75
              ) -> float:
    """FS-FOA choice of β in [beta_min, beta_max] minimising the approximate tail ratio ρ̃²(β)."""
    U, s, V = singular_pairs(S, rank)
    A, B, C = float(S.pow(2).sum()), float((S * D).sum()), float(D.pow(2).sum())
    # With P_L = I − U Uᵀ, P_R = I − V Vᵀ (U, V: S's top singular vectors), S_p = P_L S P_R = S − U Σ Vᵀ and
    # D_p = P_L D P_R; their norms and inner product from Uᵀ D and D V alone (2 products, not 8):
    UtD, DV = U.t() @ D, D @ V
    a = max(A - float(s.pow(2).sum()), 0.0)                           # ‖S_p‖²
    b = B - float((s * (UtD * V.t()).sum(1)).sum())                   # ⟨S_p, D_p⟩ = ⟨S_p, D⟩
    c = max(C - float(UtD.pow(2).sum()) - float(DV.pow(2).sum()) + float((UtD @ V).pow(2).sum()), 0.0)

    def rho2(x):
        return (a + 2 * b * x + c * x * x) / max(A + 2 * B * x + C * x * x, 1e-300)

    cands = [beta_min, beta_max]
    q2, q1, q0 = c * B - b * C, c * A - a * C, b * A - a * B
    scale = max(abs(q2), abs(q1), abs(q0), 1e-300)
    q2, q1, q0 = q2 / scale, q1 / scale, q0 / scale
    if abs(q2) > 1e-12:
        disc = q1 * q1 - 4 * q2 * q0
        if disc >= 0:
            sq = math.sqrt(disc)
            cands += [(-q1 + sq) / (2 * q2), (-q1 - sq) / (2 * q2)]
    elif abs(q1) > 1e-12:
        cands.append(-q0 / q1)
    cands = [x for x in cands if beta_min <= x <= beta_max]
    return min(cands, key=lambda x: (rho2(x), x))


@register_solver("saes", needs=("gram_hat", "cross"),
                 summary="SAES-SVD: CEALC closed form on compressed-path inputs, ACES adaptive β")
def solve(W: torch.Tensor, stats, rank: int, *, beta: float | None = None, beta_min: float = 0.25,
          beta_max: float = 0.75, damp: float = 1e-6) -> FactorPair:
    """W [out, in], stats.gram_hat / stats.cross [in, in] -> U [out, r], V [in, r].

    Minimises ‖X̂(W − U Vᵀ)ᵀ‖² + α‖XWᵀ − X̂ (U Vᵀ)ᵀ‖², α = β/(1−β): Ŵ = [W M + βWΔM⁻ᵀ]_r M⁻¹.
    beta=None: ACES picks β in [beta_min, beta_max] per layer; a number fixes it (0 = SVD-LLM on X̂).
    """
    if beta is not None and not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise LrinferError(f"saes: beta must be None (adaptive, ACES) or a number in [0, 1); got {beta!r}")
    if not 0.0 <= beta_min <= beta_max < 1.0:
        raise LrinferError(f"saes: need 0 <= beta_min <= beta_max < 1; got beta_min={beta_min}, "
                           f"beta_max={beta_max}")
    if damp < 0:
        raise LrinferError(f"saes: damp must be >= 0; got {damp}")
    if stats.gram_hat is None or stats.cross is None:
        raise LrinferError(f"saes: {stats.name} lacks gram_hat/cross statistics (it needs the two-stream "
                           "sequential calibration pass)")
    S, D, M = cealc_targets(W, stats.gram_hat, stats.cross, damp, stats.name)
    b = aces_beta(S, D, rank, beta_min, beta_max) if beta is None else float(beta)
    log.debug("saes: %s rank %d beta %.4f", stats.name, rank, b)
    G = S.add_(D, alpha=b) if b else S
    del D
    B, s, side = truncation(G, rank)          # Ŵ = [G]_r M⁻¹: U_r U_rᵀ G M⁻¹, or G V_r V_rᵀ M⁻¹
    U, V = (B, M.inv_t(G.t() @ B)) if side == "left" else (G @ B, M.inv_t(B))
    return FactorPair(*split_factor(U, V, s, side))
