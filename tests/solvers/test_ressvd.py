import pytest
import torch

from lrinfer import CompressConfig
from lrinfer.offline.selection.base import get_selection, ratio_within
from lrinfer.errors import LrinferError
from lrinfer.runtime.architecture import LinearInfo
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.ressvd import residual_rank
from lrinfer.offline.solvers.svdllm import whitened_truncation

from ._data import inputs, stats_from, weight

ressvd = get_solver("ressvd")


def whitened_err(W, What, G):
    return torch.sqrt(torch.trace((W - What) @ G @ (W - What).t()))


def test_residual_rank_rule():
    assert residual_rank(4096, 4096, 1638, 0.05) == 102       # α = 2048
    assert residual_rank(11008, 4096, 2000, 0.05) == 149      # α ≈ 2985
    assert residual_rank(64, 64, 1, 0.05) == 0                 # r1 ≥ 1
    assert residual_rank(64, 64, 2, 0.5) == 1


def test_split_and_params():
    X, W = inputs(500, 40), weight(40, 40)
    pair = ressvd(W, stats_from(X), 12, beta=0.1)             # α = 20 -> r2 = 2
    assert (pair.rank, pair.rank2) == (10, 2)
    assert pair.num_params == 12 * 80
    assert ressvd(W, stats_from(X), 1).rank2 == 0 and ressvd(W, stats_from(X), 1).U2 is None


def test_same_metric_equals_single_whitened_truncation():
    X, W = inputs(500, 40), weight(30, 40)
    st = stats_from(X)
    pair = ressvd(W, st, 12, beta=0.2, mode="same_metric")
    assert pair.rank2 > 0
    single = whitened_truncation(W, st.gram, 12)
    torch.testing.assert_close(pair.dense(), single.dense(), rtol=1e-8, atol=1e-10)


def test_plain_then_plain_equals_svd():
    X, W = inputs(300, 24), weight(20, 24)
    pair = ressvd(W, stats_from(X), 8, beta=0.2, mode="plain_then_plain")
    torch.testing.assert_close(pair.dense(), get_solver("svd")(W, None, 8).dense(), rtol=1e-8, atol=1e-10)


def test_default_differs_from_single_truncation_at_equal_params():
    # strongly anisotropic inputs: the whitened and the weight-space metrics disagree
    X, W = inputs(500, 40, outliers=True), weight(30, 40)
    st = stats_from(X)
    rank = 12
    rec = ressvd(W, st, rank, beta=0.2)                        # whiten_then_plain, r2 = 3
    single = whitened_truncation(W, st.gram, rank)
    assert rec.num_params == single.num_params
    diff = (rec.dense() - single.dense()).norm() / single.dense().norm()
    assert diff > 1e-3
    # Eckart–Young: the single truncation is optimal in the whitened metric, REC keeps weight energy
    assert whitened_err(W, rec.dense(), st.gram) > whitened_err(W, single.dense(), st.gram)
    assert (W - rec.dense()).norm() < (W - single.dense()).norm()


def test_bad_options():
    X, W = inputs(100, 16), weight(8, 16)
    with pytest.raises(LrinferError, match="beta"):
        ressvd(W, stats_from(X), 4, beta=1.0)
    with pytest.raises(LrinferError, match="mode"):
        ressvd(W, stats_from(X), 4, mode="whiten")


def _linears(n_blocks=10):
    out = []
    for b in range(n_blocks):
        for kind, (i, o) in {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                             "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}.items():
            out.append(LinearInfo(f"model.layers.{b}.{kind}", b, kind, i, o))
    return out


def test_last_selection():
    lins = _linears(10)
    select = get_selection("last")
    sel, r_l = select(lins, 0.2, k=4)
    assert {f.block for f in sel} == {6, 7, 8, 9}
    assert r_l == pytest.approx(0.2 * 10 / 4)
    assert r_l == pytest.approx(ratio_within(sel, lins, 0.2))
    sel, r_l = select(lins, 0.2)                               # derived: smallest k with R_l ≤ 0.6 -> 4
    assert {f.block for f in sel} == {6, 7, 8, 9} and r_l <= 0.6
    sel, r_l = select(lins, 0.2, cap=0.9)                      # -> k = 3, R_l = 0.667
    assert len({f.block for f in sel}) == 3
    sel, r_l = select(lins, 0.7)                               # ratio above the cap: every block
    assert len(sel) == len(lins) and r_l == pytest.approx(0.7)
    with pytest.raises(LrinferError):
        select(lins, 0.5, k=2)                                 # would need R_l = 2.5
    with pytest.raises(LrinferError, match="k must be"):
        select(lins, 0.2, k=11)


def test_ressvd_defaults_to_last_selection():
    assert CompressConfig(method="ressvd").selection == "last"
    assert CompressConfig(method="ressvd", selection="all").selection == "all"
