"""End-to-end decode benchmark: Llama-2-7B-shaped model (random weights), dense vs low-rank.

Two engines, both with random weights (no download) and every decoder linear low-rank at rank
k = floor((1 - r) in out / (in + out)) (multiple of 8) for each reduction r:

  graph (default)  bench/decoder.py: a minimal Llama decoder with a static KV cache whose decode
                   step is captured in ONE CUDA graph and replayed per token (dense and low-rank
                   alike), so launch overhead does not hide the difference. Layers are
                   `lrinfer.LowRankLinear`. Also reports the eager rate and peak memory.
  hf               transformers' LlamaForCausalLM from `LlamaConfig`, its nn.Linear replaced by
                   a module calling `lrinfer.runtime.kernels.lowrank_linear`; `generate` with a static KV
                   cache; with --compile both sides are wrapped in torch.compile(mode="reduce-overhead").

    python bench/bench_e2e.py --layers 32 --batch 1 8 32 --reductions 0.4
    python bench/bench_e2e.py --engine hf --layers 32 --batch 1 8 32 --compile
    python bench/bench_e2e.py --layers 4 --reductions 0.4 --new-tokens 32     # quick check
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # lrinfer importable from a plain checkout (the GPU machine has no install)
    sys.path.insert(0, _ROOT)


class LRLinear(nn.Module):
    """y = (x V) Uᵀ + bias through lrinfer.runtime.kernels.lowrank_linear."""

    def __init__(self, V, U, bias=None):
        super().__init__()
        self.V = nn.Parameter(V, requires_grad=False)  # shape [in, k]
        self.U = nn.Parameter(U, requires_grad=False)  # shape [out, k]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        from lrinfer.runtime.kernels import lowrank_linear

        return lowrank_linear(x, self.V, self.U, self.bias)


def rank_for(in_f, out_f, reduction):
    """The rank `compress` emits for this ratio (uniform allocation, the default rank multiple)."""
    from lrinfer import CompressConfig, rank_for_ratio

    return rank_for_ratio(in_f, out_f, reduction, CompressConfig.rank_multiple)


@torch.no_grad()
def factorize(lin: nn.Linear, k: int, how: str):
    """(V [in, k], U [out, k]) from truncated SVD of W, or random factors of the same shape."""
    W = lin.weight
    if how == "svd":
        Uw, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        s = S[:k].sqrt()
        return (Vh[:k].t() * s).to(W.dtype).contiguous(), (Uw[:, :k] * s).to(W.dtype).contiguous()
    out_f, in_f = W.shape
    V = torch.randn(in_f, k, device=W.device, dtype=W.dtype) / in_f**0.5
    U = torch.randn(out_f, k, device=W.device, dtype=W.dtype) * W.std() * (in_f / k) ** 0.5
    return V, U


def compress(model, reduction: float, how: str):
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                k = rank_for(mod.in_features, mod.out_features, reduction)
                V, U = factorize(mod, k, how)
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], LRLinear(V, U, mod.bias))
    torch.cuda.empty_cache()


def build_model(layers: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


@torch.no_grad()
def decode_rate(model, batch, prompt_len, new_tokens, compile_: bool):
    """(tokens/s of decode only, peak GiB) with a static KV cache and greedy decoding."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(new_tokens + 1)  # warm-up / compile / graph capture
    gen(1)
    torch.cuda.reset_peak_memory_stats()
    t_full = min(gen(new_tokens + 1) for _ in range(2))
    t_one = min(gen(1) for _ in range(2))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return batch * new_tokens / max(t_full - t_one, 1e-9), peak


def run_graph_engine(args) -> list[dict]:
    """Rows for every reduction × batch with bench/decoder.py (graph-captured decode step)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import decoder

    cfg = decoder.DecoderConfig.llama2_7b(args.layers)
    rows = []
    for red in [0.0] + [r for r in args.reductions if r > 0]:
        model = decoder.build(cfg, red, torch.bfloat16, "cuda")
        check = decoder.check_lowrank_layers(model) if red > 0 else {}
        for b in args.batch:
            r = decoder.decode_benchmark(model, b, args.prompt_len, args.new_tokens)
            r.update(reduction=red, layer_rel_err=check)
            rows.append(r)
            name = "dense" if red == 0 else f"lowrank {int(red * 100)}%"
            print(f"{name:>13} batch {b:>3}: graph {r['graph_tokens_per_s']:9.1f} tok/s, eager "
                  f"{r['eager_tokens_per_s']:9.1f} tok/s, peak {r['peak_GiB']:6.2f} GiB", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    dense = {r["batch"]: r for r in rows if r["reduction"] == 0}
    for r in rows:
        d = dense[r["batch"]]
        r["graph_speedup_vs_dense"] = r["graph_tokens_per_s"] / d["graph_tokens_per_s"]
        r["eager_speedup_vs_dense"] = r["eager_tokens_per_s"] / d["eager_tokens_per_s"]
    return rows


def run_hf_engine(args) -> list[dict]:
    dtype = torch.bfloat16
    rows = []
    for red in [0.0] + args.reductions:
        torch.manual_seed(0)
        model = build_model(args.layers, dtype)
        if red > 0:
            compress(model, red, args.factors)
        if args.compile:
            torch._dynamo.reset()
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        n_params = sum(t.numel() for t in model.parameters())
        for b in args.batch:
            tps, peak = decode_rate(model, b, args.prompt_len, args.new_tokens, args.compile)
            rows.append({"reduction": red, "batch": b, "tokens_per_s": tps, "peak_GiB": peak, "params": n_params})
            name = "dense" if red == 0 else f"lowrank {int(red * 100)}%"
            print(f"{name:>13} batch {b:>3}: {tps:9.1f} tok/s  peak {peak:6.2f} GiB  params {n_params / 1e9:.2f}B",
                  flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    dense = {r["batch"]: r["tokens_per_s"] for r in rows if r["reduction"] == 0}
    for r in rows:
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense[r["batch"]]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["graph", "hf"], default="graph")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = full Llama-2-7B)")
    p.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--factors", choices=["random", "svd"], default="random",
                   help="hf engine: random factors of the right shape (fast), or truncated SVD of the random weights")
    p.add_argument("--compile", action="store_true", help="hf engine: torch.compile(mode='reduce-overhead') on both sides")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e-<gpu-slug>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA device", file=sys.stderr)
        return 1
    from lrinfer.runtime.kernels.configs import gpu_slug

    rows = run_graph_engine(args) if args.engine == "graph" else run_hf_engine(args)
    gpu = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"e2e-{gpu_slug(gpu)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": {"gpu": gpu, "torch": torch.__version__, **vars(args)}, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
