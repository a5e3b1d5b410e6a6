"""Kernel benchmark: y = (x V) Uᵀ vs dense, side by side, on one GPU.

For every (shape, reduction, M) it times, with CUDA events (median; rotating inputs, by default
calls captured in a CUDA graph so host overhead is excluded for every method):
    dense          F.linear(x, W) with W = U Vᵀ  (cuBLAS)
    unfused        (x @ V) @ U.t()               (two cuBLAS calls, eager)
    compiled       torch.compile of the two matmuls (mode from --compile-mode)
    ours           lrinfer.runtime.kernels.lowrank_linear (config table dispatch)
    fused, two_launch, two_launch_pdl
                   the decode kernels forced (config table's tiles, M <= 64 only), so the single
                   launch and the two launches with programmatic dependent launch sit side by side
and reports µs, GB/s over the bytes moved, TFLOP/s, and fraction of roofline, where the
roofline uses bandwidth measured by a large device-to-device copy and the rate of a large
bf16 GEMM. Results go to bench/results/<gpu-slug>.json.

    python bench/bench_kernels.py                   # full sweep
    python bench/bench_kernels.py --models llama2 --reductions 0.4 --M 1 8 8192 --no-compile

Without CUDA (`--device cpu`, tiny shapes only) the same code paths run with a host clock and
the torch path of the op: a plumbing check used by bench/gpu_kit.py's dry run, not a measurement.
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

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # lrinfer importable from a plain checkout (the GPU machine has no install)
    sys.path.insert(0, _ROOT)

SHAPES = {  # (in, out)
    "llama2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 1024), (4096, 14336), (14336, 4096)],
}
TINY_SHAPES = {"tiny": [(64, 96), (96, 48)]}  # CPU dry runs
REDUCTIONS = (0.2, 0.4, 0.6)
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)
ROTATE_BYTES = 512 * 2**20  # rotate through at least this many bytes of operands (>> L2)
BASE_METHODS = ("dense", "unfused", "compiled", "ours")
DECODE_VARIANTS = ("fused", "two_launch", "two_launch_pdl")  # forced decode kernels
DECODE_VARIANT_MAX_M = 64
METHODS = BASE_METHODS + DECODE_VARIANTS
NO_CUDA = "skipped: no CUDA device"


def rank_for(in_f: int, out_f: int, reduction: float) -> int:
    """The rank `compress` emits for this ratio (uniform allocation, the default rank multiple)."""
    from lrinfer import CompressConfig, rank_for_ratio

    return rank_for_ratio(in_f, out_f, reduction, CompressConfig.rank_multiple)


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
    captured in one CUDA graph, replayed `reps` times.

    Captured on the warm-up stream, so per-stream caches filled by the warm-up (the decode
    kernels' workspace) are reused inside the graph instead of being allocated and zero-filled
    per captured call, which would add a memset node to every call of `ours` only."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(max(warmup, len(args_list))):
            fn(*args_list[i % len(args_list)])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
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


def time_host(fn, args_list, warmup: int, iters: int) -> float:
    """Median µs of fn(*args) by the host clock (CPU plumbing runs)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    times = []
    for i in range(iters):
        t = time.perf_counter()
        fn(*args_list[i % len(args_list)])
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def measure_roofline(dtype, device="cuda") -> dict:
    """Copy bandwidth (GB/s, bytes read + written) of a 1 GiB device-to-device copy and the rate
    of an 8192³ GEMM on random data. Off CUDA: {"skipped": ...}."""
    if torch.device(device).type != "cuda":
        return {"copy_GBps": None, "gemm_TFLOPs": None, "skipped": NO_CUDA}
    n = 2**30 // 2
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
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


def _variant_fn(variant: str, in_f: int, out_f: int, k: int, M: int, device):
    """lowrank_decode forced to one decode mode, with the config table's tiles for this shape."""
    from lrinfer.runtime.kernels import configs, fused_decode

    dev = device.index if device.index is not None else torch.cuda.current_device()
    cfg = {**configs.get_config(M, in_f, out_f, k, configs.device_slug(dev)), "method": variant}
    kw = dict(fused=variant == "fused", pdl=variant == "two_launch_pdl")  # grid: SMs × occupancy, as the op
    return lambda x, V, U: fused_decode.lowrank_decode(x, V, U, cfg=cfg, **kw)


def bench_case(in_f, out_f, k, M, dtype, methods, roof, warmup, iters, compile_mode, timing="graph",
               device="cuda") -> dict:
    """{method: {us, GBps, weight_GBps, TFLOPs, roofline_frac, rel_err_vs_unfused} or {skipped}}."""
    from lrinfer.runtime.kernels import lowrank_linear

    device = torch.device(device)
    cuda = device.type == "cuda"
    es = torch.tensor([], dtype=dtype).element_size()
    dense_bytes = in_f * out_f * es
    lr_bytes = (in_f + out_f) * k * es
    n_rot = max(2, math.ceil(ROTATE_BYTES / (dense_bytes + lr_bytes + M * (in_f + out_f) * es)))
    n_rot = min(n_rot, 16 if cuda else 2)
    sets = []
    for _ in range(n_rot):
        V = torch.randn(in_f, k, dtype=dtype, device=device) / in_f**0.5  # shape [in, k]
        U = torch.randn(out_f, k, dtype=dtype, device=device) / k**0.5  # shape [out, k]
        x = torch.randn(M, in_f, dtype=dtype, device=device)  # shape [M, in]
        sets.append((x, V, U))
    W = [(U @ V.t()).contiguous() for _, V, U in sets]  # shape [out, in]

    def unfused(x, V, U):
        return (x @ V) @ U.t()

    fns = {
        "dense": (lambda x, W: F.linear(x, W), [(s[0], w) for s, w in zip(sets, W)], dense_bytes, in_f * out_f),
        "unfused": (unfused, sets, lr_bytes, (in_f + out_f) * k),
        "ours": (lowrank_linear, sets, lr_bytes, (in_f + out_f) * k),
    }
    out = {}
    for v in DECODE_VARIANTS:
        if v not in methods:
            continue
        if not cuda:
            out[v] = {"skipped": NO_CUDA}
        elif M > DECODE_VARIANT_MAX_M:
            out[v] = {"skipped": f"decode variants are timed for M <= {DECODE_VARIANT_MAX_M}"}
        else:
            fns[v] = (_variant_fn(v, in_f, out_f, k, M, device), sets, lr_bytes, (in_f + out_f) * k)
    if "compiled" in methods:
        if cuda:
            fns["compiled"] = (torch.compile(unfused, mode=compile_mode, dynamic=False), sets, lr_bytes,
                               (in_f + out_f) * k)
        else:
            out["compiled"] = {"skipped": NO_CUDA + " (the baseline is a GPU measurement)"}
    ref = unfused(*sets[0]).float()
    for name in methods:
        if name not in fns:
            continue
        fn, args, wbytes, macs = fns[name]
        err = None
        if name not in ("dense", "unfused"):
            err = (fn(*sets[0]).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        timer = (time_graph if timing == "graph" else time_fn) if cuda else time_host
        us = timer(fn, args, warmup, iters)
        moved = wbytes + M * (in_f + out_f) * es
        flops = 2 * M * macs
        row = {"us": us, "GBps": moved / (us * 1e-6) / 1e9, "weight_GBps": wbytes / (us * 1e-6) / 1e9,
               "TFLOPs": flops / (us * 1e-6) / 1e12, "rel_err_vs_unfused": err}
        if roof.get("copy_GBps"):
            t_roof = max(moved / (roof["copy_GBps"] * 1e9), flops / (roof["gemm_TFLOPs"] * 1e12)) * 1e6
            row["roofline_frac"] = t_roof / us
            row["copy_frac"] = moved / (us * 1e-6) / (roof["copy_GBps"] * 1e9)
        out[name] = row
    del sets, W
    if cuda:
        torch.cuda.empty_cache()
    return out


def case_key(row: dict) -> str:
    return f"{row['model']}|{row['in']}x{row['out']}|r{row['reduction']}|M{row['M']}|{row.get('tag', '')}"


def plan(models, reductions, ms, shapes=None, tag: str = "") -> list[dict]:
    """The (model, in, out, reduction, k, M) cases of a sweep, in run order."""
    shapes = shapes or SHAPES
    return [{"model": m, "in": i, "out": o, "reduction": r, "k": rank_for(i, o, r), "M": M, "tag": tag}
            for m in models for i, o in shapes[m] for r in reductions for M in ms]


def run_case(case: dict, dtype, methods, roof, args_ns, device="cuda") -> dict:
    """One planned case measured: the case dict + method used by `ours` + results."""
    from lrinfer.runtime.kernels import configs

    res = bench_case(case["in"], case["out"], case["k"], case["M"], dtype, methods, roof, args_ns.warmup,
                     args_ns.iters, args_ns.compile_mode, args_ns.timing, device)
    slug = configs.device_slug(torch.cuda.current_device()) if torch.device(device).type == "cuda" else ""
    cfg = configs.get_config(case["M"], case["in"], case["out"], case["k"], slug)
    return {**case, "method_ours": cfg["method"] if slug else "torch (CPU path)", "results": res}


def format_row(row: dict, methods) -> str:
    res = row["results"]
    line = f"{row['in']:>5}x{row['out']:<6} {row['reduction']:>4.1f} {row['k']:>5} {row['M']:>5} "
    line += " ".join(f"{res[m]['us']:>12.1f}" if "us" in res.get(m, {}) else f"{'-':>12}" for m in methods)
    if all("us" in res.get(m, {}) for m in ("ours", "dense", "unfused")):
        o = res["ours"]["us"]
        frac = res["ours"].get("roofline_frac")
        line += (f" {res['dense']['us'] / o:>10.2f} {res['unfused']['us'] / o:>9.2f}"
                 f" {frac if frac is not None else float('nan'):>5.2f}")
    return line


_LABELS = {"two_launch": "2launch", "two_launch_pdl": "2l+pdl"}


def header(methods) -> str:
    hdr = f"{'shape':>12} {'red':>4} {'k':>5} {'M':>5} " + " ".join(
        f"{_LABELS.get(m, m)[:9] + ' µs':>12}" for m in methods)
    return hdr + f" {'ours/dense':>10} {'ours/unf':>9} {'roof':>5}"


def env_meta(dtype_name: str) -> dict:
    meta = {"torch": torch.__version__, "dtype": dtype_name, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["capability"] = list(torch.cuda.get_device_capability())
        meta["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import triton

        meta["triton"] = triton.__version__
        from lrinfer.runtime.kernels import fused_decode

        meta["launch"] = fused_decode.launch_features()
    except ImportError:
        meta["triton"] = None
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES) + list(TINY_SHAPES))
    p.add_argument("--reductions", nargs="+", type=float, default=list(REDUCTIONS))
    p.add_argument("--M", nargs="+", type=int, default=list(MS))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--methods", nargs="+", default=["dense", "unfused", "compiled", "ours", *DECODE_VARIANTS],
                   choices=list(METHODS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for the baseline; 'max-autotune' adds CUDA graphs, which "
                        "copy non-static inputs each call and so penalise rotating weights")
    p.add_argument("--timing", default="graph", choices=["graph", "eager"],
                   help="graph: calls captured in a CUDA graph (no host overhead, default); "
                        "eager: CUDA events around each eager call")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a plumbing check on --models tiny")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<gpu-slug>.json)")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (or --device cpu --models tiny for a plumbing check)",
              file=sys.stderr)
        return 1
    from lrinfer.runtime.kernels import configs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    methods = [m for m in args.methods if not (args.no_compile and m == "compiled")]
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    slug = configs.gpu_slug(gpu)
    roof = measure_roofline(dtype, args.device)
    if cuda:
        print(f"{gpu}: copy {roof['copy_GBps']:.0f} GB/s, GEMM {roof['gemm_TFLOPs']:.0f} TFLOP/s")
    shapes = {**SHAPES, **TINY_SHAPES}
    rows = []
    print(header(methods))
    for case in plan(args.models, args.reductions, args.M, shapes):
        row = run_case(case, dtype, methods, roof, args, args.device)
        rows.append(row)
        print(format_row(row, methods), flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {**env_meta(args.dtype), "gpu": gpu, "roofline": roof, "compile_mode": args.compile_mode,
            "timing": args.timing if cuda else "host clock (CPU plumbing check)"}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
