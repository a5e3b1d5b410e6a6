"""Eager overhead of `LowRankLinear` on the CPU: one module call against the bare (x V) Uᵀ it wraps.

    OMP_NUM_THREADS=1 python bench/op_overhead.py            # SmolLM2's 576→1536 at rank 232, batch 1
"""
import argparse
import time

import torch

from lrinfer.factors import FactorPair
from lrinfer.runtime.nn import LowRankLinear


def median_us(f, n: int) -> float:
    for _ in range(n // 10):
        f()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(runs)[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[576, 1536, 232], metavar=("IN", "OUT", "RANK"))
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    i, o, k = args.shape
    m = LowRankLinear.from_factors(FactorPair(torch.randn(o, k), torch.randn(i, k)))
    x = torch.randn(1, 1, i)
    with torch.no_grad():
        m(x)   # the first call checks the factors and settles their layout
        V, U = m.V, m.U
        module = median_us(lambda: m(x), args.calls)
        bare = median_us(lambda: (x @ V) @ U.t(), args.calls)
    print(f"{i}->{o} rank {k}: module {module:.1f} us, bare math {bare:.1f} us, overhead {module / bare - 1:.0%}")


if __name__ == "__main__":
    main()
