"""KFAC-SVD: the two-sided (input covariance S, output-gradient covariance G) truncation against float64
references: alternating least squares on tr(G ΔW S ΔWᵀ), SVD-LLM (G = I), output-weighted SVD (S = I),
damping on rank-deficient G; the output-gradient statistic against autograd; composition on a tiny model."""
import pytest
import torch

import lrinfer
from lrinfer.offline.allocation.base import achieved_ratio
from lrinfer.offline.calibration import LinearStats, output_gradient_grams
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.kfac import two_sided_truncation
from lrinfer.offline.solvers.svdllm import whitened_truncation

from .._tiny import tiny_llama
from ._data import inputs, weight


def grads(n: int, out: int, seed: int) -> torch.Tensor:
    """Output gradients Γ [n, out]: correlated, a few dominant output directions (like an LM's)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, out, dtype=torch.float64)
    mix = torch.randn(out, out, generator=g, dtype=torch.float64) / out ** 0.5
    return (torch.randn(n, out, generator=g, dtype=torch.float64) * scale) @ mix


def kfac_loss(W, What, S, G) -> float:
    D = W - What
    return float(torch.trace(G @ D @ S @ D.t()))


def als_minimum(W, S, G, rank: int, seed: int, iters: int = 3000) -> float:
    """min over rank-`rank` Ŵ of tr(G ΔW S ΔWᵀ) by alternating least squares on U, V (G, S positive
    definite): U = W S V (Vᵀ S V)⁻¹, Vᵀ = (Uᵀ G U)⁻¹ Uᵀ G W — each step an exact minimisation."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(W.shape[1], rank, generator=g, dtype=torch.float64)
    prev = float("inf")
    for _ in range(iters):
        U = W @ S @ V @ torch.linalg.inv(V.t() @ S @ V)
        V = (torch.linalg.inv(U.t() @ G @ U) @ U.t() @ G @ W).t()
        U, _ = torch.linalg.qr(U)       # re-orthonormalise for conditioning (U Vᵀ unchanged after the next step)
        V = (torch.linalg.inv(U.t() @ G @ U) @ U.t() @ G @ W).t()
        cur = kfac_loss(W, U @ V.t(), S, G)
        if prev - cur <= 1e-15 * max(cur, 1e-300):
            break
        prev = cur
    return cur


def product(pair) -> torch.Tensor:
    """U Vᵀ of a FactorPair or a (U, V) tuple."""
    U, V = (pair.U, pair.V) if hasattr(pair, "U") else pair
    return U @ V.t()


@pytest.mark.parametrize("out,d,rank", [(6, 10, 2), (12, 7, 3), (9, 9, 4)])
def test_matches_als_and_beats_random_perturbations(out, d, rank):
    seed = out * 100 + d
    X, Gam = inputs(200, d, seed), grads(300, out, seed + 1)
    S, G, W = X.t() @ X, Gam.t() @ Gam, weight(out, d, seed + 2)
    What = product(two_sided_truncation(W, S, G, rank, damp=0.0, grad_damp=0.0))
    assert torch.linalg.matrix_rank(What) == rank
    best = kfac_loss(W, What, S, G)
    # the loss is the dropped squared singular values of G^{1/2} W S^{1/2} (symmetric roots, via eigh)
    def root(M):
        w, Q = torch.linalg.eigh(M)
        return (Q * w.sqrt()) @ Q.t()
    sv = torch.linalg.svdvals(root(G) @ W @ root(S))
    assert best == pytest.approx(float(sv[rank:].pow(2).sum()), rel=1e-9)
    als = min(als_minimum(W, S, G, rank, seed=s) for s in range(3))
    assert best <= als * (1 + 1e-9)
    assert als <= best * (1 + 1e-6)                   # ALS reaches the same minimum: nothing better exists
    g = torch.Generator().manual_seed(seed + 3)
    U, V = two_sided_truncation(W, S, G, rank, damp=0.0, grad_damp=0.0)
    for eps in (1e-2, 1e-4):
        for _ in range(50):
            Up = U + eps * torch.randn(U.shape, generator=g, dtype=torch.float64)
            Vp = V + eps * torch.randn(V.shape, generator=g, dtype=torch.float64)
            assert kfac_loss(W, Up @ Vp.t(), S, G) >= best * (1 - 1e-12)


@pytest.mark.parametrize("out,d", [(8, 12), (12, 8)])
def test_identity_output_side_is_svdllm(out, d):
    X, W = inputs(100, d, out + d), weight(out, d, 3)
    S = X.t() @ X
    for G in (torch.eye(out, dtype=torch.float64), 7.5 * torch.eye(out, dtype=torch.float64)):
        got = product(two_sided_truncation(W, S, G, 3, damp=1e-6, grad_damp=0.0))
        torch.testing.assert_close(got, product(whitened_truncation(W, S, 3, damp=1e-6)), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("out,d", [(8, 12), (12, 8)])
def test_identity_input_side_is_weighted_svd(out, d):
    Gam, W = grads(150, out, out + d), weight(out, d, 4)
    G = Gam.t() @ Gam
    # reference: Ŵ = G^{-1/2} [G^{1/2} W]_k with symmetric roots and a full SVD
    w, Q = torch.linalg.eigh(G)
    half, inv_half = (Q * w.sqrt()) @ Q.t(), (Q / w.sqrt()) @ Q.t()
    Us, s, Vh = torch.linalg.svd(half @ W)
    ref = inv_half @ (Us[:, :3] * s[:3]) @ Vh[:3]
    got = product(two_sided_truncation(W, torch.eye(d, dtype=torch.float64), G, 3, damp=0.0, grad_damp=0.0))
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


def test_damping_solves_the_damped_loss_and_blends_to_svdllm():
    out, d, rank = 10, 14, 3
    X, W = inputs(120, d, 5), weight(out, d, 6)
    S = X.t() @ X
    Gam = grads(3, out, 7)                       # 3 gradient tokens: G has rank 3 of 10
    G = Gam.t() @ Gam
    assert int(torch.linalg.matrix_rank(G)) == 3
    # undamped: finite, and the minimum of the singular loss, Σ_{i>k} σ_i²(Γ W L) (Γ full row rank)
    U, V = two_sided_truncation(W, S, G, rank, damp=0.0, grad_damp=0.0)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    sv = torch.linalg.svdvals(Gam @ W @ torch.linalg.cholesky(S))
    assert kfac_loss(W, U @ V.t(), S, G) == pytest.approx(float(sv[rank:].pow(2).sum()), rel=1e-6)
    # damped: the exact minimiser of tr((G + λ·mean diag G·I) ΔW S ΔWᵀ), checked by ALS
    lam = 0.3
    Gd = G + lam * float(G.diagonal().mean()) * torch.eye(out, dtype=torch.float64)
    damped = product(two_sided_truncation(W, S, G, rank, damp=0.0, grad_damp=lam))
    assert kfac_loss(W, damped, S, Gd) <= min(als_minimum(W, S, Gd, rank, seed=s) for s in range(3)) * (1 + 1e-9)
    # the ridge trades G-weighted error for input-whitened error (the directions G cannot see) ...
    svdllm = product(whitened_truncation(W, S, rank, damp=0.0))
    undamped = U @ V.t()

    def input_err(Wh):
        return kfac_loss(W, Wh, S, torch.eye(out, dtype=torch.float64))
    assert input_err(svdllm) <= input_err(damped) <= input_err(undamped)
    assert kfac_loss(W, undamped, S, G) <= kfac_loss(W, damped, S, G) <= kfac_loss(W, svdllm, S, G)
    # ... and becomes SVD-LLM as it grows
    torch.testing.assert_close(product(two_sided_truncation(W, S, G, rank, damp=0.0, grad_damp=1e12)), svdllm,
                               rtol=1e-7, atol=1e-9)


def test_zero_gradients_fall_back_to_svdllm():
    X, W = inputs(80, 9, 8), weight(6, 9, 9)
    S = X.t() @ X
    got = product(two_sided_truncation(W, S, torch.zeros(6, 6, dtype=torch.float64), 2, damp=1e-6))
    torch.testing.assert_close(got, product(whitened_truncation(W, S, 2, damp=1e-6)), rtol=1e-9, atol=1e-11)


def test_bad_input_is_one_line_error():
    X, W = inputs(50, 8, 10), weight(5, 8, 11)
    stats = LinearStats("blk.lin", n=50, gram=X.t() @ X)
    solve = get_solver("kfac")
    with pytest.raises(lrinfer.LrinferError, match="no output-gradient statistics"):
        solve(W, stats, 2)
    stats.grad_gram = torch.eye(4)
    with pytest.raises(lrinfer.LrinferError, match="does not match the weight's 5 outputs"):
        solve(W, stats, 2)
    stats.grad_gram = torch.eye(5)
    with pytest.raises(lrinfer.LrinferError, match="grad_damp must be >= 0"):
        solve(W, stats, 2, grad_damp=-1.0)
    stats.grad_gram = torch.full((5, 5), float("nan"))
    with pytest.raises(lrinfer.LrinferError, match="NaN"):
        solve(W, stats, 2)


def test_kfac_saes_output_side_identity_is_saes():
    """With G = I the output whitening is the identity and kfac-saes is SAES itself (same β by ACES)."""
    X = inputs(120, 10, 12)
    Xh = X + 0.1 * inputs(120, 10, 13, outliers=False)
    W = weight(7, 10, 14)
    stats = LinearStats("lin", n=120, gram_hat=Xh.t() @ Xh, cross=X.t() @ Xh, grad_gram=torch.eye(7))
    got = product(get_solver("kfac-saes")(W, stats, 3, grad_damp=0.0))
    torch.testing.assert_close(got, product(get_solver("saes")(W, stats, 3)), rtol=1e-9, atol=1e-11)


def test_kfac_saes_minimises_the_output_weighted_cealc_objective():
    """Fixed β: Ŵ minimises ‖X̂(W − Ŵ)ᵀR‖² + α‖(XWᵀ − X̂Ŵᵀ)R‖² (α = β/(1−β), R Rᵀ = G) — checked by ALS
    on its normal equations (the objective is tr(G (Ŵ − T') H (Ŵ − T')ᵀ) + const, T' = W(H + βΔ)H⁻¹)."""
    X = inputs(150, 9, 15)
    Xh = X + 0.2 * inputs(150, 9, 16, outliers=False)
    W, Gam = weight(6, 9, 17), grads(100, 6, 18)
    G, H, beta, rank = Gam.t() @ Gam, Xh.t() @ Xh, 0.4, 2
    stats = LinearStats("lin", n=150, gram_hat=H, cross=X.t() @ Xh, grad_gram=G)
    What = product(get_solver("kfac-saes")(W, stats, rank, damp=0.0, grad_damp=0.0, beta=beta))
    alpha = beta / (1 - beta)

    def f(Wh):
        R = torch.linalg.cholesky(G)
        return float((Xh @ (W - Wh).t() @ R).pow(2).sum() + alpha * (X @ W.t() @ R - Xh @ Wh.t() @ R).pow(2).sum())
    Delta = X.t() @ Xh - H
    target = W @ (H + beta * Delta) @ torch.linalg.inv(H)
    als = min(als_minimum(target, H, G, rank, seed=s) for s in range(3))
    assert f(What) == pytest.approx(f(target) + (1 + alpha) * als, rel=1e-7)


def test_output_gradient_grams_match_autograd():
    model = tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    got = output_gradient_grams(model, names, ids, batch_size=3)
    # reference: each batch's summed NLL, outputs retained, their gradients by autograd, in float64
    ref = {n: torch.zeros(model.get_submodule(n).out_features, model.get_submodule(n).out_features,
                          dtype=torch.float64) for n in names}
    for batch in ids.split(3):
        outs = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
                 for n in names]
        logits = model(batch).logits
        for h in hooks:
            h.remove()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        gs = torch.autograd.grad(nll, [outs[n] for n in names])
        for n, g in zip(names, gs):
            g = g.reshape(-1, g.shape[-1]).double()
            ref[n] += g.t() @ g
    for n in names:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-6 * float(ref[n].abs().max()))
    assert all(p.grad is None for p in model.parameters())            # no weight gradient was formed
    assert all(p.requires_grad for p in model.parameters())           # flags restored
    # per-token gradients of the summed NLL: one sequence at a time (what compress does) gives the same Grams
    one = output_gradient_grams(model, names, ids, batch_size=1)
    for n in names:
        torch.testing.assert_close(one[n].double(), ref[n], rtol=1e-4, atol=1e-6 * float(ref[n].abs().max()))


@pytest.mark.parametrize("method", ["kfac", "kfac-saes"])
def test_composes_with_selection_allocation_refinement(method):
    model = tiny_llama(layers=4, seed=0)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    config = lrinfer.CompressConfig(method=method, ratio=0.3, selection="last", allocation="drank",
                                    refinement="blockfit", batch_size=4, rank_multiple=1)
    res = lrinfer.compress(model, config, ids, progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2]).logits).all()
    ranks = {n: sum(k) for n, k in res.ranks.items()}
    assert 0.3 - 1e-9 <= achieved_ratio(res.linears, ranks) <= 0.34
    assert {int(n.split(".")[2]) for n in ranks} < {0, 1, 2, 3}      # `last`: only the last blocks
    assert res.refinement                                              # blockfit ran


def test_compress_plumbs_gradients_to_the_solver():
    """Through `compress`: kfac with an overwhelming ridge is SVD-LLM, with the real G it is not, and
    every solved linear received its own [out, out] output-gradient Gram."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))

    def run(method, **opts):
        model = tiny_llama(layers=2, seed=1)
        cfg = lrinfer.CompressConfig(method=method, ratio=0.3, batch_size=4, rank_multiple=1, method_options=opts)
        return lrinfer.compress(model, cfg, ids, progress=False).factors

    svdllm, blended, kfac = run("svdllm"), run("kfac", grad_damp=1e12), run("kfac", grad_damp=0.0)
    for name, pair in svdllm.items():
        ref = pair.U.double() @ pair.V.double().t()
        torch.testing.assert_close(blended[name].U.double() @ blended[name].V.double().t(), ref,
                                   rtol=1e-4, atol=1e-5)
    assert max(float((kfac[n].U.double() @ kfac[n].V.double().t() - svdllm[n].U.double() @ svdllm[n].V.double().t())
                     .norm() / svdllm[n].U.double().norm()) for n in svdllm) > 1e-2


def test_streamed_model_is_refused(tmp_path):
    from lrinfer.runtime.streaming import load_streamed
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(lrinfer.LrinferError, match="cannot stream"):
        lrinfer.compress(load_streamed(tmp_path / "m"), lrinfer.CompressConfig(method="kfac"), ids, progress=False)
