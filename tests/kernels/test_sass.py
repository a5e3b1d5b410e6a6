"""The compiled code of the kernels, on the CPU (no GPU): `lrinfer.runtime.kernels.inspect.compile_only`
compiles the launcher's exact specialization for sm_90 and reads the SASS.

For the Llama-2-7B / Llama-3-8B linear shapes at 20/40/60% with the ranks `compress` emits (and
ResSVD residual pairs, padded at load as `LowRankLinear` does), in bf16 and fp16:
  * weights are read with 16-byte cp.async / vector loads, never 1-2 byte scalar loads;
  * split-K accumulation is relaxed reductions (RED), no fence or L1 invalidate per atomic;
  * no local-memory spills;
  * registers and shared memory allow the occupancy the launcher's grid assumes (grid <= SMs x occupancy).
Skipped where the Triton NVIDIA backend (ptxas, cuobjdump) is missing.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from lrinfer.offline.compress import CompressConfig  # noqa: E402
from lrinfer.factors import rank_for_ratio  # noqa: E402
from lrinfer.runtime.kernels import configs  # noqa: E402
from lrinfer.runtime.kernels import inspect as ki  # noqa: E402
from lrinfer.offline.solvers.ressvd import residual_rank  # noqa: E402

SHAPES = {"llama2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
          "llama3-8b": [(4096, 1024), (4096, 14336), (14336, 4096)]}
RATIOS = (0.2, 0.4, 0.6)
ARCH = 90


def _backend_or_skip():
    try:
        ki._tool("cuobjdump")
        ki._tool("ptxas")
    except Exception as e:
        pytest.skip(f"no Triton NVIDIA backend here: {e}")


def _emitted(i, o, ratio, multiple=None):
    """The rank `compress` emits with the default (or given) rank multiple."""
    return rank_for_ratio(i, o, ratio, multiple or CompressConfig.__dataclass_fields__["rank_multiple"].default)


def _cases():
    out = []
    for model, shapes in SHAPES.items():
        for i, o in shapes:
            for r in RATIOS:
                out.append(pytest.param(i, o, _emitted(i, o, r), 0, id=f"{model}-{i}x{o}-{int(r * 100)}%"))
    # ResSVD residual pairs (β = 0.05) at 40%: r1 = k − r2, r2 rounded by the solver, padded at load
    for i, o in SHAPES["llama2-7b"] + SHAPES["llama3-8b"][:1]:
        k = _emitted(i, o, 0.4)
        r2 = residual_rank(o, i, k, 0.05)
        out.append(pytest.param(i, o, k - r2, r2, id=f"ressvd-{i}x{o}-40%"))
    # a checkpoint written with the old rank multiple 8 (k ≡ 8 mod 16), padded at load
    out.append(pytest.param(4096, 11008, _emitted(4096, 11008, 0.4, 8), 0, id="multiple8-4096x11008-40%"))
    return out


def _check_kernel(k, why):
    s = k.sass
    assert s["ldg_scalar"] == 0, f"{why}: {k.name} has {s['ldg_scalar']} 1-2 byte scalar loads"
    assert s["cp_async_128"] > 0 or s["tma"] > 0, f"{why}: {k.name} streams no weights with 16-byte cp.async/TMA"
    assert s["cp_async_all"] == s["cp_async_128"], f"{why}: {k.name} has narrower cp.async {s}"
    assert k.spill_bytes == 0 and s["local"] == 0, f"{why}: {k.name} spills ({k.spill_bytes} B local)"
    assert k.occupancy >= 1, f"{why}: {k.name} cannot be resident ({k.regs} regs, {k.shared} B shared)"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("i, o, r1, r2", _cases())
def test_fused_decode_sass(i, o, r1, r2, dtype):
    _backend_or_skip()
    k1, k2 = configs.aligned_rank(r1), configs.aligned_rank(r2)
    res = ki.compile_only("fused", dtype, i, o, k1, k2, m=1, arch=ARCH)
    (k,) = res.kernels
    why = f"{i}x{o} k={r1}+{r2} (kernels get {k1}+{k2}) {dtype}"
    _check_kernel(k, why)
    s = k.sass
    assert s["red"] >= 1, f"{why}: the split-K adds are not relaxed reductions: {s}"
    # fences: the grid barrier (release, acquire) and the finishing counters only, whatever the
    # number of split-K reductions (acq_rel atomics would add MEMBAR.GPU + CCTL.IVALL per atomic)
    assert s["membar"] <= 6 and s["cctl"] <= 7, f"{why}: per-atomic fences {s}"
    assert s["atom"] <= 5, f"{why}: split-K adds compiled as ATOM {s}"
    # the grid the launcher would launch fits co-resident: SMs × occupancy of the compiled kernel
    assert k.grid <= ki.ARCHS[ARCH].sms * k.occupancy
    assert k.occupancy >= 2, f"{why}: {k.regs} regs, {k.shared} B shared leave one program per SM"


@pytest.mark.parametrize("method", ["two_launch", "two_launch_pdl"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_two_launch_sass(method, dtype):
    _backend_or_skip()
    i, o = 4096, 11008
    res = ki.compile_only(method, dtype, i, o, configs.aligned_rank(_emitted(i, o, 0.4)), m=1, arch=ARCH)
    shrink, expand = res.kernels
    for k in res.kernels:
        _check_kernel(k, f"{method} {dtype}")
    assert shrink.sass["red"] >= 1 and shrink.sass["atom"] == 0
    assert shrink.sass["membar"] == 0 and shrink.sass["cctl"] == 0, shrink.sass
    if method == "two_launch_pdl":
        assert "griddepcontrol.launch_dependents" in shrink.ptx and "griddepcontrol.wait" in expand.ptx


@pytest.mark.parametrize("m", [16, 32])
def test_fused_decode_sass_larger_m(m):
    """The M buckets that still use the fused kernel (BLOCK_M grows with M)."""
    _backend_or_skip()
    i, o = 4096, 14336
    k = ki.compile_only("fused", "bfloat16", i, o, configs.aligned_rank(_emitted(i, o, 0.4)), m=m, arch=ARCH)
    _check_kernel(k.kernels[0], f"M={m}")


def test_prefill_sass():
    _backend_or_skip()
    i, o = 4096, 11008
    res = ki.compile_only("triton", "bfloat16", i, o, configs.aligned_rank(_emitted(i, o, 0.4)), m=8192, arch=ARCH)
    assert len(res.kernels) == 2
    for k in res.kernels:
        assert k.sass["ldg_scalar"] == 0 and k.spill_bytes == 0 and k.occupancy >= 1, k.summary()


def test_unaligned_rank_compiles_to_scalar_loads():
    """Why ranks are padded: at k ≡ 8 mod 16 the same kernel reads V and U 2 bytes at a time."""
    _backend_or_skip()
    res = ki.compile_only("fused", "bfloat16", 4096, 11008, 1784, m=1, arch=ARCH)
    assert res.kernels[0].sass["ldg_scalar"] > 0


def test_estimate_beats_dense_4096x11008():
    """The issue's target: the ESTIMATE for 4096→11008 at 40%, M=1, bf16, H100 is >= 1.4x dense."""
    _backend_or_skip()
    i, o = 4096, 11008
    res = ki.compile_only("fused", "bfloat16", i, o, configs.aligned_rank(_emitted(i, o, 0.4)), m=1, arch=ARCH)
    est = res.estimate
    assert "ESTIMATE" in est["label"]
    h100 = est["h100"]
    assert h100["dense_bytes"] == i * o * 2
    assert h100["weight_bytes"] == (i + o) * res.shape["k"] * 2
    assert h100["speedup_vs_dense"] >= 1.4, h100
    assert h100["in_flight_per_sm"]["expand"] >= h100["needed_in_flight_per_sm"], h100


def test_tuner_prunes_with_the_estimate():
    """bench/tune_kernels.py keeps the candidates with the best ESTIMATE (CPU only, no GPU)."""
    _backend_or_skip()
    import os
    import sys

    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    sys.path.insert(0, os.path.abspath(bench))
    try:
        import tune_kernels as tk
    finally:
        sys.path.pop(0)
    base = {**configs.DEFAULTS[1], "method": "fused"}
    starved = {**base, "BLOCK_N": 16, "BLOCK_R": 16, "num_stages": 1}  # one 512-byte U tile in flight
    kept = tk.prune([{"method": "torch"}, starved, base], [(4096, 11008, 1792)], 1, keep=1)
    assert kept[0] == ({"method": "torch"}, None)
    assert [c for c, _ in kept[1:]] == [base]
    assert tk.estimate_us(starved, 4096, 11008, 1792, 1) > tk.estimate_us(base, 4096, 11008, 1792, 1)


GROUPED = {"llama2-7b-qkv": (4096, (4096, 4096, 4096)), "llama2-7b-gate_up": (4096, (11008, 11008)),
           "llama3-8b-qkv": (4096, (4096, 1024, 1024)), "llama3-8b-gate_up": (4096, (14336, 14336))}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_sass(name, dtype):
    """The grouped pair (fused qkv / gate_up) at 40%: 16-byte weight loads, relaxed split-K
    reductions, no spills, PDL on sm_90; its ESTIMATE beats S separate calls + torch.cat."""
    _backend_or_skip()
    i, outs = GROUPED[name]
    groups = [(o, configs.aligned_rank(_emitted(i, o, 0.4))) for o in outs]
    res = ki.compile_only("grouped", dtype, i, 0, 0, m=1, arch=ARCH, groups=groups)
    shrink, expand = res.kernels
    for k in res.kernels:
        _check_kernel(k, f"grouped {name} {dtype}")
    assert expand.name == "grouped_expand_kernel" and expand.grid == sum(-(-o // res.config["BLOCK_N"]) for o in outs)
    assert shrink.sass["red"] >= 1 and shrink.sass["atom"] == 0, shrink.sass
    assert shrink.sass["membar"] == 0 and shrink.sass["cctl"] == 0, shrink.sass
    assert expand.sass["red"] == 0 and expand.sass["atom"] <= 5, expand.sass  # the finishing counters only
    assert "griddepcontrol.launch_dependents" in shrink.ptx and "griddepcontrol.wait" in expand.ptx
    est = res.estimate
    assert "ESTIMATE" in est["label"] and est["h100"]["speedup_vs_separate"] > 1.1, est["h100"]
