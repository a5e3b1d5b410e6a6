"""pytest-benchmark entry point (GPU only): `pytest bench/test_bench_kernels.py --benchmark-only`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [(4096, 4096, 0.4), (4096, 11008, 0.4), (11008, 4096, 0.4)]
MS = [1, 16, 8192]


def _setup(in_f, out_f, red, M):
    from bench_kernels import rank_for  # noqa: E402  (bench/ is on sys.path via rootdir-relative import)

    k = rank_for(in_f, out_f, red)
    x = torch.randn(M, in_f, dtype=torch.bfloat16, device="cuda")
    V = torch.randn(in_f, k, dtype=torch.bfloat16, device="cuda") / in_f**0.5
    U = torch.randn(out_f, k, dtype=torch.bfloat16, device="cuda") / k**0.5
    return x, V, U


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=50, warmup_rounds=5, iterations=1)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("in_f, out_f, red", CASES)
@pytest.mark.parametrize("method", ["dense", "unfused", "ours"])
def test_lowrank(benchmark, method, in_f, out_f, red, M):
    from lrinfer.runtime.kernels import lowrank_linear

    x, V, U = _setup(in_f, out_f, red, M)
    if method == "dense":
        W = (U @ V.t()).contiguous()
        fn = lambda: F.linear(x, W)  # noqa: E731
    elif method == "unfused":
        fn = lambda: (x @ V) @ U.t()  # noqa: E731
    else:
        fn = lambda: lowrank_linear(x, V, U)  # noqa: E731
    benchmark.group = f"{in_f}x{out_f}-r{red}-M{M}"
    _run(benchmark, fn)
