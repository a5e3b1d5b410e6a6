import logging

import torch

from lrinfer.offline.calibration import LinearStats
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.linalg import whitener


def _data(n=400, d_in=48, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix    # correlated, anisotropic inputs
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return X, W


def test_whitening_loss_equals_truncated_singular_values():
    X, W = _data()
    G = X.T @ X
    for k in (1, 7, 20):
        pair = get_solver("svdllm")(W, LinearStats("t", n=X.shape[0], gram=G), k, damp=0.0)
        loss = (X @ (W - pair.dense()).T).pow(2).sum()
        s = torch.linalg.svdvals(W @ torch.linalg.cholesky(G))
        torch.testing.assert_close(loss, s[k:].pow(2).sum(), rtol=1e-8, atol=1e-8)


def test_whitening_beats_plain_svd_on_activation_loss():
    X, W = _data(seed=1)
    stats = LinearStats("t", n=X.shape[0], gram=X.T @ X)
    act = lambda p: (X @ (W - p.dense()).T).pow(2).sum()  # noqa: E731
    assert act(get_solver("svdllm")(W, stats, 10)) < 0.9 * act(get_solver("svd")(W, stats, 10))


def test_plain_svd_is_eckart_young():
    _, W = _data(seed=2)
    pair = get_solver("svd")(W, None, 5)
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close((W - pair.dense()).pow(2).sum(), s[5:].pow(2).sum())


def test_singular_gram_falls_back_without_nan(caplog):
    caplog.set_level(logging.DEBUG, logger="lrinfer")
    X, W = _data(n=10)                         # 10 tokens, 48 features: rank-deficient Gram
    G = X.T @ X
    G[:, 0] = G[0, :] = 0.0                    # and a dead input channel
    L, Linv = whitener(G, damp=0.0, name="dead")
    assert torch.isfinite(L).all() and torch.isfinite(Linv).all()
    assert "not positive definite" in caplog.text
    pair = get_solver("svdllm")(W, LinearStats("t", n=10, gram=G), 8)
    assert all(torch.isfinite(t).all() for t in pair.tensors().values())
    # On the data it saw, rank 8 already captures most of the (rank-10) activation energy.
    assert (X @ (W - pair.dense()).T).pow(2).sum() < 0.5 * (X @ W.T).pow(2).sum()
