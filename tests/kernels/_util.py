"""Shared helpers for the kernel tests: random factors and a float64 reference."""
from __future__ import annotations

import torch

from lrinfer.runtime.kernels import lowrank_linear_reference

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def make_case(M, IN, OUT, k, k2=0, dtype=torch.float32, bias=True, device="cpu", seed=None):
    """x [M, in], V [in, k], U [out, k], bias [out], V2 [in, k2], U2 [out, k2]; outputs are O(1)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    kt = k + k2
    x = r(M, IN)
    V, U = r(IN, k, scale=IN**-0.5), r(OUT, k, scale=kt**-0.5)
    b = r(OUT) if bias else None
    V2, U2 = (r(IN, k2, scale=IN**-0.5), r(OUT, k2, scale=kt**-0.5)) if k2 else (None, None)
    return x, V, U, b, V2, U2


def ref64(x, V, U, b=None, V2=None, U2=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lowrank_linear_reference(d(x), d(V), d(U), d(b), d(V2), d(U2))


def assert_close(y, ref, dtype):
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert y.dtype == dtype
    err = (y.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max abs err {err:.3g} ({dtype})"
