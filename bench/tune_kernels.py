"""Offline tuner: writes lrinfer/runtime/kernels/configs/<gpu-slug>.json (never run at import).

For each M bucket it times every candidate (method + tile sizes) on the benchmark shapes
(CUDA-graph timing, rotating inputs, from bench_kernels) and keeps, per bucket, the candidate
with the best geometric-mean time over shapes ("buckets"), and per shape the best one when it
beats the bucket winner by more than 3% ("shapes"). Candidates that give a wrong answer
(relative error > 5e-2 against torch) or fail to launch are never chosen.

    python bench/tune_kernels.py --reductions 0.4 --M 1 4 16 32 64 128 512 2048 8192

Before any GPU time, the decode candidates are pruned on the CPU with the static ESTIMATE of
`lrinfer.runtime.kernels.inspect.compile_only` (each candidate compiled for the device's arch, timed by
the model in lrinfer/runtime/kernels/estimate.py on the largest shape): only the `--prune-keep` best
(default 8) are timed. `--prune-only` prints the ranking and exits (no GPU needed).

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
        for method, bin_, bk, bn, br, nw, ns in itertools.product(
                DECODE_METHODS, (128, 256), (32, 64), (32, 64), (64, 128), (4, 8), (3, 4)):
            out.append(dict(method=method, BLOCK_M=bm, BLOCK_IN=bin_, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
                            num_warps=nw, num_stages=ns))
    if M >= 64:
        for pm, pn, pk, nw, ns in ((64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                   (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)):
            out.append(dict(method="triton", PM=pm, PN=pn, PK=pk, GROUP_M=8, p_warps=nw, p_stages=ns))
    return out


DECODE_KEYS = ("BLOCK_M", "BLOCK_IN", "BLOCK_K", "BLOCK_N", "BLOCK_R", "num_warps", "num_stages")


def estimate_us(cfg: dict, in_f: int, out_f: int, k: int, M: int, dtype="bfloat16", arch=90, gpu="h100"):
    """ESTIMATE (static model, CPU only) of one decode candidate's µs; inf when it does not compile."""
    from lrinfer.runtime.kernels.inspect import compile_only

    over = {key: cfg[key] for key in DECODE_KEYS if key in cfg}
    try:
        return compile_only(cfg["method"], dtype, in_f, out_f, k, 0, M, over, arch).estimate[gpu]["us"]
    except Exception as e:  # a candidate that cannot compile here is pruned
        print(f"  candidate {cfg} does not compile for sm_{arch}: {type(e).__name__}: {str(e)[:200]}",
              file=sys.stderr)
        return math.inf


def prune(cands: list, shapes, M: int, keep: int = 8, arch: int = 90, gpu: str = "h100", dtype="bfloat16"):
    """The `keep` decode candidates with the best ESTIMATE on the largest shape, plus every other
    method's candidates (torch, triton); [(cfg, estimate µs or None)] in that order."""
    i, o, k = max(shapes, key=lambda s: (s[0] + s[1]) * s[2])
    decode = [c for c in cands if c["method"] in DECODE_METHODS]
    rest = [(c, None) for c in cands if c["method"] not in DECODE_METHODS]
    scored = sorted(((c, estimate_us(c, i, o, k, M, dtype, arch, gpu)) for c in decode), key=lambda t: t[1])
    return rest + [t for t in scored[:keep] if math.isfinite(t[1])]


def time_config(in_f, out_f, k, M, cfg, dtype, iters, device="cuda"):
    """Median µs of one candidate (inf when it fails or is wrong)."""
    from lrinfer.runtime.kernels import configs, fused_decode, lowrank_linear_reference, prefill

    device = torch.device(device)
    cuda = device.type == "cuda"
    full = {**configs.get_config(M, in_f, out_f, k), **cfg}
    sets = [(torch.randn(M, in_f, dtype=dtype, device=device),
             torch.randn(in_f, k, dtype=dtype, device=device) / in_f**0.5,
             torch.randn(out_f, k, dtype=dtype, device=device) / k**0.5) for _ in range(4 if cuda else 2)]
    m = full["method"]
    if m == "torch":
        fn = lowrank_linear_reference
    elif m == "triton":
        fn = lambda x, V, U: prefill.lowrank_prefill(x, V, U, cfg=full)  # noqa: E731
    else:
        fn = lambda x, V, U: fused_decode.lowrank_decode(x, V, U, cfg=full, fused=m == "fused",  # noqa: E731
                                                         pdl=m == "two_launch_pdl")
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


def tune(shapes, Ms, iters=50, dtype=torch.bfloat16, device="cuda", done=None, deadline=None, on_bucket=None,
         prune_keep=8, arch=None):
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
        if prune_keep and len(cands) > prune_keep + 1:  # CPU: the static ESTIMATE picks what is timed
            if arch is None:
                major, minor = torch.cuda.get_device_capability()
                arch = major * 10 + minor if major * 10 + minor in (80, 90) else (90 if major >= 9 else 80)
            cands = [c for c, _ in prune(cands, shapes, M, prune_keep, arch,
                                         dtype=str(dtype).removeprefix("torch."))]
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
    """The per-GPU config file lrinfer/runtime/kernels/configs.py reads."""
    return {"gpu": gpu, "torch": torch.__version__, "buckets": res["buckets"], "shapes": res["shapes"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES) + list(TINY_SHAPES))
    p.add_argument("--reductions", nargs="+", type=float, default=[0.4])
    p.add_argument("--M", nargs="+", type=int, default=list(MS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a plumbing check on --models tiny")
    p.add_argument("--out", default=None, help="default lrinfer/runtime/kernels/configs/<gpu-slug>.json")
    p.add_argument("--prune-keep", type=int, default=8,
                   help="decode candidates kept after the CPU ESTIMATE (0: time them all)")
    p.add_argument("--prune-only", action="store_true",
                   help="print the ESTIMATE ranking of the decode candidates and exit (no GPU)")
    p.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_90"], help="with --prune-only")
    args = p.parse_args(argv)
    if args.prune_only:
        all_shapes = {**SHAPES, **TINY_SHAPES}
        shapes = [(i, o, rank_for(i, o, r)) for mdl in args.models for i, o in all_shapes[mdl]
                  for r in args.reductions]
        for M in args.M:
            ranked = prune(candidates(M, "cuda"), shapes, M, args.prune_keep or 10**9, int(args.arch[3:]))
            for c, us in ranked:
                if us is not None:
                    print(f"M={M} ESTIMATE {us:.1f} µs: {c}")
        return 0
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    from lrinfer.runtime.kernels import configs

    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    all_shapes = {**SHAPES, **TINY_SHAPES}
    shapes = [(i, o, rank_for(i, o, r)) for mdl in args.models for i, o in all_shapes[mdl] for r in args.reductions]
    res = tune(shapes, args.M, args.iters, device=args.device, prune_keep=args.prune_keep if cuda else 0)
    out = args.out or os.path.join(configs.CONFIG_DIR, f"{configs.gpu_slug(gpu)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(table_json(res, gpu), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
