"""The grouped kernel pair (vLLM's fused qkv / gate_up layers) under TRITON_INTERPRET=1 vs float64:
one `shrink_kernel` over [V_0|...|V_{S-1}], one `grouped_expand_kernel` writing each shard's
columns of y (issue 23 item 6). fp32/fp16 only (bf16 tl.dot is broken in the interpreter);
bf16/sm_90 code is checked by compile + SASS in test_sass.py."""
from __future__ import annotations

import pytest
import torch

from lrinfer.factors import FactorPair
from lrinfer.runtime.kernels import configs, ops
from lrinfer.runtime.nn import LowRankLinear
from lrinfer.runtime.kernels.grouped import lowrank_linear_grouped, pack_grouped

from ._util import TOL

CFG = {**configs.DEFAULTS[1], "BLOCK_M": 16, "BLOCK_IN": 32, "BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 32}


def _layers(IN, shards, dtype, bias, seed):
    """LowRankLinear per shard: (out, k, k2); factors scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for o, k, k2 in shards:
        kt = k + k2
        r = lambda *s, sc: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
        pair = FactorPair(r(o, k, sc=kt ** -0.5), r(IN, k, sc=IN ** -0.5),
                          r(o, k2, sc=kt ** -0.5) if k2 else None, r(IN, k2, sc=IN ** -0.5) if k2 else None)
        out.append(LowRankLinear.from_factors(pair, r(o, sc=1.0) if bias else None).to(dtype))
    return out


def _ref64(x, layers):
    ys = []
    for m in layers:
        d = lambda t: None if t is None else t.detach().double()  # noqa: E731
        y = (x.double() @ d(m.V)) @ d(m.U).t()
        if m.V2 is not None:
            y = y + (x.double() @ d(m.V2)) @ d(m.U2).t()
        ys.append(y if m.bias is None else y + d(m.bias))
    return torch.cat(ys, -1)


SHARDS = {
    "qkv": [(96, 48, 0), (32, 16, 0), (32, 16, 0)],
    "gate_up": [(120, 40, 0), (120, 40, 0)],
    "single": [(70, 33, 0)],
    "residual": [(64, 30, 6), (40, 17, 5), (40, 9, 0)],
    "five": [(40, 8, 0), (33, 16, 0), (20, 5, 0), (64, 32, 0), (17, 7, 0)],  # two expand launches
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SHARDS))
@pytest.mark.parametrize("M", [1, 7, 20])
def test_grouped_kernel_vs_float64(interp, name, M, dtype):
    fd = interp.fused_decode
    IN = 80
    layers = _layers(IN, SHARDS[name], dtype, bias=M != 7, seed=M)
    V, U, b, ranks, outs = pack_grouped(layers)
    x = torch.randn(M, IN, dtype=torch.float64).to(dtype)
    y = torch.full((M, sum(outs)), float("nan"), dtype=dtype)
    fd.lowrank_grouped_decode(x, V, U, b, ranks, outs, cfg=dict(CFG, BLOCK_M=16 if M <= 16 else 32),
                              out=y, max_programs=6)
    ref = _ref64(x, layers)
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"{name} M={M}: max err {err:.3g}"


def test_grouped_repeated_calls_and_counters(interp):
    """Calls of several groups on one workspace shape: counters reset and epoch flips once per call."""
    fd = interp.fused_decode
    layers = _layers(64, SHARDS["five"], torch.float32, True, 3)
    V, U, b, ranks, outs = pack_grouped(layers)
    ws, ctr = fd._workspace(torch.device("cpu"), 16, V.shape[1])
    for i in range(3):
        x = torch.randn(1 + 5 * i, 64)
        e = int(ctr[2])
        y = fd.lowrank_grouped_decode(x, V, U, b, ranks, outs, cfg=CFG)
        assert ctr.tolist() == [0, 0, 1 - e, 0]
        assert not ws[1 - e].any()
        torch.testing.assert_close(y.double(), _ref64(x, layers), rtol=1e-4, atol=1e-4)


@pytest.fixture
def kernel_dispatch(interp, monkeypatch):
    """`lowrank_linear_grouped`'s CUDA branch, on the CPU: device layer mocked, interpreted kernels."""
    monkeypatch.setattr(ops, "use_triton", lambda x: x.dtype in (torch.float16, torch.float32))
    monkeypatch.setattr(ops, "_device_index", lambda x: 0)
    monkeypatch.setattr(configs, "device_slug", lambda i: "")
    monkeypatch.setattr(ops, "fused_decode", interp.fused_decode)
    calls = []
    real = interp.fused_decode.lowrank_grouped_decode
    monkeypatch.setattr(interp.fused_decode, "lowrank_grouped_decode",
                        lambda *a, **k: calls.append(k["cfg"]["method"]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("M", [1, 3, 100])
def test_grouped_op_takes_the_kernel_at_decode_m(kernel_dispatch, M):
    layers = _layers(48, SHARDS["residual"], torch.float32, True, 11)
    V, U, b, ranks, outs = pack_grouped(layers)
    x = torch.randn(2, M, 48)
    y = lowrank_linear_grouped(x, V, U, b, ranks, outs)
    torch.testing.assert_close(y.double(), _ref64(x, layers), rtol=1e-4, atol=1e-4)
    # decode buckets run the kernel pair; M = 200 rows is a cuBLAS bucket (the torch math, no cat)
    method = configs.get_config(2 * M, 48, sum(outs), V.shape[1])["method"]
    assert kernel_dispatch == ([method] if method in ("fused", "two_launch", "two_launch_pdl") else [])
    assert (M == 100) == (kernel_dispatch == [])


def test_grouped_op_checks_are_one_line_lrinfer_errors():
    from lrinfer.errors import LrinferError

    layers = _layers(32, SHARDS["gate_up"], torch.float32, True, 0)
    V, U, b, ranks, outs = pack_grouped(layers)
    x = torch.randn(3, 32)
    bad = [((x, V, U[::2].contiguous()[:-1], b, ranks, outs), "packed 1-D"),
           ((x, V, torch.stack([U, U], 1)[:, 0], b, ranks, outs), "must be contiguous"),
           ((x.half(), V, U, b, ranks, outs), "all must match"),
           ((x.long(), V, U, b, ranks, outs), "floating dtype"),
           ((x, V, U, b, [40, 0], outs), "rank must be >= 1")]
    for args, match in bad:
        with pytest.raises(LrinferError, match=match) as ei:
            lowrank_linear_grouped(*args)
        assert "\n" not in str(ei.value)
