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


def test_balanced_keeps_the_product_and_equalizes_column_norms():
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-4, 4, 6, dtype=torch.float64)            # badly scaled columns
    U, V = torch.randn(20, 6, generator=g, dtype=torch.float64) * scale, torch.randn(12, 6, generator=g,
                                                                                      dtype=torch.float64) / scale
    U[:, 2] = 0                                                        # a dead column stays as it is
    U2, V2 = torch.randn(20, 3, generator=g, dtype=torch.float64) * 1e3, torch.randn(12, 3, generator=g,
                                                                                      dtype=torch.float64)
    p = FactorPair(U, V, U2, V2)
    b = p.balanced()
    torch.testing.assert_close(b.dense(), p.dense(), rtol=1e-12, atol=1e-12)
    live = torch.arange(6) != 2
    torch.testing.assert_close(b.U.norm(dim=0)[live], b.V.norm(dim=0)[live], rtol=1e-12, atol=0)
    torch.testing.assert_close(b.U2.norm(dim=0), b.V2.norm(dim=0), rtol=1e-12, atol=0)
    assert torch.equal(b.V[:, 2], V[:, 2])


def test_compressed_factors_are_balanced(tiny_model, calib_ids):
    import lrinfer
    res = lrinfer.compress(tiny_model, lrinfer.CompressConfig(method="svdllm", ratio=0.4, n_samples=4, seq_len=32),
                           calib_ids[:4, :32], progress=False)
    for pair in res.factors.values():
        torch.testing.assert_close(pair.U.norm(dim=0), pair.V.norm(dim=0), rtol=1e-4, atol=1e-6)
