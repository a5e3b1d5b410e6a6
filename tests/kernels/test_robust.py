"""Robustness of the CUDA launch layer, on the CPU with the launch layer mocked (issue 23 item 5).

The interpreted `fused_decode` (conftest `interp`) runs the real kernels; `_launch_kernel` is
replaced by a fake driver that refuses cooperative launches with the error Triton 3.6's launcher
raises for them (RuntimeError "Triton Error [CUDA]: <cuGetErrorString>", from gpuAssert in
triton/backends/nvidia/driver.py). Results are checked against float64.
"""
from __future__ import annotations

import logging

import pytest
import torch

from lrinfer.runtime.kernels import configs, ops

from ._util import assert_close, make_case, ref64

CFG = {**configs.DEFAULTS[1], "BLOCK_M": 16, "BLOCK_IN": 32, "BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 32}
REFUSED = "Triton Error [CUDA]: too many blocks in cooperative launch"


@pytest.fixture
def fd(interp, monkeypatch):
    """The interpreted module with a clean cache and a recording launch layer."""
    mod = interp.fused_decode
    monkeypatch.setattr(mod, "_WORKSPACES", {})
    monkeypatch.setattr(mod, "_COOP_REFUSED", {})
    mod.launched = []
    real = mod._launch_kernel

    def record(launch):
        mod.launched.append((launch.kernel.__name__, dict(launch.meta)))
        real(launch)
    monkeypatch.setattr(mod, "_launch_kernel", record)
    mod.real_launch = real
    return mod


def _refusing(mod, message=REFUSED):
    def launch(launch):
        mod.launched.append((launch.kernel.__name__, dict(launch.meta)))
        if launch.meta.get("launch_cooperative_grid"):
            raise RuntimeError(message)
        mod.real_launch(launch)
    return launch


@pytest.mark.parametrize("message", [REFUSED, "Triton Error [CUDA]: operation not supported",
                                     "Triton Error [CUDA]: operation not permitted when stream is capturing"])
def test_refused_cooperative_launch_falls_back_with_one_log_line(fd, monkeypatch, caplog, message):
    monkeypatch.setattr(fd, "_launch_kernel", _refusing(fd, message))
    caplog.set_level(logging.WARNING, logger="lrinfer.runtime.kernels")
    for M in (1, 5, 3):
        x, V, U, b, V2, U2 = make_case(M, 70, 50, 24, 8, torch.float16, True)
        y = fd.lowrank_decode(x, V, U, b, V2, U2, cfg=CFG, fused=True, max_programs=1, cooperative=True)
        assert_close(y, ref64(x, V, U, b, V2, U2), torch.float16)
    names = [n for n, _ in fd.launched]
    # each call: the refused fused attempt, then shrink + expand
    assert names == ["fused_kernel", "shrink_kernel", "expand_kernel"] * 3, names
    lines = [r for r in caplog.records if "cooperative launch" in r.getMessage()]
    assert len(lines) == 1 and "two_launch_pdl" in lines[0].getMessage()
    assert fd.cooperative_refused(0, False) and not fd.cooperative_refused(0, True)


def test_other_launch_errors_raise_and_drop_the_workspace(fd, monkeypatch):
    """A failure that is not a refusal is not hidden; the call's workspace leaves the cache."""
    x, V, U, b, _, _ = make_case(2, 64, 40, 16, 0, torch.float32, True)
    fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=False, max_programs=4)
    (key,) = fd._WORKSPACES

    def broken(launch):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    monkeypatch.setattr(fd, "_launch_kernel", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=True, max_programs=1, cooperative=True)
    assert key not in fd._WORKSPACES


def test_failed_expand_leaves_no_dirty_workspace(fd, monkeypatch):
    """The shrink ran (t accumulated in buffer `epoch`), the expand launch failed: the next call must
    not add into that t. It gets a fresh zeroed workspace and the right answer."""
    x, V, U, b, _, _ = make_case(3, 64, 40, 16, 0, torch.float32, True)

    def expand_fails(launch):
        if launch.kernel.__name__ == "expand_kernel":
            raise RuntimeError("Triton Error [CUDA]: launch failed")
        fd.real_launch(launch)
    monkeypatch.setattr(fd, "_launch_kernel", expand_fails)
    with pytest.raises(RuntimeError):
        fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=False, max_programs=4)
    monkeypatch.setattr(fd, "_launch_kernel", fd.real_launch)
    assert fd._WORKSPACES == {}
    y = fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=False, max_programs=4)
    assert_close(y, ref64(x, V, U, b), torch.float32)
    (ws, ctr), = fd._WORKSPACES.values()
    assert ctr.tolist() == [0, 0, 1, 0] and not ws[1].any(), "fresh counters, next buffer zero"


def test_capture_and_eager_never_share_a_workspace(fd, monkeypatch):
    """Workspaces are keyed by capture: two captures and eager calls get three distinct buffers;
    calls within one capture share theirs."""
    token = {"v": None}
    monkeypatch.setattr(fd, "_capture_token", lambda device: token["v"])
    x, V, U, b, _, _ = make_case(1, 64, 40, 16, 0, torch.float32, True)
    seen = {}
    for t in (None, ("capture", 7), ("capture", 7), ("capture", 8), None):
        token["v"] = t
        y = fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=False, max_programs=4)
        assert_close(y, ref64(x, V, U, b), torch.float32)
        key = fd._workspace_key(x.device, 16, 16)
        seen.setdefault(t, set()).add(id(fd._WORKSPACES[key][0]))
    ids = [next(iter(v)) for v in seen.values()]
    assert len(seen) == 3 and all(len(v) == 1 for v in seen.values()) and len(set(ids)) == 3


def test_rank_zero_is_bias_or_zero(fd):
    x = torch.randn(4, 64)
    b = torch.randn(40)
    V, U = torch.empty(64, 0), torch.empty(40, 0)
    torch.testing.assert_close(fd.lowrank_decode(x, V, U, b, cfg=CFG, fused=False), b.expand(4, 40))
    assert not fd.lowrank_decode(x, V, U, None, cfg=CFG, fused=True, max_programs=1).any()
    assert fd.launched == []
    # an empty first pair with a residual pair: the residual pair alone
    _, _, _, _, V2, U2 = make_case(4, 64, 40, 1, 12, torch.float32, False)
    y = fd.lowrank_decode(x, V, U, b, V2, U2, cfg=CFG, fused=False)
    assert_close(y, ref64(x, V2, U2, b), torch.float32)


def test_op_rank_zero_on_the_kernel_path(monkeypatch):
    """The CUDA dispatch (`_triton_forward`) with k = 0: bias or zeros, no kernel, any leading dims."""
    monkeypatch.setattr(ops, "_device_index", lambda x: 0)
    x = torch.randn(2, 3, 64)
    b = torch.randn(40)
    y = ops._triton_forward(x, torch.empty(64, 0), torch.empty(40, 0), b, None, None)
    torch.testing.assert_close(y, b.expand(2, 3, 40))
    assert y.data_ptr() != b.data_ptr()
    assert not ops._triton_forward(x, torch.empty(64, 0), torch.empty(40, 0), None, None, None).any()
    # and the CPU op agrees
    torch.testing.assert_close(ops.lowrank_linear(x, torch.empty(64, 0), torch.empty(40, 0), b), b.expand(2, 3, 40))


class _FakeCuda:
    is_cuda = True
    dtype = torch.float16
    device = torch.device("cuda", 0)


def test_below_sm80_uses_torch_with_one_log_line(monkeypatch, caplog):
    caps = {"v": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps["v"])
    monkeypatch.setattr(ops, "HAS_TRITON", True)
    ops._arch_ok.cache_clear()
    caplog.set_level(logging.WARNING, logger="lrinfer.runtime.kernels")
    try:
        assert not ops.use_triton(_FakeCuda()) and not ops.use_triton(_FakeCuda())
        assert len([r for r in caplog.records if "below sm_80" in r.getMessage()]) == 1
        ops._arch_ok.cache_clear()
        caps["v"] = (8, 0)
        assert ops.use_triton(_FakeCuda())
    finally:
        ops._arch_ok.cache_clear()


def test_cooperative_decision(fd, monkeypatch):
    """Cooperative where Triton can; never under capture before `probe_capture` passed (then two
    launches); never again where the driver refused it; the probe runs once, on an eager call."""
    probes = []
    monkeypatch.setattr(fd, "_cooperative_enabled", lambda: True)
    monkeypatch.setattr(fd, "_CAPTURE_COOP", {})
    monkeypatch.setattr(fd, "probe_capture", lambda dev: probes.append(dev) or fd._CAPTURE_COOP.setdefault(dev, True))
    decide = fd._decide_cooperative
    assert decide(True, True, 0, True) == (False, False), "capture before any probe: two launches"
    assert probes == []
    assert decide(True, True, 0, False) == (True, True) and probes == [0]
    assert decide(True, True, 0, True) == (True, True), "capture after a passed probe"
    assert decide(True, True, 0, False) == (True, True) and probes == [0], "probed once"
    fd._CAPTURE_COOP[1] = False  # device 1 failed its probe
    assert decide(True, True, 1, True) == (False, False) and decide(True, True, 1, False) == (True, True)
    fd._note_refusal(0, False, RuntimeError(REFUSED))
    assert decide(True, True, 0, False) == (False, False) and decide(True, True, 0, True) == (True, True)
    assert decide(False, True, 2, False) == (False, False) and decide(True, False, 2, False) == (True, False)
    monkeypatch.setattr(fd, "_cooperative_enabled", lambda: False)  # no cooperative launch in Triton
    assert decide(True, True, 3, True) == (True, False)


def test_warmup_runs_every_shape_dtype_and_bucket(fd, monkeypatch):
    """`lrinfer.runtime.kernels.warmup` launches the kernels of every (shape, dtype, M) through the real
    dispatch (device layer mocked, interpreted kernels); cuBLAS buckets run the torch path."""
    from lrinfer.runtime.kernels import warmup

    monkeypatch.setattr(ops, "use_triton", lambda x: x.dtype in (torch.float16, torch.float32))
    monkeypatch.setattr(ops, "_device_index", lambda x: 0)
    monkeypatch.setattr(configs, "device_slug", lambda i: "")
    monkeypatch.setattr(ops, "fused_decode", fd)
    monkeypatch.setattr(configs, "get_config", lambda m, *a: dict(CFG, method="two_launch_pdl" if m <= 16 else "torch"))
    shapes = [(64, 40, 16), (48, 24, 16, 8, True), {"in": 64, "ranks": [16, 8], "outs": [32, 16]}]
    recs = warmup(shapes, dtypes=(torch.float32, torch.float16), m_buckets=(1, 4, 64), device="cpu")
    assert len(recs) == 3 * 2 * 3
    assert [r["method"] for r in recs] == ["two_launch_pdl", "two_launch_pdl", "torch"] * 6
    names = [n for n, _ in fd.launched]
    assert names.count("expand_kernel") == 2 * 2 * 2 and names.count("grouped_expand_kernel") == 2 * 2
    assert names.count("shrink_kernel") == 3 * 2 * 2
    from lrinfer.errors import LrinferError
    with pytest.raises(LrinferError, match="is not"):
        warmup([(1, 2)], device="cpu")
