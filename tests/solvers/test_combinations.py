"""Every solver × allocator end to end on a tiny random Llama (GQA: 4 heads, 2 KV heads)."""
import pytest
import torch
import transformers

import lrinfer
from lrinfer.offline.allocation.base import achieved_ratio
from lrinfer.offline.solvers.base import SOLVERS

IDS = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(0))


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("allocation", ["uniform", "drank"])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_compress_every_solver_allocator(method, allocation):
    model = _tiny_llama()
    res = lrinfer.compress(model, lrinfer.CompressConfig(method=method, ratio=0.3, allocation=allocation,
                                                         batch_size=4, rank_multiple=1), IDS, progress=False)
    with torch.no_grad():
        logits = model(IDS[:2]).logits
    assert torch.isfinite(logits).all()
    ranks = {n: sum(k) for n, k in res.ranks.items()}
    achieved = achieved_ratio(res.linears, ranks)
    assert 0.3 - 1e-9 <= achieved <= 0.34, achieved
    if method == "ressvd":                      # PLC: only the last blocks, default cap 0.6 -> k = 2 of 4
        assert {int(n.split(".")[2]) for n in ranks} == {2, 3}
        assert any(k[1] > 0 for k in res.ranks.values())
    else:
        assert len(ranks) == 28
