"""Triton kernels under TRITON_INTERPRET=1 (CPU) vs a float64 reference.

The interpreter runs a grid's programs one after another, so a grid barrier would hang unless the
grid is ONE program: the fused single-launch kernel runs here with max_programs=1 (its barrier then
passes at once), which checks its whole body; the two-launch decode path runs with any grid.
Grids of many programs of the fused kernel are tested in test_gpu.py.
bf16 `tl.dot` is broken in the interpreter, so only fp32/fp16 run here.
"""
from __future__ import annotations

import pytest
import torch

from lrinfer.runtime.kernels import configs

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


def test_fused_refuses_cpu_grid_of_many(interp):
    x, V, U, b, _, _ = make_case(1, 32, 32, 16)
    with pytest.raises(ValueError, match="CUDA"):
        interp.fused_decode.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=True)
    with pytest.raises(ValueError, match="max_programs=1"):
        interp.fused_decode.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=True, max_programs=2)


# (M, k, k2, bias): one workspace shape (cap 16 rows, KT = k + k2 = 40) for every call, so the
# epoch flips from call to call on the same buffers, with and without the residual pair and bias
FUSED_SEQUENCE = [(3, 40, 0, True), (1, 33, 7, True), (16, 40, 0, False), (7, 33, 7, False),
                  (1, 40, 0, True), (11, 33, 7, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_single_program_whole_body(interp, dtype):
    """The fused kernel, grid of one program, over repeated calls against float64: phase 1 leaves
    t = x [V|V2] in the current buffer, the next buffer is zeroed, the finishing reset clears both
    counters and flips the epoch, and phase 2 gives y (bias, residual pair) in every element."""
    fd = interp.fused_decode
    IN, OUT, BM = 70, 50, 16
    cfg = dict(DECODE_CFG, BLOCK_M=BM)
    ws, ctr = fd._workspace(torch.device("cpu"), BM, 40)  # the buffers every call below uses
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for i, (M, k, k2, bias) in enumerate(FUSED_SEQUENCE):
        x, V, U, b, V2, U2 = make_case(M, IN, OUT, k, k2, dtype, bias)
        e = int(ctr[2])
        assert ctr.tolist() == [0, 0, e, 0]
        assert not ws[e].any(), "the current buffer is zero on entry"
        had_t = bool(ws[1 - e].any())  # the previous call's t, which this call must zero
        assert had_t or i == 0
        y = torch.full((M, OUT), float("nan"), dtype=dtype)
        fd.lowrank_decode(x, V, U, b, V2, U2, cfg=cfg, fused=True, max_programs=1, out=y)
        assert ctr.tolist() == [0, 0, 1 - e, 0], "counters reset and epoch flipped"
        t_ref = torch.cat([x.double() @ V.double()] + ([x.double() @ V2.double()] if k2 else []), 1)
        torch.testing.assert_close(ws[e, :M].double(), t_ref, rtol=tol, atol=tol)
        assert not ws[e, M:].any(), "rows past M untouched"
        assert not ws[1 - e].any(), f"the next buffer was zeroed (held the previous t: {had_t})"
        assert not torch.isnan(y).any(), "every element of y written"
        assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


def test_fused_single_program_matches_two_launch_bitwise(interp):
    """With one in-split both forms add the same fp32 partial sums in the same order."""
    fd = interp.fused_decode
    x, V, U, b, V2, U2 = make_case(5, 150, 90, 60, 9, torch.float32, True)
    y_fused = fd.lowrank_decode(x, V, U, b, V2, U2, cfg=DECODE_CFG, fused=True, max_programs=1)
    y_two = fd.lowrank_decode(x, V, U, b, V2, U2, cfg=DECODE_CFG, fused=False, max_programs=1)
    assert torch.equal(y_fused, y_two)


def test_pdl_flag_off_cuda_is_plain_two_launch(interp):
    """pdl=True needs SM90 + Triton's launch_pdl; elsewhere it is the ordinary two launches."""
    fd = interp.fused_decode
    x, V, U, b, _, _ = make_case(4, 96, 64, 24, 0, torch.float32, True)
    y_pdl = fd.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=False, pdl=True, max_programs=4)
    y_two = fd.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=False, max_programs=4)
    assert torch.equal(y_pdl, y_two)


def test_out_strided_and_checked(interp):
    fd = interp.fused_decode
    x, V, U, b, _, _ = make_case(3, 64, 40, 16, 0, torch.float32, True)
    buf = torch.full((3, 80), float("nan"))
    y = fd.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=True, max_programs=1, out=buf[:, ::2])
    assert_close(y, ref64(x, V, U, b), torch.float32)
    assert torch.isnan(buf[:, 1::2]).all(), "only the strided view was written"
    with pytest.raises(ValueError, match="out must be"):
        fd.lowrank_decode(x, V, U, b, cfg=DECODE_CFG, fused=False, out=torch.empty(3, 41))


def test_launch_features_reported(interp):
    info = interp.fused_decode.decode_launch_info()
    assert {"triton", "cooperative", "pdl", "cooperative_enabled", "stream_slack"} <= set(info)


def test_bad_block_config(interp):
    x, V, U, b, _, _ = make_case(1, 32, 32, 16)
    with pytest.raises(ValueError, match="power of two"):
        interp.fused_decode.lowrank_decode(x, V, U, b, cfg=dict(DECODE_CFG, BLOCK_K=24), fused=False)
