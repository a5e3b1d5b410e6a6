"""CUDA-only checks (skipped without a GPU): compiled kernels, the fused single launch, graphs."""
from __future__ import annotations

import pytest
import torch

import lrinfer.runtime.kernels as K
from lrinfer.runtime.kernels import configs

from ._util import assert_close, make_case, ref64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = [  # (M, in, out, k, k2, bias)
    (1, 4096, 4096, 1224, 0, False),
    (1, 200, 150, 77, 0, True),
    (7, 1000, 3000, 1, 0, True),
    (16, 777, 1234, 200, 40, True),
    (32, 512, 300, 96, 0, False),
    (300, 300, 200, 77, 9, True),
]


def _ids(c):
    return "M{}-in{}-out{}-k{}-k2{}-{}".format(*c[:5], "bias" if c[5] else "nobias")


def _sms():
    return torch.cuda.get_device_properties(0).multi_processor_count


MODES = {"fused": dict(fused=True), "two_launch": dict(fused=False), "two_launch_pdl": dict(fused=False, pdl=True)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("mode", list(MODES))
def test_decode_kernels(case, dtype, mode):
    from lrinfer.runtime.kernels import fused_decode

    M, IN, OUT, k, k2, bias = case
    x, V, U, b, V2, U2 = make_case(M, IN, OUT, k, k2, dtype, bias, device="cuda")
    cfg = dict(configs.DEFAULTS[min(M, 32)])
    for _ in range(3):  # repeated calls reuse the workspace; fresh NaN-poisoned output each time
        y = torch.full((M, OUT), float("nan"), dtype=dtype, device="cuda")
        fused_decode.lowrank_decode(x, V, U, b, V2, U2, cfg=cfg, max_programs=_sms(), out=y, **MODES[mode])
        assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


def test_pdl_available_on_sm90():
    """Hopper + Triton >= 3.4: the two_launch_pdl mode really uses programmatic dependent launch."""
    from lrinfer.runtime.kernels import fused_decode

    if torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("programmatic dependent launch needs SM90+")
    assert fused_decode.pdl_supported(0), fused_decode.launch_features()


@pytest.mark.parametrize("over_ask", [1, 8])
def test_fused_grid_bounded_by_residency(over_ask):
    """max_programs far above the SM count: the launcher clamps to SMs × occupancy (cooperative)."""
    from lrinfer.runtime.kernels import fused_decode

    x, V, U, b, _, _ = make_case(32, 4096, 4096, 1224, 0, torch.bfloat16, True, device="cuda")
    cfg = dict(configs.DEFAULTS[32])
    y = fused_decode.lowrank_decode(x, V, U, b, cfg=cfg, fused=True, max_programs=over_ask * _sms())
    torch.cuda.synchronize()
    assert_close(y, ref64(x, V, U, b), torch.bfloat16)
    info = fused_decode.decode_launch_info()
    assert info["resident"], info
    for v in info["resident"].values():
        assert v["sms"] == _sms() and v["occupancy"] >= 1


def _stress(*extra, env=None):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    full_env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    cmd = [sys.executable, str(Path(__file__).with_name("_two_streams.py")), "--iters", "1000", *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=full_env, cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fused kernel from two streams HUNG (no exit in 240 s): {' '.join(extra)} {env or ''}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cooperative", ["1", "0"], ids=["cooperative", "slack-guard"])
@pytest.mark.parametrize("extra", [(), ("--low-occupancy", "--over-ask", "4")], ids=["default", "low-occ-over-ask"])
def test_fused_two_streams_thousand_times_never_hangs(cooperative, extra):
    """Two streams launch the fused kernel at once, 1000 times each (queues filled behind a device
    sleep so that the grids really overlap), with the cooperative launch and with the grid-bound
    guard alone; a hang is a subprocess that does not exit within the timeout."""
    out = _stress(*extra, env={"LRINFER_COOPERATIVE": cooperative})
    assert out["iters"] == 1000 and max(out["rel_err"]) < 2e-2, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_prefill_kernel(case, dtype):
    from lrinfer.runtime.kernels import prefill

    M, IN, OUT, k, k2, bias = case
    x, V, U, b, V2, U2 = make_case(M, IN, OUT, k, k2, dtype, bias, device="cuda")
    y = prefill.lowrank_prefill(x, V, U, b, V2, U2, cfg=configs.DEFAULTS[8192])
    assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
def test_op_dispatch_3d_noncontiguous(M):
    dtype = torch.bfloat16
    _, V, U, b, V2, U2 = make_case(1, 512, 384, 100, 12, dtype, True, device="cuda")
    xb = torch.randn(M, 2, 1024, device="cuda", dtype=dtype)
    x = xb[:, :, ::2]  # shape [M, 2, 512], non-contiguous
    y = K.lowrank_linear(x, V, U, b, V2, U2)
    assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


def _capture_replay_and_check(x, V, U, b, dtype):
    """Capture one call in a CUDA graph, replay it on fresh inputs, compare with float64."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = K.lowrank_linear(x, V, U, b)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert_close(y, ref64(x, V, U, b), dtype)


def test_cuda_graph_capture_replay():
    dtype = torch.bfloat16
    x, V, U, b, V2, U2 = make_case(1, 1024, 768, 200, 0, dtype, True, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on the capture stream (compiles kernels, caches workspace)
        for _ in range(2):
            K.lowrank_linear(x, V, U, b)
    torch.cuda.current_stream().wait_stream(s)
    _capture_replay_and_check(x, V, U, b, dtype)


def test_cuda_graph_capture_cold_workspace():
    """First call inside capture: the workspace is allocated for the graph, not cached."""
    dtype = torch.float16
    x, V, U, b, _, _ = make_case(2, 640, 320, 48, 0, dtype, True, device="cuda")
    K.lowrank_linear(x, V, U, b)  # compile kernels on the default stream
    _capture_replay_and_check(x, V, U, b, dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_graph_each_decode_mode(mode):
    """Each decode mode captured in a CUDA graph (cooperative launch / PDL edges in the graph)."""
    from lrinfer.runtime.kernels import fused_decode

    dtype = torch.bfloat16
    x, V, U, b, V2, U2 = make_case(4, 2048, 1536, 300, 24, dtype, True, device="cuda")
    cfg = dict(configs.DEFAULTS[4])

    def call():
        return fused_decode.lowrank_decode(x, V, U, b, V2, U2, cfg=cfg, max_programs=_sms(), **MODES[mode])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = call()
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert_close(y, ref64(x, V, U, b, V2, U2), dtype)


def test_torch_compile_cuda():
    dtype = torch.bfloat16
    x, V, U, b, _, _ = make_case(4, 256, 128, 40, 0, dtype, True, device="cuda")
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.nn.functional.silu(K.lowrank_linear(x, V, U, b)), fullgraph=True)
    assert_close(f(x), torch.nn.functional.silu(ref64(x, V, U, b)), dtype)
