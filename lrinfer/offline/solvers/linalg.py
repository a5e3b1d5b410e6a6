"""Whitening (factor a Gram matrix G = XᵀX as L Lᵀ, robustly) and exact truncations through one symmetric
eigendecomposition."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

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


@dataclass
class Whitening:
    """A factor L of G + δI (L Lᵀ = G + δI), kept in the form it was computed in, so that
    A ↦ A L and V ↦ L⁻ᵀ V need no explicit inverse: a lower Cholesky factor (`kind` "cholesky"),
    Q Λ^{1/2} from an eigendecomposition with clamped eigenvalues ("eigh"), or the identity
    ("identity", for a zero G)."""
    kind: str
    n: int
    L: torch.Tensor | None = None           # [in, in]: lower triangular, or Q·√Λ
    Q: torch.Tensor | None = None           # "eigh": eigenvectors [in, in]
    root: torch.Tensor | None = None        # "eigh": √Λ (clamped) [in]

    def right(self, A: torch.Tensor) -> torch.Tensor:
        """A L, A [m, in]."""
        return A if self.kind == "identity" else A @ self.L

    def inv_t(self, V: torch.Tensor) -> torch.Tensor:
        """L⁻ᵀ V, V [in, k]."""
        if self.kind == "identity":
            return V
        if self.kind == "eigh":
            return (self.Q / self.root) @ V
        return torch.linalg.solve_triangular(self.L.t(), V, upper=True)

    def inv(self, X: torch.Tensor) -> torch.Tensor:
        """L⁻¹ X, X [in, k]."""
        if self.kind == "identity":
            return X
        if self.kind == "eigh":
            return (self.Q / self.root).t() @ X
        return torch.linalg.solve_triangular(self.L, X, upper=False)

    def inverse(self) -> torch.Tensor:
        """L⁻¹ [in, in]."""
        eye = torch.eye(self.n, dtype=torch.float64, device=self.L.device if self.L is not None else None)
        if self.kind == "identity":
            return eye
        if self.kind == "eigh":
            return (self.Q / self.root).t()
        return torch.linalg.solve_triangular(self.L, eye, upper=False)


def factor_gram(G: torch.Tensor, damp: float = 1e-6, name: str = "") -> Whitening:
    """The `Whitening` of G [in, in] (symmetric PSD): L Lᵀ = G + δI, δ = damp · mean(diag G).

    Lower Cholesky when G + δI is positive definite. Otherwise (rank-deficient or indefinite
    from round-off) an eigendecomposition with eigenvalues clamped at δ' = max(δ, 1e-10·λ_max):
    L = Q Λ^{1/2}, which is noted. Either L gives ‖A L‖_F² = tr(A (G+δI) Aᵀ).
    A Cholesky that succeeds only thanks to δ (pivots ≤ 100δ: rank-deficient G) is noted too, and a
    zero G (no calibration energy at all) gives L = I (plain SVD), noted (`note_fallback`).
    Memory: G and one more [in, in] buffer (G + δI, factored in place; no identity matrix, no inverse).
    """
    if not torch.isfinite(G).all():
        raise ValueError(f"{name}: Gram matrix holds NaN/Inf; the calibration activations overflowed "
                         "(use float32 or bfloat16 statistics input, or check the model weights)")
    G = G.double()
    n = G.shape[0]
    if not float(G.diagonal().max()) > 0:
        # no calibration energy at all (the layer only saw zero inputs): with L ~ sqrt(δ)·I the factors
        # would be scaled by δ^{±1/4} (1e±9, inf in float16), so whiten with the identity (plain SVD)
        note_fallback("identity", name, "%s: Gram matrix is zero (the layer saw only zero inputs); whitening "
                      "with the identity (plain SVD of W)", name or "whitener")
        return Whitening("identity", n)
    scale = G.diagonal().mean().clamp_min(1e-30)
    shifted = G.clone()
    shifted.diagonal().add_(damp * scale)
    try:        # in place: G + δI becomes L (one [in, in] buffer, 6 GiB at 70B's MLP width)
        L, info = torch.linalg.cholesky_ex(shifted, out=(shifted, torch.empty((), dtype=torch.int32,
                                                                              device=G.device)))
    except RuntimeError:
        L, info = torch.linalg.cholesky_ex(shifted)
    del shifted
    pivots = L.diagonal()
    if int(info) == 0 and torch.isfinite(L).all() and float(pivots.min()) > 1e-150:
        # a pivot near δ is a direction the calibration data does not excite (fewer tokens than
        # features, repeated text): the ridge alone stands in for it there
        weak = int((pivots.pow(2) <= 100 * damp * scale).sum())
        if weak:
            note_fallback("ridge", name, "%s: Gram matrix is rank-deficient (%d of %d directions carry "
                          "almost no calibration energy: too few or repeated calibration tokens); the ridge "
                          "δ = %.3g stands in for them", name or "whitener", weak, n, float(damp * scale))
        return Whitening("cholesky", n, L)
    del L
    evals, Q = torch.linalg.eigh((G + G.t()) / 2)
    floor = max(float(damp * scale), 1e-10 * float(evals.max().clamp_min(1e-30)))
    clamped = int((evals < floor).sum())
    note_fallback("eigh", name, "%s: Gram matrix not positive definite (%d of %d eigenvalues below %.3g); "
                  "using an eigendecomposition with clamped eigenvalues", name or "whitener", clamped, n, floor)
    root = evals.clamp_min(floor).sqrt()
    return Whitening("eigh", n, Q * root, Q, root)


def whitener(G: torch.Tensor, damp: float = 1e-6, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with L Lᵀ = G + δI, G [in, in] symmetric PSD: `factor_gram` with its inverse formed
    (for solvers that need L⁻¹ itself, e.g. SAES's W Δ M⁻ᵀ)."""
    w = factor_gram(G, damp, name)
    if w.kind == "identity":
        eye = torch.eye(w.n, dtype=torch.float64, device=G.device)
        return eye, eye.clone()
    return (w.L, w.inverse())


# --------------------------------------------------------------------------- exact truncations via eigh
#
# The best rank-r approximation of A [m, n] is the projection of A onto its top-r left singular vectors
# (U_r U_rᵀ A) or, equally, onto its top-r right ones (A V_r V_rᵀ). Those are the top-r eigenvectors of
# the smaller Gram matrix, A Aᵀ [m, m] or Aᵀ A [n, n], so one symmetric eigendecomposition of a
# min(m, n)-square matrix replaces an SVD of the m × n matrix (SVD-LLM V2, Swift-SVD): the same
# subspace, exactly, in exact arithmetic. Writing the factors as the projection (U_r, Aᵀ U_r) needs no
# division by singular values, so rank min(m, n) reproduces A exactly and rank-deficient A is safe.
# Forming A Aᵀ squares the singular values: in float64 every kept direction with σ ≥ ~1e-7 σ_max is
# resolved to round-off (the cut falls far above that for LLM weights); the float32 check is in
# tests/solvers/test_fast_solves.py and the README's "Numerics".

def _subset_pays(n: int, rank: int) -> bool:
    """CPU: LAPACK's subset eigensolver (dsyevr, via scipy) beats torch's full `eigh` (dsyevd) when the
    kept rank is under ~30% of n, and at every rank from n ≈ 1024 up (measured, one thread: n = 576
    rank 58: 0.055 s vs 0.10 s; n = 2048 rank 922: 3.0 s vs 5.1 s)."""
    return rank <= 0.3 * n or n >= 1024


def top_eigh(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs of a symmetric M [n, n]: (eigenvalues [rank] descending, vectors [n, rank]).

    On the CPU, where it pays (`_subset_pays`), LAPACK computes only those (scipy's dsyevr, a
    truncated decomposition); otherwise, and on GPUs, `torch.linalg.eigh` (all of them)."""
    n = M.shape[0]
    rank = min(rank, n)
    if M.device.type == "cpu" and _subset_pays(n, rank) and M.dtype in (torch.float64, torch.float32):
        try:
            import scipy.linalg
        except ImportError:
            pass
        else:
            w, Q = scipy.linalg.eigh(M.numpy(), subset_by_index=[n - rank, n - 1], driver="evr",
                                     overwrite_a=False, check_finite=False)
            return torch.from_numpy(w.copy()).flip(0), torch.from_numpy(Q.copy()).flip(1)
    w, Q = torch.linalg.eigh(M)
    return w[-rank:].flip(0), Q[:, -rank:].flip(1)


def truncation(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The top-`rank` singular subspace of A [m, n] from one eigendecomposition of the smaller Gram
    matrix: (basis [m or n, r] orthonormal, σ [r] descending, side) with side "left" (m ≤ n: the basis is
    U_r, [A]_r = U_r U_rᵀ A) or "right" (m > n: the basis is V_r, [A]_r = A V_r V_rᵀ)."""
    m, n = A.shape
    if m <= n:
        w, B = top_eigh(A @ A.t(), rank)
        side = "left"
    else:
        w, B = top_eigh(A.t() @ A, rank)
        side = "right"
    return B, w.clamp_min(0).sqrt(), side


def singular_pairs(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r [m, r], σ [r], V_r [n, r]) of A [m, n], both bases, from one eigendecomposition of the smaller
    Gram (the other side as Aᵀ U_r / σ or A V_r / σ; directions with σ ≈ 0 come out near zero)."""
    B, s, side = truncation(A, rank)
    inv = torch.where(s > 1e-150 * s.max().clamp_min(1e-300), 1 / s.clamp_min(1e-300), torch.zeros_like(s))
    if side == "left":
        return B, s, (A.t() @ B) * inv
    return (A @ B) * inv, s, B


def top_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [m, r], V [n, r]) with U Vᵀ = [A]_r, the best rank-r approximation of A [m, n], singular values
    split evenly (U = U_r Σ^{1/2}, V = V_r Σ^{1/2}); one eigendecomposition of the smaller Gram matrix."""
    B, s, side = truncation(A, rank)
    U, V = (B, A.t() @ B) if side == "left" else (A @ B, B)
    return split_factor(U, V, s, side)


def split_factor(U: torch.Tensor, V: torch.Tensor, s: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale projection factors (one side orthonormal, the other carrying σ) to U_r Σ^{1/2} and the
    matching V, leaving U Vᵀ unchanged (columns with σ ≈ 0 are left as they are)."""
    ok = s > 1e-150 * s.max().clamp_min(1e-300)
    root = torch.where(ok, s, torch.ones_like(s)).sqrt()
    c = root if side == "left" else 1 / root       # left: U is orthonormal; right: U = A V_r has norms σ
    return U * c, V / c


def whitened_factors(W: torch.Tensor, G: torch.Tensor, rank: int, damp: float = 1e-6,
                     name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation, exactly: (U [out, r], V [in, r]) with U Vᵀ = [W L]_r L⁻¹ (L Lᵀ = G + δI), the
    rank-r Ŵ minimising ‖(W − Ŵ) L‖_F. One Cholesky of G + δI and one eigendecomposition of the smaller
    Gram of A = W L; no SVD and no L⁻¹:

      out ≤ in:  Ŵ = U_r U_rᵀ W          (U_r: top eigenvectors of A Aᵀ [out, out])
      out > in:  Ŵ = (A V_r)(L⁻ᵀ V_r)ᵀ   (V_r: top eigenvectors of Aᵀ A [in, in]; L⁻ᵀ by a triangular solve)

    Factors as `truncated_svd` + `split_sigma` of W L gave: U = U_r Σ^{1/2}, V = L⁻ᵀ V_r Σ^{1/2}."""
    w = factor_gram(G, damp, name)
    A = w.right(W)
    B, s, side = truncation(A, rank)
    U, V = (B, W.t() @ B) if side == "left" else (A @ B, w.inv_t(B))
    return split_factor(U, V, s, side)


def singular_values(A: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of A [m, n], descending, as √ of the eigenvalues of the smaller Gram
    matrix (values below ~1e-8 σ_max are round-off: fine for spectra statistics such as D-Rank's
    effective rank, not for solving)."""
    m, n = A.shape
    w = torch.linalg.eigvalsh(A @ A.t() if m <= n else A.t() @ A)
    return w.clamp_min(0).sqrt().flip(0)
