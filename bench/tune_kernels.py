"""Offline tuner: writes lrinfer/kernels/configs/<gpu-slug>.json (never run at import).

For each M bucket it times every candidate (method + tile sizes) on the benchmark shapes
(CUDA-graph timing, rotating inputs, from bench_kernels) and keeps, per bucket, the candidate
with the best geometric-mean time over shapes ("buckets"), and per shape the best one when it
beats the bucket winner by more than 3% ("shapes"). Candidates that give a wrong answer
(relative error > 5e-2 against torch) or fail to launch are never chosen.

    python bench/tune_kernels.py --reductions 0.4 --M 1 4 16 32 64 128 512 2048 8192

`tune()` is the same as a function with a deadline and per-bucket resume (bench/gpu_kit.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # lrinfer importable from a plain checkout (the GPU machine has no install)
    sys.path.insert(0, _ROOT)

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import MS, SHAPES, TINY_SHAPES, rank_for, time_graph, time_host  # noqa: E402

DECODE_METHODS = ("fused", "two_launch", "two_launch_pdl")


def candidates(M: int, device="cuda"):
    """Config overrides to try for M rows (off CUDA: the torch path only, a plumbing check)."""
    out = [{"method": "torch"}]
    if torch.device(device).type != "cuda":
        return out
    if M <= 64:
        bm = max(16, 1 << (M - 1).bit_length())
        for method, bin_, bk, bn, br, nw in itertools.product(
                DECODE_METHODS, (128, 256), (32, 64), (32, 64), (64,), (4, 8)):
            out.append(dict(method=method, BLOCK_M=bm, BLOCK_IN=bin_, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
                            num_warps=nw))
    if M >= 64:
        for pm, pn, pk, nw, ns in ((64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                   (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)):
            out.append(dict(method="triton", PM=pm, PN=pn, PK=pk, GROUP_M=8, p_warps=nw, p_stages=ns))
    return out


def time_config(in_f, out_f, k, M, cfg, dtype, iters, device="cuda"):
    """Median µs of one candidate (inf when it fails or is wrong)."""
    from lrinfer.kernels import configs, fused_decode, lowrank_linear_reference, prefill

    device = torch.device(device)
    cuda = device.type == "cuda"
    full = {**configs.get_config(M, in_f, out_f, k), **cfg}
    sets = [(torch.randn(M, in_f, dtype=dtype, device=device),
             torch.randn(in_f, k, dtype=dtype, device=device) / in_f**0.5,
             torch.randn(out_f, k, dtype=dtype, device=device) / k**0.5) for _ in range(4 if cuda else 2)]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    m = full["method"]
    if m == "torch":
        fn = lowrank_linear_reference
    elif m == "triton":
        fn = lambda x, V, U: prefill.lowrank_prefill(x, V, U, cfg=full)  # noqa: E731
    else:
        fn = lambda x, V, U: fused_decode.lowrank_decode(x, V, U, cfg=full, fused=m == "fused",  # noqa: E731
                                                         pdl=m == "two_launch_pdl", max_programs=sms)
    try:
        ref = lowrank_linear_reference(*sets[0]).float()
        err = (fn(*sets[0]).float() - ref).abs().max().item() / ref.abs().max().item()
        if not err <= 5e-2:
            return math.inf
        return time_graph(fn, sets, 5, iters) if cuda else time_host(fn, sets, 2, iters)
    except Exception as e:  # a candidate that does not compile or launch here is not chosen
        print(f"  candidate {cfg} failed on {in_f}x{out_f}x{k} M={M}: {type(e).__name__}: {str(e)[:200]}",
              file=sys.stderr)
        return math.inf


def tune(shapes, Ms, iters=50, dtype=torch.bfloat16, device="cuda", done=None, deadline=None, on_bucket=None):
    """Tuned table {"buckets": {M: cfg}, "shapes": {"INxOUTxK": {M: cfg}}, "timings": {...}}.

    shapes: [(in, out, k)]. done: a previous partial result to continue from (buckets already
    tuned are kept). deadline: time.monotonic() value after which no new bucket is started
    (the result then has "complete": False). on_bucket(result) is called after each bucket.
    """
    res = done or {"buckets": {}, "shapes": {}, "timings": {}}
    res.setdefault("timings", {})
    for M in Ms:
        if str(M) in res["buckets"]:
            continue
        if deadline is not None and time.monotonic() > deadline:
            res["complete"] = False
            return res
        cands = candidates(M, device)
        times = [[time_config(i, o, k, M, c, dtype, iters, device) for (i, o, k) in shapes] for c in cands]
        geo = [math.exp(sum(math.log(t) for t in ts) / len(ts)) if all(map(math.isfinite, ts)) else math.inf
               for ts in times]
        best = min(range(len(cands)), key=geo.__getitem__)
        res["buckets"][str(M)] = cands[best]
        res["timings"][str(M)] = {"geo_mean_us": geo[best], "n_candidates": len(cands),
                                  "torch_geo_mean_us": geo[0]}
        print(f"M={M}: {cands[best]} geo-mean {geo[best]:.1f} µs (torch {geo[0]:.1f} µs)", flush=True)
        for s, (i, o, k) in enumerate(shapes):
            j = min(range(len(cands)), key=lambda c: times[c][s])
            if times[j][s] < 0.97 * times[best][s]:
                res["shapes"].setdefault(f"{i}x{o}x{k}", {})[str(M)] = cands[j]
        if on_bucket:
            on_bucket(res)
    res["complete"] = True
    return res


def table_json(res: dict, gpu: str) -> dict:
    """The per-GPU config file lrinfer/kernels/configs.py reads."""
    return {"gpu": gpu, "torch": torch.__version__, "buckets": res["buckets"], "shapes": res["shapes"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES) + list(TINY_SHAPES))
    p.add_argument("--reductions", nargs="+", type=float, default=[0.4])
    p.add_argument("--M", nargs="+", type=int, default=list(MS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a plumbing check on --models tiny")
    p.add_argument("--out", default=None, help="default lrinfer/kernels/configs/<gpu-slug>.json")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    from lrinfer.kernels import configs

    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    all_shapes = {**SHAPES, **TINY_SHAPES}
    shapes = [(i, o, rank_for(i, o, r)) for mdl in args.models for i, o in all_shapes[mdl] for r in args.reductions]
    res = tune(shapes, args.M, args.iters, device=args.device)
    out = args.out or os.path.join(configs.CONFIG_DIR, f"{configs.gpu_slug(gpu)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(table_json(res, gpu), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
