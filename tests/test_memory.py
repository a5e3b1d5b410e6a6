"""Peak RSS of loading (fresh subprocesses): a compressed checkpoint peaks below the dense one,
and lower at a higher ratio. Mid-size random Llama (hidden 512, 8 layers; ~100 MiB of fp32 linears)."""
import importlib.util
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
_spec = importlib.util.spec_from_file_location("bench_memory", _BENCH)
bench_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_memory)


def _mid_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    # random weights without the (slow) initialisers: memory depends only on shapes
    g = torch.Generator().manual_seed(0)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its buffers were emptied by to_empty
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # random factors with the uniform ranks of each ratio: solving SVDs would add ~20 s per ratio
    # here, and the memory depends only on the shapes (bench/memory.py uses real SVD factors)
    return bench_memory.make_checkpoints(_mid_llama(), [0.2, 0.6], tmp_path_factory.mktemp("mem"),
                                         base_model="mid-llama", factors="random")


def test_compressed_load_peaks_below_dense(checkpoints):
    rows = {(r["checkpoint"], r["loader"]): r for r in bench_memory.run(checkpoints, gen=2, device="cpu")}
    dense = rows["dense", "hf"]
    # dense linears: 8 × (4·512² + 3·512·1408) fp32 ≈ 98 MiB; ratio r removes about r of that
    assert dense["params_mb"] > 100
    for loader in ("hf", "lrinfer"):
        lo, hi = rows["svd-0.2", loader], rows["svd-0.6", loader]
        assert hi["params_mb"] < lo["params_mb"] < dense["params_mb"]
        # the saving is real, not noise: at least half of the parameter bytes saved show up in the peak
        assert dense["load_mb"] - hi["load_mb"] > 0.5 * (dense["params_mb"] - hi["params_mb"]), (loader, rows)
        assert lo["load_mb"] - hi["load_mb"] > 0.5 * (lo["params_mb"] - hi["params_mb"]), (loader, rows)
        assert hi["generate_mb"] < dense["generate_mb"], (loader, rows)
    # from_pretrained at 0.2 (lrinfer.load_checkpoint copies the file into memory, so its 0.2 peak
    # sits within a few MiB of the mmapped dense load here and is not compared)
    assert rows["svd-0.2", "hf"]["load_mb"] < dense["load_mb"], rows
