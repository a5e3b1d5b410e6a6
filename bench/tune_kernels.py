"""Offline tuner: writes lrinfer/kernels/configs/<gpu-slug>.json (never run at import).

For each M bucket it times every candidate (method + tile sizes) on the benchmark shapes
(CUDA-graph timing, rotating inputs, from bench_kernels) and keeps, per bucket, the candidate
with the best geometric-mean time over shapes ("buckets"), and per shape the best one when it
beats the bucket winner by more than 3% ("shapes").

    python bench/tune_kernels.py --reductions 0.4 --M 1 4 16 32 64 128 512 2048 8192
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import MS, SHAPES, rank_for, time_graph  # noqa: E402


def candidates(M: int):
    """Config overrides to try for M rows."""
    out = [{"method": "torch"}]
    if M <= 64:
        bm = max(16, 1 << (M - 1).bit_length())
        for method, bin_, bk, bn, br, nw in itertools.product(
                ("fused", "two_launch"), (128, 256), (32, 64), (32, 64), (64,), (4, 8)):
            out.append(dict(method=method, BLOCK_M=bm, BLOCK_IN=bin_, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
                            num_warps=nw))
    if M >= 64:
        for pm, pn, pk, nw, ns in ((64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                   (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)):
            out.append(dict(method="triton", PM=pm, PN=pn, PK=pk, GROUP_M=8, p_warps=nw, p_stages=ns))
    return out


def time_config(in_f, out_f, k, M, cfg, dtype, iters):
    from lrinfer.kernels import configs, fused_decode, lowrank_linear_reference, prefill

    full = {**configs.get_config(M, in_f, out_f, k), **cfg}
    sets = [(torch.randn(M, in_f, dtype=dtype, device="cuda"),
             torch.randn(in_f, k, dtype=dtype, device="cuda") / in_f**0.5,
             torch.randn(out_f, k, dtype=dtype, device="cuda") / k**0.5) for _ in range(4)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = full["method"]
    if m == "torch":
        fn = lowrank_linear_reference
    elif m == "triton":
        fn = lambda x, V, U: prefill.lowrank_prefill(x, V, U, cfg=full)  # noqa: E731
    else:
        fn = lambda x, V, U: fused_decode.lowrank_decode(x, V, U, cfg=full, fused=m == "fused",  # noqa: E731
                                                         max_programs=sms)
    ref = lowrank_linear_reference(*sets[0]).float()
    err = (fn(*sets[0]).float() - ref).abs().max().item() / ref.abs().max().item()
    if err > 5e-2:
        return math.inf
    return time_graph(fn, sets, 5, iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reductions", nargs="+", type=float, default=[0.4])
    p.add_argument("--M", nargs="+", type=int, default=list(MS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None, help="default lrinfer/kernels/configs/<gpu-slug>.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    from lrinfer.kernels import configs

    gpu = torch.cuda.get_device_name()
    shapes = [(i, o, rank_for(i, o, r)) for mdl in args.models for i, o in SHAPES[mdl] for r in args.reductions]
    buckets, per_shape = {}, {}
    for M in args.M:
        cands = candidates(M)
        times = [[time_config(i, o, k, M, c, torch.bfloat16, args.iters) for (i, o, k) in shapes] for c in cands]
        geo = [math.exp(sum(math.log(t) for t in ts) / len(ts)) if all(map(math.isfinite, ts)) else math.inf
               for ts in times]
        best = min(range(len(cands)), key=geo.__getitem__)
        buckets[str(M)] = cands[best]
        print(f"M={M}: {cands[best]} geo-mean {geo[best]:.1f} µs", flush=True)
        for s, (i, o, k) in enumerate(shapes):
            j = min(range(len(cands)), key=lambda c: times[c][s])
            if times[j][s] < 0.97 * times[best][s]:
                per_shape.setdefault(f"{i}x{o}x{k}", {})[str(M)] = cands[j]
    out = args.out or os.path.join(configs.CONFIG_DIR, f"{configs.gpu_slug(gpu)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "buckets": buckets, "shapes": per_shape}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
