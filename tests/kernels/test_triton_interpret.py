"""Triton kernels under TRITON_INTERPRET=1 (CPU) vs a float64 reference.

The decode path runs as two launches here (shrink, expand): the interpreter runs programs one
after another, so the fused kernel's grid barrier would hang; that kernel is tested in test_gpu.py.
bf16 `tl.dot` is broken in the interpreter, so only fp32/fp16 run here.
"""
from __future__ import annotations

import pytest
import torch

from lrinfer.kernels import configs

from ._util import assert_close, make_case, ref64

DTYPES = [torch.float32, torch.float16]

# small tiles so tails, several tiles and several in-splits are all exercised
DECODE_CFG = {**configs.DEFAULTS[1], "BLOCK_M": 16, "BLOCK_IN": 32, "BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 32}
PREFILL_CFG = {**configs.DEFAULTS[8192], "PM": 32, "PN": 32, "PK": 32}

# (M, in, out, k, k2, bias)
CASES = [
    (1, 200, 150, 77, 0, True),
    (7, 130, 70, 1, 0, False),
    (7, 200, 150, 200, 0, True),
    (1, 100, 90, 77, 13, True),  # residual pair
    (300, 70, 50, 77, 5, True),
]


def _ids(c):
    return "M{}-in{}-out{}-k{}-k2{}-{}".format(*c[:5], "bias" if c[5] else "nobias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_two_launch(interp, case, dtype):
    M, IN, OUT, k, k2, bias = case
    x, V, U, b, V2, U2 = make_case(M, IN, OUT, k, k2, dtype, bias)
    cfg = dict(DECODE_CFG, BLOCK_M=64 if M > 16 else 16)
    y = interp.fused_decode.lowrank_decode(x, V, U, b, V2, U2, cfg=cfg, fused=False, max_programs=8)
    assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_prefill(interp, case, dtype):
    M, IN, OUT, k, k2, bias = case
    x, V, U, b, V2, U2 = make_case(M, IN, OUT, k, k2, dtype, bias)
    y = interp.prefill.lowrank_prefill(x, V, U, b, V2, U2, cfg=PREFILL_CFG)
    assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


def test_decode_workspace_reuse(interp):
    """Repeated calls with varying M and factors share one workspace; each must start from zero."""
    fd = interp.fused_decode
    for M in (7, 1, 16, 3, 7):
        x, V, U, b, V2, U2 = make_case(M, 96, 40, 50, 0, torch.float32, True)
        y = fd.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=False, max_programs=5)
        assert_close(y, ref64(x, V, U, b), torch.float32)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_strided_3d_x_and_transposed_factors(interp, path):
    """Non-contiguous 3-D x (reshaped to 2-D by stride) and factors given as transposed views."""
    dtype = torch.float16
    xb = torch.randn(3, 50, 2 * 96, dtype=dtype)
    x3 = xb[:, ::17, ::2]  # shape [3, 3, 96], non-contiguous
    x2 = x3.reshape(-1, 96)
    _, V, U, b, _, _ = make_case(1, 96, 60, 33, 0, dtype, True)
    Vt = V.t().contiguous().t()  # column-major V
    if path == "decode":
        y = interp.fused_decode.lowrank_decode(x2, Vt, U, b, cfg=DECODE_CFG, fused=False)
    else:
        y = interp.prefill.lowrank_prefill(x2, Vt, U, b, cfg=PREFILL_CFG)
    assert_close(y.reshape(3, 3, 60), ref64(x3, V, U, b), dtype)


def test_residual_pair_equals_concatenated(interp):
    x, V, U, b, V2, U2 = make_case(5, 64, 48, 20, 9, torch.float32, True)
    fd = interp.fused_decode
    y_pair = fd.lowrank_decode(x, V, U, b, V2, U2, cfg=DECODE_CFG, fused=False)
    y_cat = fd.lowrank_decode(x, torch.cat([V, V2], 1), torch.cat([U, U2], 1), b, cfg=DECODE_CFG, fused=False)
    torch.testing.assert_close(y_pair, y_cat, rtol=1e-5, atol=1e-5)


def test_fused_refuses_cpu(interp):
    x, V, U, b, _, _ = make_case(1, 32, 32, 16)
    with pytest.raises(ValueError, match="CUDA"):
        interp.fused_decode.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=True)


def test_bad_block_config(interp):
    x, V, U, b, _, _ = make_case(1, 32, 32, 16)
    with pytest.raises(ValueError, match="power of two"):
        interp.fused_decode.lowrank_decode(x, V, U, b, cfg=dict(DECODE_CFG, BLOCK_K=24), fused=False)
