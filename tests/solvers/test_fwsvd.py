import pytest
import torch

from lrinfer.offline.calibration import LinearStats
from lrinfer.errors import LrinferError
from lrinfer.offline.solvers.base import get_solver, truncated_svd

from ._data import weight

fwsvd = get_solver("fwsvd")


def _fisher(out, d, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(out, d, generator=g, dtype=torch.float64) ** 4 * torch.logspace(-3, 0, out, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("axis", ["out", "in"])
def test_matches_weighted_svd_reference(axis):
    W, F = weight(16, 24), _fisher(16, 24)
    pair = fwsvd(W, LinearStats("l", fisher=F), 5, axis=axis)
    imp = F.sum(1) if axis == "out" else F.sum(0)
    d = (imp + 1e-5 * imp.mean()).sqrt()
    if axis == "out":
        U, S, Vh = truncated_svd(d[:, None] * W, 5)
        ref = (U * S / d[:, None]) @ Vh
        weighted = lambda A: d[:, None] * A  # noqa: E731
    else:
        U, S, Vh = truncated_svd(W * d, 5)
        ref = (U * S) @ Vh / d
        weighted = lambda A: A * d  # noqa: E731
    torch.testing.assert_close(pair.dense(), ref, rtol=1e-10, atol=1e-12)
    plain = get_solver("svd")(W, None, 5).dense()
    assert weighted(W - pair.dense()).norm() < weighted(W - plain).norm()


def test_uniform_fisher_is_plain_svd():
    W = weight(10, 14)
    pair = fwsvd(W, LinearStats("l", fisher=torch.ones(10, 14, dtype=torch.float64)), 4)
    torch.testing.assert_close(pair.dense(), get_solver("svd")(W, None, 4).dense(), rtol=1e-8, atol=1e-10)


def test_bad_inputs():
    W = weight(10, 14)
    with pytest.raises(LrinferError, match="axis"):
        fwsvd(W, LinearStats("l", fisher=torch.ones(10, 14, dtype=torch.float64)), 4, axis="rows")
    with pytest.raises(LrinferError, match="Fisher"):
        fwsvd(W, LinearStats("l"), 4)
    # a zero Fisher (no gradient reached the layer) falls back to the plain SVD, logged
    zero = fwsvd(W, LinearStats("l", fisher=torch.zeros(10, 14, dtype=torch.float64)), 4)
    torch.testing.assert_close(zero.dense(), get_solver("svd")(W, None, 4).dense(), rtol=1e-8, atol=1e-10)
