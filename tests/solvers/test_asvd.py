import pytest
import torch

from lrinfer.errors import LrinferError
from lrinfer.offline.solvers.base import get_solver, truncated_svd

from ._data import inputs, stats_from, weight

asvd = get_solver("asvd")


def test_matches_scaled_svd_reference():
    X, W = inputs(400, 24), weight(16, 24)
    st = stats_from(X)
    pair = asvd(W, st, 6)
    s = (X.abs().mean(0)) ** 0.5 + 1e-6
    U, S, Vh = truncated_svd(W * s, 6)
    ref = (U * S) @ Vh / s
    assert pair.U.shape == (16, 6) and pair.V.shape == (24, 6) and pair.U.dtype == torch.float64
    torch.testing.assert_close(pair.dense(), ref, rtol=1e-10, atol=1e-12)
    # it is optimal in the scaled metric: no worse there than plain SVD
    plain = get_solver("svd")(W, st, 6).dense()
    assert ((W - pair.dense()) * s).norm() <= ((W - plain) * s).norm() + 1e-12


def test_alpha_zero_is_plain_svd():
    X, W = inputs(200, 20), weight(12, 20)
    pair = asvd(W, stats_from(X), 5, alpha=0.0)
    torch.testing.assert_close(pair.dense(), get_solver("svd")(W, None, 5).dense(), rtol=1e-8, atol=1e-10)


def test_alpha_one_and_bad_options():
    X, W = inputs(200, 20), weight(12, 20)
    assert torch.isfinite(asvd(W, stats_from(X), 4, alpha=1.0).dense()).all()
    with pytest.raises(LrinferError, match="alpha"):
        asvd(W, stats_from(X), 4, alpha=-1.0)
    with pytest.raises(LrinferError, match="no option"):
        asvd(W, stats_from(X), 4, beta=0.5)
