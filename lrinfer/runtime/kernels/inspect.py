"""Compile-only inspection of the kernels, without a GPU: what the launcher would run, as SASS.

`compile_only(method, dtype, in_features, out_features, k, k2=0, m=1, config=None, arch=90)`
builds the launches exactly as the launcher does (`fused_decode.plan_decode`,
`prefill.plan_prefill`: the same arguments, strides, constexprs and launch options such as
`launch_cooperative_grid` / `launch_pdl`), runs Triton's own argument specialization on them
(integer divisibility by 16, == 1; pointers 16-byte aligned, as fresh torch allocations are),
compiles each kernel for `GPUTarget("cuda", arch, 32)` and reads the cubin with the
`cuobjdump` shipped in the Triton wheel. Per kernel it reports registers, spills, shared
memory, counts of SASS instructions by kind (load widths, cp.async, TMA, atomics and
reductions, fences, cache invalidations, local memory, tensor-core ops) and the occupancy
(programs per SM) that the grid assumes, computed from the sm_80/sm_90 limits; plus a static
ESTIMATE of time (`estimate.py`).

Methods: "fused", "two_launch" (shrink + expand), "two_launch_pdl" (sm_90+), "triton" (prefill),
"grouped" (the fused-layer op: shrink over [V_0|...] + `grouped_expand_kernel`; shards given as
`groups=[(out_i, k_i), ...]`, PDL on sm_90). Needs the Triton NVIDIA backend (ptxas, cuobjdump), not a GPU.
"""
from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrinfer.errors import LrinferError
from . import configs

METHODS = ("fused", "two_launch", "two_launch_pdl", "triton", "grouped")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many programs are resident at once."""
    name: str
    sms: int                 # SMs of the reference part (A100 / H100 SXM)
    regs: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared: int = 228 * 1024          # shared memory per SM
    shared_per_block: int = 227 * 1024
    shared_reserved: int = 1024       # the driver's reserve per resident block


ARCHS = {80: SMLimits("sm_80", 108, shared=164 * 1024, shared_per_block=163 * 1024),
         90: SMLimits("sm_90", 132)}


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> int:
    """Programs of one kernel resident per SM (0: it cannot launch), as the CUDA occupancy
    calculator computes it: registers allocated per warp in units of 256, shared memory plus
    the per-block reserve, threads and the block limit."""
    lim = ARCHS[arch]
    threads = num_warps * 32
    by_threads = lim.threads // threads
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim.regs // regs_per_warp) // num_warps
    by_shared = lim.blocks if shared == 0 else (
        0 if shared > lim.shared_per_block else lim.shared // (shared + lim.shared_reserved))
    return max(0, min(lim.blocks, by_threads, by_regs, by_shared))


class _ArgStandIn:
    """A tensor argument for Triton's specializer: dtype, shape, strides; 16-byte aligned."""

    def __init__(self, shape, dtype, strides=None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        if strides is None:
            strides, acc = [], 1
            for n in reversed(self.shape):
                strides.insert(0, acc)
                acc *= max(n, 1)
        self._strides = tuple(strides)

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def t(self):
        return _ArgStandIn(tuple(reversed(self.shape)), self.dtype, tuple(reversed(self._strides)))

    def __getitem__(self, idx):  # column slices t[:, a:b] (prefill's t1/t2)
        rows, cols = idx
        start, stop, _ = cols.indices(self.shape[1])
        return _ArgStandIn((self.shape[0], stop - start), self.dtype, self._strides)

    @staticmethod
    def data_ptr():
        return 0

    @staticmethod
    def ptr_range():
        return 0


# ----------------------------------------------------------------------------- SASS


_SASS_KINDS = {
    # loads from global memory, by width
    "ldg_u8": r"\bLDG\.E(?:\.\w+)*\.[US]8\b",
    "ldg_u16": r"\bLDG\.E(?:\.\w+)*\.[US]16\b",
    "ldg_64": r"\bLDG\.E(?:\.\w+)*\.64\b",
    "ldg_128": r"\bLDG\.E(?:\.\w+)*\.128\b",
    "ldg_all": r"\bLDG\b",
    # cp.async (LDGSTS) and TMA / bulk copies
    "cp_async_128": r"\bLDGSTS(?:\.\w+)*\.128\b",
    "cp_async_all": r"\bLDGSTS\b",
    "tma": r"\b(?:UTMALDG|UBLKCP)\b",
    # atomics, reductions, fences, cache invalidations
    "atom": r"\bATOMG?\b",
    "red": r"\bREDG?\b",
    "membar": r"\bMEMBAR\b",
    "membar_gpu": r"\bMEMBAR\.(?:\w+\.)*GPU\b",
    "cctl": r"\bCCTL\b",
    # local memory (spills) and tensor cores
    "local": r"\b(?:LDL|STL)\b",
    "mma": r"\b(?:HMMA|HGMMA|WGMMA)\b",
}


@functools.lru_cache(maxsize=1)
def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise LrinferError(f"kernels inspect: {path} is missing; install a Triton wheel with the NVIDIA backend")
    return str(path)


def sass_counts(sass: str) -> dict:
    """Instruction counts by kind (see _SASS_KINDS); `ldg_scalar` = 1- and 2-byte loads."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
    text = "\n".join(lines)
    out = {kind: len(re.findall(rx, text)) for kind, rx in _SASS_KINDS.items()}
    out["ldg_scalar"] = out["ldg_u8"] + out["ldg_u16"]
    return out


@functools.lru_cache(maxsize=512)
def _cubin_info(cubin: bytes) -> tuple[str, dict]:
    """(SASS text, resource usage {reg, stack, shared, local}) of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return sass, usage


# ----------------------------------------------------------------------------- compile


def _compile(launch, arch: int):
    """Compile one `Launch` as `kernel[grid](*args, **meta)` would on an sm_<arch> device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kern = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.meta, debug=False)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kern, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass
class KernelReport:
    """One compiled kernel of a launch plan (`compile_only`)."""
    name: str
    grid: int                 # programs the launcher would launch
    num_warps: int
    num_stages: int
    regs: int                 # per thread
    spill_bytes: int          # local memory per thread (0: no spills)
    shared: int               # bytes of shared memory per program
    occupancy: int            # programs resident per SM (registers, shared memory, threads)
    sass: dict                # instruction counts by kind (`sass_counts`)
    specialization: dict      # argument name -> Triton's attribute ("D": divisible by 16) or constexpr value
    cubin: bytes = field(repr=False, default=b"")
    ptx: str = field(repr=False, default="")
    sass_text: str = field(repr=False, default="")

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("cubin", "ptx", "sass_text"):
            d.pop(k)
        return d


@dataclass
class Inspection:
    method: str
    dtype: str
    arch: int
    shape: dict               # in, out, k, k2, m
    config: dict
    kernels: list[KernelReport]
    estimate: dict | None = None

    def summary(self) -> dict:
        return {"method": self.method, "dtype": self.dtype, "arch": f"sm_{self.arch}", "shape": self.shape,
                "config": self.config, "kernels": [k.summary() for k in self.kernels], "estimate": self.estimate}

    def dump(self, directory) -> list[Path]:
        """Write each kernel's cubin and PTX (read them with cuobjdump -sass / any editor)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for i, k in enumerate(self.kernels):
            stem = f"{i}_{k.name}_sm{self.arch}"
            for ext, data in ((".cubin", k.cubin), (".ptx", k.ptx.encode()), (".sass", k.sass_text.encode())):
                p = d / (stem + ext)
                p.write_bytes(data)
                written.append(p)
        return written


def _specialization(launch) -> dict:
    """Integer arguments as Triton specializes them: "=1" (a constant), "D" (divisible by 16) or ""."""
    return {name: "=1" if a == 1 else ("D" if a % 16 == 0 else "")
            for name, a in zip(launch.kernel.arg_names, launch.args)
            if isinstance(a, int) and not isinstance(a, bool)}


def _check(method, dtype, in_features, out_features, k, k2, m, arch):
    if method not in METHODS:
        raise LrinferError(f"kernels inspect: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise LrinferError(f"kernels inspect: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if arch not in ARCHS:
        raise LrinferError(f"kernels inspect: arch sm_{arch} is not modelled; use sm_80 or sm_90")
    if method == "two_launch_pdl" and arch < 90:
        raise LrinferError("kernels inspect: two_launch_pdl needs sm_90 (programmatic dependent launch)")
    for name, v, lo in (("in", in_features, 1), ("out", out_features, 1), ("k", k, 1), ("k2", k2, 0), ("m", m, 1)):
        if int(v) < lo:
            raise LrinferError(f"kernels inspect: --{name} must be >= {lo}; got {v}")


def compile_only(method: str, dtype: str, in_features: int, out_features: int, k: int, k2: int = 0,
                 m: int = 1, config: dict | None = None, arch: int = 90, bias: bool = False,
                 estimate: bool = True, groups=None) -> Inspection:
    """Compile what the launcher would launch for this layer and M, for sm_<arch>, without a GPU.

    method: "fused", "two_launch", "two_launch_pdl" or "triton" (prefill); dtype: "bfloat16",
    "float16" or "float32"; k, k2: the ranks of the factor pair and of the residual pair as the
    kernels receive them (after any padding at load, see `lrinfer.runtime.nn.LowRankLinear`); m: rows of x;
    config: overrides merged over `configs.get_config(m, ...)` (no per-GPU file is read);
    arch: 80 or 90. The fused grid is SMs × occupancy of the compiled kernel, as on the device
    (with a cooperative launch). Results are cached per argument set.
    method "grouped": groups = [(out_i, k_i), ...] (out_features, k, k2 are then ignored; the
    shape reports their sums); its estimate compares against S separate two_launch_pdl calls.
    """
    if method == "grouped":
        if not groups or any(int(o) < 1 or int(kk) < 1 for o, kk in groups):
            raise LrinferError("kernels inspect: grouped needs shards as (out_i, k_i) with both >= 1 "
                               "(--outs 4096,1024,1024)")
        groups = tuple((int(o), int(kk)) for o, kk in groups)
        out_features, k, k2 = sum(o for o, _ in groups), sum(kk for _, kk in groups), 0
    _check(method, dtype, in_features, out_features, k, k2, m, arch)
    cfg = {**configs.get_config(m, in_features, out_features, k + k2), **(config or {}), "method": method}
    key = (method, dtype, in_features, out_features, k, k2, m, tuple(sorted(cfg.items())), arch, bias, groups)
    res = _compile_only_cached(key)
    if estimate and res.estimate is None:
        from .estimate import estimate_grouped, estimate_inspection

        if method == "grouped":
            singles = [compile_only("two_launch_pdl" if arch >= 90 else "two_launch", dtype, in_features, o, kk,
                                    m=m, config=config, arch=arch, bias=bias, estimate=False) for o, kk in groups]
            res.estimate = estimate_grouped(res, singles)
        else:
            res.estimate = estimate_inspection(res)
    return res


@functools.lru_cache(maxsize=256)
def _compile_only_cached(key) -> Inspection:
    from . import fused_decode, prefill

    method, dtype, IN, OUT, k, k2, m, cfg_items, arch, bias, groups = key
    cfg = dict(cfg_items)
    dt = DTYPES[dtype]
    x = _ArgStandIn((m, IN), dt)
    V, U = _ArgStandIn((IN, k), dt), _ArgStandIn((OUT, k), dt)
    V2, U2 = (_ArgStandIn((IN, k2), dt), _ArgStandIn((OUT, k2), dt)) if k2 else (None, None)
    b = _ArgStandIn((OUT,), dt) if bias else None
    y = _ArgStandIn((m, OUT), dt)
    sms = ARCHS[arch].sms

    if method == "grouped":
        fused_decode._check_blocks(cfg)
        outs, ranks = [o for o, _ in groups], [kk for _, kk in groups]
        cap = -(-m // cfg["BLOCK_M"]) * cfg["BLOCK_M"]
        def plan_g(programs):
            return fused_decode.plan_grouped(
                x, V, _ArgStandIn((sum(o * kk for o, kk in groups),), dt), b, ranks, outs, y,
                _ArgStandIn((2, cap, k), torch.float32), _ArgStandIn((4,), torch.int32), cfg=cfg,
                programs=programs, gdc=arch >= 90 and fused_decode.launch_features()["pdl"])
        shrink = _compile(plan_g(sms)[0], arch)  # the launcher splits phase 1 for SMs × its occupancy
        occ = occupancy(_cubin_info(shrink.asm["cubin"])[1].get("reg", 0), shrink.metadata.shared,
                        cfg["num_warps"], arch)
        launches = plan_g(sms * max(occ, 1))
    elif method == "triton":
        prefill._check_blocks(cfg)
        launches = prefill.plan_prefill(x, V, U, b, V2, U2, y, _ArgStandIn((m, k + k2), dt), cfg=cfg)
    else:
        fused_decode._check_blocks(cfg)
        bm = cfg["BLOCK_M"]
        cap = -(-m // bm) * bm
        ws, ctr = _ArgStandIn((2, cap, k + k2), torch.float32), _ArgStandIn((4,), torch.int32)
        fused = method == "fused"
        feats = fused_decode.launch_features()

        def plan(programs):
            return fused_decode.plan_decode(x, V, U, b, V2, U2, y, ws, ctr, cfg=cfg, fused=fused,
                                            programs=programs, gdc=method == "two_launch_pdl",
                                            cooperative=fused and feats["cooperative"])
        launches = plan(sms)
        first = _compile(launches[0], arch)
        _, usage = _cubin_info(first.asm["cubin"])
        occ = occupancy(usage.get("reg", 0), first.metadata.shared, cfg["num_warps"], arch)
        if occ == 0:
            raise LrinferError(f"kernels inspect: {launches[0].kernel.__name__} cannot run on sm_{arch} with "
                               f"this config ({usage.get('reg')} registers, {first.metadata.shared} B shared); "
                               "use smaller tiles or fewer stages")
        launches = plan(sms * occ)

    reports = []
    for launch in launches:
        ck = _compile(launch, arch)
        sass, usage = _cubin_info(ck.asm["cubin"])
        regs = usage.get("reg", 0)
        warps = launch.meta["num_warps"]
        reports.append(KernelReport(
            name=launch.kernel.__name__, grid=launch.grid, num_warps=warps,
            num_stages=launch.meta.get("num_stages", 3), regs=regs, spill_bytes=usage.get("local", 0),
            shared=int(ck.metadata.shared), occupancy=occupancy(regs, int(ck.metadata.shared), warps, arch),
            sass=sass_counts(sass), specialization=_specialization(launch),
            cubin=ck.asm["cubin"], ptx=ck.asm["ptx"], sass_text=sass))
    shape = {"in": IN, "out": OUT, "k": k, "k2": k2, "m": m}
    if groups:
        shape["groups"] = [list(g) for g in groups]
    return Inspection(method, dtype, arch, shape, cfg, reports)
