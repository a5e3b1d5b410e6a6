"""Tensor-parallel sharding of LowRankLinear, simulated on CPU; the docs/serving.md example; the vLLM
plugin's import guard."""
import re
from pathlib import Path

import pytest
import torch

from lrinfer import FactorPair, LowRankLinear
from lrinfer.serving import (expand_reduced, input_slice, row_parallel_partial, shard_column_parallel,
                             shard_row_parallel)


def _layer(in_f=64, out_f=96, k=12, k2=0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pair = FactorPair(torch.randn(out_f, k, generator=g, dtype=torch.float64),
                      torch.randn(in_f, k, generator=g, dtype=torch.float64),
                      torch.randn(out_f, k2, generator=g, dtype=torch.float64) if k2 else None,
                      torch.randn(in_f, k2, generator=g, dtype=torch.float64) if k2 else None)
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    return LowRankLinear.from_factors(pair, b)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("k2", [0, 4])
def test_column_parallel_concat_is_full_output(world, k2):
    layer = _layer(k2=k2)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    shards = [shard_column_parallel(layer, r, world) for r in range(world)]
    assert all(s.V.shape == layer.V.shape and s.U.shape[0] == 96 // world for s in shards)
    with torch.no_grad():
        y = torch.cat([s(x) for s in shards], dim=-1)  # all-gather
        torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("k2", [0, 4])
def test_row_parallel_sum_is_full_output(world, k2):
    layer = _layer(k2=k2)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    shards = [shard_row_parallel(layer, r, world) for r in range(world)]
    assert all(s.U.shape == layer.U.shape and s.V.shape[0] == 64 // world for s in shards)
    assert [s.bias is not None for s in shards] == [True] + [False] * (world - 1)
    with torch.no_grad():
        ref = layer(x)
        y = sum(row_parallel_partial(s, input_slice(x, r, world)) for r, s in enumerate(shards))  # all-reduce
        torch.testing.assert_close(y, ref)
        # reducing in rank space: send k (+k2) values per token instead of out
        t = sum(row_parallel_partial(s, input_slice(x, r, world), reduce="rank") for r, s in enumerate(shards))
        assert t.shape[-1] == layer.rank + layer.rank2
        torch.testing.assert_close(expand_reduced(shards[0], t), ref)


def test_column_then_row_parallel_mlp_needs_one_all_reduce():
    """up (column) → down (row): each rank feeds its own output block straight into its down shard."""
    up, down, world = _layer(64, 128, 16, seed=1), _layer(128, 64, 16, seed=2), 4
    x = torch.randn(7, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = down(torch.relu(up(x)))
        y = sum(shard_row_parallel(down, r, world)(torch.relu(shard_column_parallel(up, r, world)(x)))
                for r in range(world))
        torch.testing.assert_close(y, ref)


def test_indivisible_sizes_are_refused():
    with pytest.raises(ValueError, match="out_features = 96 is not divisible"):
        shard_column_parallel(_layer(), 0, 5)
    with pytest.raises(ValueError, match="out of range"):
        shard_row_parallel(_layer(), 2, 2)


def test_docs_example_runs():
    """The ```python block marked `# example: tp` in docs/serving.md runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# example: tp")]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/serving.md", "exec"), {})


def test_vllm_plugin_without_vllm():
    """vLLM is not installed here: importing the plugin works, registering says what to install."""
    import importlib.util

    import lrinfer.vllm_plugin as plugin
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; this checks the import guard only")
    with pytest.raises(ImportError, match="pip install vllm"):
        plugin.register()
    # the name mapping used for vLLM's fused layers is plain Python
    assert plugin.shard_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert plugin.shard_names("model.layers.3.mlp.down_proj") == ["model.layers.3.mlp.down_proj"]
