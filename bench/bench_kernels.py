"""Kernel benchmark: y = (x V) Uᵀ vs dense, side by side, on one GPU.

For every (shape, reduction, M) it times, with CUDA events (median; rotating inputs, by default
calls captured in a CUDA graph so host overhead is excluded for every method):
    dense      F.linear(x, W) with W = U Vᵀ  (cuBLAS)
    unfused    (x @ V) @ U.t()               (two cuBLAS calls, eager)
    compiled   torch.compile of the two matmuls (mode from --compile-mode)
    ours       lrinfer.kernels.lowrank_linear (config table dispatch)
and reports µs, GB/s over the bytes moved, TFLOP/s, and fraction of roofline, where the
roofline uses bandwidth measured by a large device-to-device copy and the rate of a large
bf16 GEMM. Results go to bench/results/<gpu-slug>.json.

    python bench/bench_kernels.py                   # full sweep
    python bench/bench_kernels.py --models llama2 --reductions 0.4 --M 1 8 8192 --no-compile
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # (in, out)
    "llama2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 1024), (4096, 14336), (14336, 4096)],
}
REDUCTIONS = (0.2, 0.4, 0.6)
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)
ROTATE_BYTES = 512 * 2**20  # rotate through at least this many bytes of operands (>> L2)


def rank_for(in_f: int, out_f: int, reduction: float) -> int:
    """k = floor((1 - r) in out / (in + out)), rounded down to a multiple of 8."""
    k = math.floor((1 - reduction) * in_f * out_f / (in_f + out_f))
    return max(8, k // 8 * 8)


def time_fn(fn, args_list, warmup: int, iters: int) -> float:
    """Median µs of fn(*args) over `iters` calls, cycling through args_list (rotating inputs)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        a = args_list[i % len(args_list)]
        starts[i].record()
        fn(*a)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_graph(fn, args_list, warmup: int, iters: int, reps: int = 7) -> float:
    """Median µs per call with host overhead removed: `iters` calls (cycling args_list) are
    captured in one CUDA graph, replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(max(warmup, len(args_list))):
            fn(*args_list[i % len(args_list)])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(*args_list[i % len(args_list)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    del g
    return statistics.median(times)


def measure_roofline(dtype) -> dict:
    """Copy bandwidth (GB/s) of a 2 GiB device-to-device copy and the rate of an 8192³ GEMM."""
    n = 2**30 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    us = time_fn(lambda: b.copy_(a), [()], 3, 20)
    bw = 2 * a.numel() * a.element_size() / (us * 1e-6) / 1e9
    del a, b
    s = 8192
    x = torch.randn(s, s, dtype=dtype, device="cuda")
    y = torch.randn(s, s, dtype=dtype, device="cuda")
    us = time_fn(lambda: x @ y, [()], 3, 20)
    tflops = 2 * s**3 / (us * 1e-6) / 1e12
    return {"copy_GBps": bw, "gemm_TFLOPs": tflops}


def bench_case(in_f, out_f, k, M, dtype, methods, roof, warmup, iters, compile_mode, timing="graph"):
    from lrinfer.kernels import lowrank_linear

    es = torch.tensor([], dtype=dtype).element_size()
    dense_bytes = in_f * out_f * es
    lr_bytes = (in_f + out_f) * k * es
    n_rot = max(2, math.ceil(ROTATE_BYTES / (dense_bytes + lr_bytes + M * (in_f + out_f) * es)))
    n_rot = min(n_rot, 16)
    sets = []
    for _ in range(n_rot):
        V = torch.randn(in_f, k, dtype=dtype, device="cuda") / in_f**0.5  # shape [in, k]
        U = torch.randn(out_f, k, dtype=dtype, device="cuda") / k**0.5  # shape [out, k]
        x = torch.randn(M, in_f, dtype=dtype, device="cuda")  # shape [M, in]
        sets.append((x, V, U))
    W = [(U @ V.t()).contiguous() for _, V, U in sets]  # shape [out, in]

    def unfused(x, V, U):
        return (x @ V) @ U.t()

    fns = {
        "dense": (lambda x, W: F.linear(x, W), [(s[0], w) for s, w in zip(sets, W)], dense_bytes, in_f * out_f),
        "unfused": (unfused, sets, lr_bytes, (in_f + out_f) * k),
        "ours": (lowrank_linear, sets, lr_bytes, (in_f + out_f) * k),
    }
    if "compiled" in methods:
        fns["compiled"] = (torch.compile(unfused, mode=compile_mode, dynamic=False), sets, lr_bytes,
                           (in_f + out_f) * k)
    ref = unfused(*sets[0]).float()
    out = {}
    for name in methods:
        fn, args, wbytes, macs = fns[name]
        if name in ("ours", "compiled"):
            err = (fn(*sets[0]).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        else:
            err = None
        us = (time_graph if timing == "graph" else time_fn)(fn, args, warmup, iters)
        moved = wbytes + M * (in_f + out_f) * es
        flops = 2 * M * macs
        t_roof = max(moved / (roof["copy_GBps"] * 1e9), flops / (roof["gemm_TFLOPs"] * 1e12)) * 1e6
        out[name] = {
            "us": us,
            "GBps": moved / (us * 1e-6) / 1e9,
            "weight_GBps": wbytes / (us * 1e-6) / 1e9,
            "TFLOPs": flops / (us * 1e-6) / 1e12,
            "roofline_frac": t_roof / us,
            "rel_err_vs_unfused": err,
        }
    del sets, W
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reductions", nargs="+", type=float, default=list(REDUCTIONS))
    p.add_argument("--M", nargs="+", type=int, default=list(MS))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--methods", nargs="+", default=["dense", "unfused", "compiled", "ours"],
                   choices=["dense", "unfused", "compiled", "ours"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for the baseline; 'max-autotune' adds CUDA graphs, which "
                        "copy non-static inputs each call and so penalise rotating weights")
    p.add_argument("--timing", default="graph", choices=["graph", "eager"],
                   help="graph: calls captured in a CUDA graph (no host overhead, default); "
                        "eager: CUDA events around each eager call")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<gpu-slug>.json)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    from lrinfer.kernels import configs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    methods = [m for m in args.methods if not (args.no_compile and m == "compiled")]
    gpu = torch.cuda.get_device_name()
    slug = configs.gpu_slug(gpu)
    roof = measure_roofline(dtype)
    print(f"{gpu}: copy {roof['copy_GBps']:.0f} GB/s, GEMM {roof['gemm_TFLOPs']:.0f} TFLOP/s")
    rows = []
    hdr = f"{'shape':>12} {'red':>4} {'k':>5} {'M':>5} " + " ".join(f"{m + ' µs':>12}" for m in methods)
    print(hdr + f" {'ours/dense':>10} {'ours/unf':>9} {'roof':>5}")
    for model in args.models:
        for in_f, out_f in SHAPES[model]:
            for red in args.reductions:
                k = rank_for(in_f, out_f, red)
                for M in args.M:
                    res = bench_case(in_f, out_f, k, M, dtype, methods, roof, args.warmup, args.iters,
                                     args.compile_mode, args.timing)
                    cfg = configs.get_config(M, in_f, out_f, k, slug)
                    rows.append({"model": model, "in": in_f, "out": out_f, "reduction": red, "k": k, "M": M,
                                 "method_ours": cfg["method"], "results": res})
                    line = f"{in_f:>5}x{out_f:<6} {red:>4.1f} {k:>5} {M:>5} "
                    line += " ".join(f"{res[m]['us']:>12.1f}" for m in methods)
                    if "ours" in res and "dense" in res and "unfused" in res:
                        o = res["ours"]["us"]
                        line += (f" {res['dense']['us'] / o:>10.2f} {res['unfused']['us'] / o:>9.2f}"
                                 f" {res['ours']['roofline_frac']:>5.2f}")
                    print(line, flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{slug}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "roofline": roof, "compile_mode": args.compile_mode,
            "timing": args.timing}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
