"""The eigh-based solvers (one symmetric eigendecomposition, no SVD, no L⁻¹) give the old SVD-based
answers: same Ŵ in float64, on tall, wide and square weights, rank-deficient and zero Gram matrices,
and ranks 1 .. min(in, out). The old algorithms are written out here as the references."""
import pytest
import torch
from ._data import inputs, stats_from, weight

from lrinfer.offline.calibration import LinearStats
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.linalg import factor_gram, singular_values, top_eigh, top_svd, whitener
from lrinfer.offline.solvers.saes import aces_beta


def old_truncated_svd(A, rank):
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank] * s[:rank], Vh[:rank].t()            # U Σ, V: U Vᵀ = [A]_r


def old_whitened(W, G, rank, damp=1e-6):
    L, Linv = whitener(G, damp)
    U, V = old_truncated_svd(W @ L, rank)
    return U @ (Linv.t() @ V).t()


def old_saes(W, gram_hat, cross, rank, beta, damp=1e-6):
    M, Minv = whitener(gram_hat, damp)
    S = W @ M
    D = W @ (cross - gram_hat) @ Minv.t()
    U, V = old_truncated_svd(S + beta * D, rank)
    return U @ (Minv.t() @ V).t()


def whitened_loss(W, What, G, damp=1e-6):
    E = W - What
    Gd = G + damp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    return float(torch.einsum("ij,jk,ik->", E, Gd, E))


SHAPES = [(24, 40), (40, 24), (32, 32)]     # wide (out < in), tall, square


@pytest.mark.parametrize("out,d", SHAPES)
@pytest.mark.parametrize("case", ["full", "few_tokens", "dead_channel", "zero"])
def test_svdllm_matches_svd_of_whitened_weight(out, d, case):
    X = inputs(12 if case == "few_tokens" else 400, d, seed=out + d)
    if case == "dead_channel":
        X[:, 3] = 0
    G = X.t() @ X * (0 if case == "zero" else 1)
    W = weight(out, d, seed=d)
    for rank in sorted({1, 5, min(out, d) // 2, min(out, d)}):
        pair = get_solver("svdllm")(W, LinearStats("l", n=X.shape[0], gram=G), rank)
        ref = old_whitened(W, G, rank)
        new_loss, ref_loss = whitened_loss(W, pair.dense(), G), whitened_loss(W, ref, G)
        assert new_loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12 * whitened_loss(W, 0 * W, G)), (rank, case)
        if rank == min(out, d):      # full rank reproduces W
            torch.testing.assert_close(pair.dense(), W, rtol=1e-9, atol=1e-9)


def test_factors_keep_the_old_split():
    """U = U_r Σ^{1/2} of W L, as before (the split that `balanced` starts from)."""
    X, W = inputs(300, 20), weight(30, 20)
    G = X.t() @ X
    pair = get_solver("svdllm")(W, LinearStats("l", n=300, gram=G), 6)
    L, _ = whitener(G)
    s = torch.linalg.svdvals(W @ L)[:6]
    torch.testing.assert_close(pair.U.norm(dim=0), s.sqrt(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("out,d", SHAPES)
@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_plain_truncations_match_svd(out, d, method):
    X = inputs(200, d)
    st = stats_from(X)
    W = weight(out, d)
    for rank in (1, 7, min(out, d)):
        pair = get_solver(method)(W, st, rank)
        s = (st.abs_sum / st.n).pow(0.5) + 1e-6 if method == "asvd" else torch.ones(d, dtype=torch.float64)
        U, V = old_truncated_svd(W * s, rank)
        torch.testing.assert_close(pair.dense(), (U @ V.t()) / s, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("out,d", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.4, None])
def test_saes_matches_old_cealc(out, d, beta):
    X = inputs(300, d, seed=1)
    X_hat = X + 0.1 * inputs(300, d, seed=2, outliers=False)
    st = stats_from(X, X_hat)
    W = weight(out, d, seed=3)
    rank = min(out, d) // 3
    pair = get_solver("saes")(W, st, rank, beta=beta)
    if beta is None:     # ACES's choice, from the old SVD-based targets
        M, Minv = whitener(st.gram_hat)
        beta = aces_beta(W @ M, W @ (st.cross - st.gram_hat) @ Minv.t(), rank)
    torch.testing.assert_close(pair.dense(), old_saes(W, st.gram_hat, st.cross, rank, beta), rtol=1e-7, atol=1e-9)


def test_eigh_helpers():
    A = weight(50, 30, seed=4)
    torch.testing.assert_close(singular_values(A), torch.linalg.svdvals(A), rtol=1e-10, atol=1e-12)
    for rank in (3, 25):          # the subset (LAPACK dsyevr) and full paths
        w, Q = top_eigh(A.t() @ A, rank)
        torch.testing.assert_close(w, torch.linalg.svdvals(A)[:rank] ** 2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(Q.t() @ Q, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)
    U, V = top_svd(A, 4)
    Ur, Vr = old_truncated_svd(A, 4)
    torch.testing.assert_close(U @ V.t(), Ur @ Vr.t(), rtol=1e-9, atol=1e-12)


def test_whitening_without_inverse_matches_whitener():
    X = inputs(100, 16)
    G = X.t() @ X
    L, Linv = whitener(G)
    w = factor_gram(G)
    B = torch.randn(16, 3, dtype=torch.float64)
    torch.testing.assert_close(w.right(torch.eye(16, dtype=torch.float64)), L)
    torch.testing.assert_close(w.inv_t(B), Linv.t() @ B)
    torch.testing.assert_close(w.inv(B), Linv @ B)
