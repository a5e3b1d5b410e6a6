"""Stress script (run by test_gpu.py in a subprocess with a timeout): the fused single-launch
decode kernel launched from two streams at once, `--iters` times each, must never hang.

Every 50 launches both streams are held by a device-side sleep so that launches pile up in both
queues and then run concurrently. Prints one JSON line: grids, guards and max errors.

    PYTHONPATH=. python tests/kernels/_two_streams.py --iters 1000 [--low-occupancy] [--over-ask 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--low-occupancy", action="store_true", help="8 warps and large tiles")
    ap.add_argument("--over-ask", type=int, default=1, help="max_programs = this × SMs (the launcher must clamp)")
    args = ap.parse_args(argv)

    from lrinfer.runtime.kernels import configs, fused_decode as fd

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = dict(configs.DEFAULTS[16])
    if args.low_occupancy:
        cfg.update(BLOCK_M=16, BLOCK_IN=256, BLOCK_K=128, BLOCK_N=128, BLOCK_R=128, num_warps=8)
    g = torch.Generator(device="cuda").manual_seed(0)

    def case(M, IN, OUT, k):
        x = torch.randn(M, IN, device=dev, dtype=torch.bfloat16, generator=g)
        V = (torch.randn(IN, k, device=dev, generator=g) * IN**-0.5).to(torch.bfloat16)
        U = (torch.randn(OUT, k, device=dev, generator=g) * k**-0.5).to(torch.bfloat16)
        return x, V, U

    cases = [case(16, 4096, 11008, 1864), case(4, 4096, 4096, 1224)]  # one per stream
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [None, None]
    mp = args.over_ask * sms

    def launch(i):
        with torch.cuda.stream(streams[i]):
            outs[i] = fd.lowrank_decode(*cases[i], cfg=cfg, fused=True, max_programs=mp)

    torch.cuda.synchronize()  # inputs were made on the default stream
    for i in range(2):  # compile and cache the workspaces on each stream
        launch(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for it in range(args.iters):
        if it % 50 == 0:
            for s in streams:
                with torch.cuda.stream(s):
                    torch.cuda._sleep(2_000_000)  # ~1 ms: let both queues fill
        launch(0)
        launch(1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    errs = []
    for (x, V, U), y in zip(cases, outs):
        ref = (x.double() @ V.double()) @ U.double().t()
        errs.append(float((y.double() - ref).norm() / ref.norm()))
    info = fd.decode_launch_info()
    print(json.dumps({"iters": args.iters, "seconds": seconds, "sms": sms, "max_programs": mp,
                      "cooperative": info["cooperative_enabled"], "resident": info["resident"],
                      "rel_err": errs, "low_occupancy": args.low_occupancy}))
    return 0 if max(errs) < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
