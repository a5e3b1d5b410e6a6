import pytest
import torch

from lrinfer.errors import LrinferError
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.saes import aces_beta, cealc_targets, retained_energy
from lrinfer.offline.solvers.svdllm import whitened_truncation

from ._data import inputs, stats_from, weight

saes = get_solver("saes")


def _streams(n=600, d=32, noise=0.3, seed=0):
    """Dense inputs X and compressed-path inputs X̂ = X + structured error."""
    X = inputs(n, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    E = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return X, X + noise * E / d ** 0.5


def objective(W, What, X, Xh, beta):
    """CEALC in row convention: ‖X̂(W − Ŵ)ᵀ‖² + α‖XWᵀ − X̂Ŵᵀ‖², α = β/(1−β)."""
    alpha = beta / (1 - beta)
    return float((Xh @ (W - What).t()).pow(2).sum() + alpha * (X @ W.t() - Xh @ What.t()).pow(2).sum())


def reduced_rank_regression(W, X, Xh, beta, rank):
    """Independent reference: stack both terms into one regression Y ≈ Z Ŵᵀ, then the classical
    reduced-rank solution (OLS, then project the fitted values on their top-r right singular vectors)."""
    a = (beta / (1 - beta)) ** 0.5
    Z = torch.cat([Xh, a * Xh])
    Y = torch.cat([Xh @ W.t(), a * X @ W.t()])
    B = torch.linalg.lstsq(Z, Y).solution                     # [in, out]
    _, _, Vh = torch.linalg.svd(Z @ B, full_matrices=False)
    P = Vh[:rank].t() @ Vh[:rank]
    return (B @ P).t()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.6, 0.9])
def test_closed_form_matches_reduced_rank_regression(beta):
    X, Xh = _streams()
    W = weight(24, 32)
    pair = saes(W, stats_from(X, Xh), 7, beta=beta, damp=0.0)
    ref = reduced_rank_regression(W, X, Xh, beta, 7)
    f_ours, f_ref = objective(W, pair.dense(), X, Xh, beta), objective(W, ref, X, Xh, beta)
    assert f_ours == pytest.approx(f_ref, rel=1e-9)
    torch.testing.assert_close(pair.dense(), ref, rtol=1e-6, atol=1e-8)


def test_closed_form_is_a_minimum_against_perturbations_and_descent():
    X, Xh = _streams(seed=1)
    W, beta, r = weight(16, 32, seed=2), 0.5, 5
    pair = saes(W, stats_from(X, Xh), r, beta=beta, damp=0.0)
    f0 = objective(W, pair.dense(), X, Xh, beta)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        U = pair.U + 1e-3 * torch.randn(pair.U.shape, generator=g, dtype=torch.float64)
        V = pair.V + 1e-3 * torch.randn(pair.V.shape, generator=g, dtype=torch.float64)
        assert objective(W, U @ V.t(), X, Xh, beta) >= f0
    # brute force: LBFGS on (U, V) from a random start (objective in Gram form, tiny) never beats it
    U = torch.randn(16, r, generator=g, dtype=torch.float64).requires_grad_()
    V = torch.randn(32, r, generator=g, dtype=torch.float64).requires_grad_()
    opt = torch.optim.LBFGS([U, V], max_iter=200, line_search_fn="strong_wolfe")
    alpha = beta / (1 - beta)
    H, C, G = Xh.t() @ Xh, X.t() @ Xh, X.t() @ X

    def closure():
        opt.zero_grad()
        E = W - U @ V.t()
        What = U @ V.t()
        f = (torch.trace(E @ H @ E.t()) + alpha * (torch.trace(W @ G @ W.t()) - 2 * torch.trace(W @ C @ What.t())
                                                   + torch.trace(What @ H @ What.t())))
        f.backward()
        return f
    for _ in range(3):
        opt.step(closure)
    f_gd = objective(W, (U @ V.t()).detach(), X, Xh, beta)
    assert f0 <= f_gd * (1 + 1e-9)
    assert f_gd == pytest.approx(f0, rel=1e-3)


def test_beta_zero_equals_whitened_truncation_on_gram_hat():
    X, Xh = _streams(seed=3)
    W = weight(20, 32)
    st = stats_from(X, Xh)
    pair = saes(W, st, 6, beta=0.0)
    torch.testing.assert_close(pair.dense(), whitened_truncation(W, st.gram_hat, 6).dense(), rtol=1e-8, atol=1e-10)


def test_no_error_stream_is_svdllm():
    X = inputs(400, 24)
    W = weight(16, 24)
    st = stats_from(X)                                          # X̂ = X: Δ = 0, every β is the same
    torch.testing.assert_close(saes(W, st, 5).dense(), get_solver("svdllm")(W, st, 5).dense(),
                               rtol=1e-8, atol=1e-10)


def _rer_grid(S, D, r, lo, hi, n=201):
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    rer = torch.tensor([retained_energy(S + float(b) * D, r) for b in grid])
    return grid, rer


def test_aces_interior_optimum_matches_grid_search():
    # constructed: D cancels the tail of S (helps) but adds orthogonal tail energy (hurts):
    # tail(β) ≈ (1−β)²a + β²t, minimum at β = a/(a+t) = 0.4 for t = 1.5a
    torch.manual_seed(0)
    n, r = 20, 6
    Q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 5, r), torch.linspace(1.0, 0.5, n - r)]).double()
    S = Q1 @ torch.diag(s) @ Q2.t()
    tail = Q1[:, r:] @ torch.diag(s[r:]) @ Q2[:, r:].t()
    T = Q1[:, r:] @ torch.roll(torch.diag(s[r:]), 1, 0) @ Q2[:, r:].t()   # ⊥ tail, same energy
    D = -tail + (1.5 ** 0.5) * T
    b = aces_beta(S, D, r, 0.0, 0.99)
    grid, rer = _rer_grid(S, D, r, 0.0, 0.99)
    best = float(grid[rer.argmax()])
    assert 0.05 < best < 0.9 and abs(b - best) < 0.05
    assert retained_energy(S + b * D, r) >= float(rer.max()) - 1e-3 * float(rer.max() - rer.min())
    # the interval clips it
    assert aces_beta(S, D, r, 0.6, 0.75) == pytest.approx(0.6)


def _aces_by_projection(S, D, r, lo, hi):
    """ACES's β with P_L S P_R, P_L D P_R formed explicitly (float64 SVD), on a fine grid."""
    U, _, Vh = torch.linalg.svd(S)
    PL = torch.eye(S.shape[0], dtype=S.dtype) - U[:, :r] @ U[:, :r].t()
    PR = torch.eye(S.shape[1], dtype=S.dtype) - Vh[:r].t() @ Vh[:r]
    Sp, Dp = PL @ S @ PR, PL @ D @ PR
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    rho2 = torch.stack([(Sp + b * Dp).pow(2).sum() / (S + b * D).pow(2).sum() for b in grid])
    return float(grid[rho2.argmin()])


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_aces_beta_matches_explicit_projections(shape):
    """The closed-form tail terms (from Uᵀ D and D V only) choose the β that explicit projections do."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        S = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
            torch.logspace(0, -2, shape[1], dtype=torch.float64))
        U, sv, Vh = torch.linalg.svd(S, full_matrices=False)
        tail = U[:, 8:] @ torch.diag(sv[8:]) @ Vh[8:]
        noise = torch.randn(*shape, generator=g, dtype=torch.float64)   # D undoes S's tail, adds its own
        D = -tail + noise * (1.5 * tail.pow(2).sum() / noise.pow(2).sum()).sqrt()
        assert aces_beta(S, D, 8, 0.0, 0.99) == pytest.approx(_aces_by_projection(S, D, 8, 0.0, 0.99), abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aces_on_real_statistics_near_grid_optimum(seed):
    X, Xh = _streams(seed=seed, noise=1.0)
    W = weight(24, 32, seed=seed + 5)
    st = stats_from(X, Xh)
    S, D, _ = cealc_targets(W, st.gram_hat, st.cross)
    b = aces_beta(S, D, 8)
    assert 0.25 <= b <= 0.75
    _, rer = _rer_grid(S, D, 8, 0.25, 0.75, 51)
    assert retained_energy(S + b * D, 8) >= float(rer.max()) - 0.05 * float(rer.max() - rer.min())


def test_bad_options():
    X, Xh = _streams(n=100, d=8)
    W, st = weight(4, 8), stats_from(X, Xh)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(LrinferError, match="beta"):
            saes(W, st, 2, beta=bad)
    with pytest.raises(LrinferError, match="beta_min"):
        saes(W, st, 2, beta_min=0.8, beta_max=0.5)
    with pytest.raises(LrinferError, match="gram_hat"):
        saes(W, stats_from(X).__class__("x", gram=st.gram), 2)
