import pytest
import torch

from lrinfer.factors import FactorPair, rank_for_ratio


@pytest.mark.parametrize("inp,out,ratio,mult", [(576, 576, 0.2, 1), (576, 1536, 0.4, 8), (4096, 11008, 0.2, 64),
                                                 (100, 7, 0.5, 1), (1536, 576, 0.99, 8)])
def test_rank_for_ratio_is_the_nearest_multiple(inp, out, ratio, mult):
    k = rank_for_ratio(inp, out, ratio, mult)
    exact = (1 - ratio) * inp * out / (inp + out)
    assert 1 <= k <= min(inp, out)
    if mult == 1:
        assert k == int(exact)                     # SVD-LLM's floor
    elif k > mult:                                 # not clamped at the floor
        assert k % mult == 0 and abs(k - exact) <= mult / 2


def test_rank_for_ratio_formula():
    # k·(in+out) ≈ (1−r)·in·out: 576x576 at 20% -> floor(0.8*576*576/1152) = 230 -> 224 at multiple 8
    assert rank_for_ratio(576, 576, 0.2) == 230
    assert rank_for_ratio(576, 576, 0.2, 8) == 232
    assert rank_for_ratio(8, 8, 0.99, 8) == 8       # floor: min(multiple, min(in, out))
    assert rank_for_ratio(3, 5, 0.99, 1) == 1


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_rank_for_ratio_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(10, 10, ratio)


def test_factor_pair_dense_and_shape_checks():
    U, V, U2, V2 = torch.randn(5, 3), torch.randn(7, 3), torch.randn(5, 2), torch.randn(7, 2)
    p = FactorPair(U, V, U2, V2)
    torch.testing.assert_close(p.dense(), U @ V.T + U2 @ V2.T)
    assert (p.rank, p.rank2, p.num_params) == (3, 2, 5 * 12)
    with pytest.raises(ValueError, match="must be"):
        FactorPair(torch.randn(5, 3), torch.randn(7, 4))
    with pytest.raises(ValueError, match="both"):
        FactorPair(U, V, U2, None)
