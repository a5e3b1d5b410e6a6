"""Tiny random Llama: compress → save → load → same logits; patch/unpatch; generate."""
import pytest
import torch

import lrinfer
from lrinfer.offline.allocation.base import achieved_ratio
from lrinfer.runtime.blocks import capture_inputs
from lrinfer.offline.calibration import linear_stages
from lrinfer.runtime.architecture import compressible_linears, decoder_blocks
from lrinfer.runtime.nn import LowRankLinear, lowrank_modules


@pytest.mark.parametrize("method", ["svd", "svdllm"])
def test_compress_save_load_same_logits(tmp_path, tiny_model, calib_ids, method):
    ids = torch.randint(0, 128, (2, 24))
    dense = tiny_model(ids).logits
    result = lrinfer.compress(tiny_model, lrinfer.CompressConfig(method=method, ratio=0.3, batch_size=4, rank_multiple=1),
                              calib_ids, progress=False)
    assert len(lowrank_modules(tiny_model)) == 14
    assert 0.3 <= achieved_ratio(result.linears, {n: sum(r) for n, r in result.ranks.items()}) < 0.33
    patched = tiny_model(ids).logits
    assert torch.isfinite(patched).all()
    assert not torch.allclose(patched, dense)
    lrinfer.save_checkpoint(tiny_model, None, tmp_path / "ck",
                            {"method": method, "ratio": 0.3, "ranks": result.ranks}, base_model="tiny")
    loaded, _ = lrinfer.load_checkpoint(tmp_path / "ck")
    assert len(lowrank_modules(loaded)) == 14
    torch.testing.assert_close(loaded(ids).logits, patched, rtol=0, atol=0)
    # tied/untied embeddings and every other dense tensor came back too
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_whitening_gives_smaller_output_error_than_plain_svd(calib_ids, make_tiny):
    errs = {}
    for method in ("svd", "svdllm"):
        model = make_tiny(layers=3)
        errs[method] = lrinfer.compress(model, lrinfer.CompressConfig(method=method, ratio=0.4, batch_size=4),
                                        calib_ids, progress=False).hidden_error[-1]
    assert errs["svdllm"] < errs["svd"]


def test_patch_unpatch_and_generate(tiny_model):
    ids = torch.randint(0, 128, (1, 5))
    dense = tiny_model(ids).logits
    names = [f.name for f in compressible_linears(tiny_model)]
    full = {}
    for n in names:  # full-rank factors reproduce the layer exactly
        W = tiny_model.get_submodule(n).weight.detach().double()
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        full[n] = lrinfer.FactorPair((U * s).float(), Vh.T.float())
    replaced = lrinfer.patch(tiny_model, full)
    assert isinstance(tiny_model.get_submodule(names[0]), LowRankLinear)
    torch.testing.assert_close(tiny_model(ids).logits, dense, rtol=1e-4, atol=1e-4)
    out = tiny_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    lrinfer.unpatch(tiny_model, replaced)
    assert not lowrank_modules(tiny_model)
    torch.testing.assert_close(tiny_model(ids).logits, dense)


def test_stages_follow_shared_inputs(tiny_model, calib_ids):
    _, blocks = decoder_blocks(tiny_model)
    streams = capture_inputs(tiny_model, blocks, calib_ids, 4, torch.device("cpu"))
    modules = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    stages = linear_stages(blocks[0], modules, streams.compressed[0], streams.calls[0][0])
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_module_filter_and_unknown_names(tiny_model, calib_ids):
    cfg = lrinfer.CompressConfig(method="svd", ratio=0.2, modules=["down_proj"])
    result = lrinfer.compress(tiny_model, cfg, calib_ids, progress=False)
    assert sorted(result.ranks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(lrinfer.LrinferError, match="q_proj"):
        compressible_linears(tiny_model, ["qkv_proj"])


def test_nan_weight_is_refused(tiny_model, calib_ids):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(lrinfer.LrinferError, match=r"layers\.1\.mlp\.up_proj.*NaN"):
        lrinfer.compress(tiny_model, lrinfer.CompressConfig(method="svd"), calib_ids, progress=False)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 2])
def test_bad_ratio(ratio):
    with pytest.raises(lrinfer.LrinferError, match="strictly between 0 and 1"):
        lrinfer.CompressConfig(ratio=ratio)


def test_unsupported_architecture_lists_supported(calib_ids):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    with pytest.raises(lrinfer.LrinferError, match="unsupported architecture 'gpt2'.*llama"):
        lrinfer.compress(model, lrinfer.CompressConfig(method="svd"), calib_ids, progress=False)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"])
def test_other_architectures_compress(arch, calib_ids):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svdllm", ratio=0.2, batch_size=4),
                              calib_ids, progress=False)
    kinds = {n.rsplit(".", 1)[-1] for n in result.ranks}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.isfinite(model(calib_ids[:1]).logits).all()


def test_compress_refuses_a_device_the_model_is_not_on():
    """`device` must name where the model's blocks run (same type; same index when both give one)."""
    from ._tiny import tiny_llama
    ids = torch.randint(0, 100, (2, 16))
    with pytest.raises(lrinfer.LrinferError, match="blocks run on cpu, not meta; move the model"):
        lrinfer.compress(tiny_llama(), lrinfer.CompressConfig(method="svd", ratio=0.3), ids, device="meta",
                         progress=False)
    result = lrinfer.compress(tiny_llama(), lrinfer.CompressConfig(method="svd", ratio=0.3), ids, device="cpu",
                              progress=False)
    assert result.ranks
