"""Decode launch layer (small M): plans, guards and runs the kernels of `decode_kernels.py`.

No deadlock by construction (fused). A spin barrier hangs if some programs of its grid are not
resident while the others wait. The launcher bounds the grid by SMs × occupancy (occupancy from
the compiled kernel through cuOccupancyMaxActiveBlocksPerMultiprocessor), and launches it as a
cooperative grid (`launch_cooperative_grid=True`, CU_LAUNCH_ATTRIBUTE_COOPERATIVE; Triton >= 3.2),
so the driver guarantees co-residency — whatever else runs (a second stream launching the same
kernel, MPS) — or refuses the launch with an error instead of hanging. Where the installed Triton
has no cooperative launch (or LRINFER_COOPERATIVE=0), the guard is the grid bound alone, halved
(`_STREAM_SLACK`) so that two such kernels launched at once from two streams still fit together.
`decode_launch_info()` reports which guard is active.

Workspaces are keyed by (device, stream, capture, CAP, KT): `capture` is None for eager calls and
the CUDA stream-capture id while a graph is being captured, so a captured graph owns its buffers
(allocated, and zero-filled by a node of the graph, on its first use in that capture) and never
shares them with eager calls or with another graph, whatever stream it is later replayed on.
Within one stream (or one graph) calls run in order, so they may share a workspace.

After a failed launch (any exception from the launch layer, `_launch_kernel`) the workspace of
that call is dropped from the cache: a shrink that ran before a failed expand leaves t in buffer
`epoch`, so the zero-on-entry invariant no longer holds; the next call allocates fresh zeroed
buffers and counters instead of ever reading corrupt ones.

Refused cooperative launch (`is_cooperative_refusal`: the grid exceeds what the driver can make
co-resident, MPS, a stream capture that does not take cooperative launches): the fused call is
re-planned as two_launch_pdl (plain two_launch where PDL is unavailable) on a fresh workspace,
with ONE warning on the "lrinfer.runtime.kernels" logger per (device, eager/capture); later calls of that
kind skip the cooperative attempt. A refusal inside a capture may invalidate the capture itself
(CUDA semantics), so `warmup.warmup()` probes a captured cooperative launch first.

Rank 0 (k = k2 = 0): y = bias (or zeros), no launch. A pair with rank 0 is dropped.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import decode_kernels as kernels
from .decode_kernels import GROUP_MAX, ZBLOCK

log = logging.getLogger("lrinfer.runtime.kernels")


# ----------------------------------------------------------------------------- launch guards

_STREAM_SLACK = 2  # without a cooperative launch: room for this many concurrent fused grids


@functools.lru_cache(maxsize=None)
def launch_features() -> dict:
    """What the installed Triton can ask of the CUDA launcher (a feature test, not a version test):
    cooperative: `launch_cooperative_grid` (CU_LAUNCH_ATTRIBUTE_COOPERATIVE), Triton >= 3.2;
    pdl: `launch_pdl` + `tl.extra.cuda.gdc_wait/gdc_launch_dependents`, Triton >= 3.4."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        opts = set(getattr(CUDAOptions, "__dataclass_fields__", {}))
    except Exception:  # pragma: no cover - no NVIDIA backend in this install
        opts = set()
    try:
        cuda_extra = tl.extra.cuda
        gdc = hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents")
    except AttributeError:  # pragma: no cover
        gdc = False
    return {"triton": triton.__version__, "cooperative": "launch_cooperative_grid" in opts,
            "pdl": "launch_pdl" in opts and gdc}


def _cooperative_enabled() -> bool:
    return launch_features()["cooperative"] and os.environ.get("LRINFER_COOPERATIVE", "1") != "0"


@functools.lru_cache(maxsize=None)
def pdl_supported(index: int) -> bool:
    """Programmatic dependent launch: the installed Triton has it and the device is SM90 or newer."""
    return launch_features()["pdl"] and torch.cuda.get_device_capability(index)[0] >= 9


def _occupancy(kernel, device_index: int) -> int:
    """Programs of a compiled kernel that fit on one SM at once (>= 1 when it launches at all).

    cuOccupancyMaxActiveBlocksPerMultiprocessor on the kernel's CUfunction (its shared memory is
    dynamic in Triton's launcher); falls back to arithmetic on registers, threads and shared memory.
    """
    kernel._init_handles()
    threads = kernel.metadata.num_warps * 32
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(kernel.function), ctypes.c_int(threads), ctypes.c_size_t(shared))
        if rc == 0 and n.value > 0:
            return n.value
    except (OSError, AttributeError, TypeError):
        pass
    props = torch.cuda.get_device_properties(device_index)
    occ = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    regs = getattr(kernel, "n_regs", 0) or 0
    if regs:
        occ = min(occ, getattr(props, "regs_per_multiprocessor", 65536) // (regs * threads))
    if shared:
        occ = min(occ, getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // shared)
    return max(1, min(occ, 32))


_RESIDENT: dict = {}


def _resident_limit(key, compile_fn, device_index: int, slack: int) -> int:
    """SMs × occupancy of a compiled kernel, ÷ `slack` (the fused kernel without a cooperative
    launch: room for _STREAM_SLACK concurrent grids). Cached per (device, kernel, dtype, meta)."""
    hit = _RESIDENT.get(key)
    if hit is None:
        sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        occ = _occupancy(compile_fn(), device_index)
        hit = _RESIDENT[key] = {"sms": sms, "occupancy": occ}
    return max(1, hit["sms"] * hit["occupancy"] // slack)


def decode_launch_info() -> dict:
    """The active deadlock guard and what each cached fused config may launch (for reports)."""
    coop = _cooperative_enabled()
    return {**launch_features(), "cooperative_enabled": coop, "stream_slack": 1 if coop else _STREAM_SLACK,
            "resident": {str(k): v for k, v in _RESIDENT.items()}}


# ----------------------------------------------------------------------------- launchers

_WORKSPACES: dict = {}


def _capture_token(device: torch.device):
    """None outside CUDA stream capture; during capture, the capture's id (cuStreamGetCaptureInfo),
    or "capture" where the driver call is unavailable (then captures share, never with eager)."""
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        status, cid = ctypes.c_int(0), ctypes.c_ulonglong(0)
        # (stream, *status, *id) lead every version of this call; later versions add optional
        # out-pointers (graph, dependencies, edge data, count), passed as NULL so none is garbage
        rc = lib.cuStreamGetCaptureInfo(ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
                                        ctypes.byref(status), ctypes.byref(cid), *([None] * 4))
        if rc == 0 and status.value == 1:  # CU_STREAM_CAPTURE_STATUS_ACTIVE
            return ("capture", cid.value)
    except (OSError, AttributeError):
        pass
    return "capture"


def _workspace_key(device: torch.device, cap: int, kt: int) -> tuple:
    """(device, stream, capture token, cap, kt): see the module doc."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return (device, stream, _capture_token(device), cap, kt)


def _workspace(device: torch.device, cap: int, kt: int, key=None):
    """Zeroed (ws fp32 [2, cap, kt], ctr int32 [4]) for `key` (default `_workspace_key`), cached;
    kept zero-on-entry by the kernels themselves. Allocated during capture, its zero-fill is a node
    of the graph, and it belongs to that capture only (see the module doc)."""
    key = _workspace_key(device, cap, kt) if key is None else key
    hit = _WORKSPACES.get(key)
    if hit is None:
        ws = torch.zeros((2, cap, kt), dtype=torch.float32, device=device)  # shape [2, CAP, KT]
        ctr = torch.zeros(4, dtype=torch.int32, device=device)  # shape [4]
        hit = _WORKSPACES[key] = (ws, ctr)
    return hit


def release_workspaces() -> int:
    """Drop every cached workspace (e.g. after deleting captured graphs); returns how many."""
    n = len(_WORKSPACES)
    _WORKSPACES.clear()
    return n


# ----------------------------------------------------------------------------- launch layer

# What the CUDA driver says (cuGetErrorString, in Triton's "Triton Error [CUDA]: ..." RuntimeError)
# when it refuses a cooperative launch rather than running it:
#   CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE  "too many blocks in cooperative launch"
#   CUDA_ERROR_NOT_SUPPORTED                 "operation not supported"  (MPS, some vGPU)
#   CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED    "operation not permitted when stream is capturing"
REFUSALS = ("too many blocks in cooperative launch", "operation not supported",
            "operation not permitted when stream is capturing", "cooperative")

_COOP_REFUSED: dict = {}  # (device index, capturing) -> the driver's message


def is_cooperative_refusal(exc: BaseException) -> bool:
    """True for the error Triton's launcher raises when the driver refuses a cooperative launch."""
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(r in msg for r in REFUSALS)


def _launch_kernel(launch: "Launch") -> None:
    """The launch layer: `kernel[grid](*args, **meta)` (tests replace it with a fake driver)."""
    launch.kernel[(launch.grid,)](*launch.args, **launch.meta)


def _run(launches, ws_key) -> None:
    """Launch in order; on any error drop the call's workspace (never reuse possibly-dirty
    buffers or counters) and re-raise."""
    try:
        for launch in launches:
            _launch_kernel(launch)
    except Exception:
        _WORKSPACES.pop(ws_key, None)
        raise


def _note_refusal(dev: int, capturing: bool, exc: BaseException) -> None:
    key = (dev, capturing)
    if key not in _COOP_REFUSED:
        _COOP_REFUSED[key] = str(exc)
        log.warning("lrinfer: cooperative launch of the fused decode kernel refused on cuda:%d%s (%s); "
                    "using two_launch_pdl from now on", dev, " during graph capture" if capturing else "",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def cooperative_refused(dev: int, capturing: bool) -> bool:
    """Whether a cooperative launch was refused on this device (eager or under capture)."""
    return (dev, capturing) in _COOP_REFUSED


_CAPTURE_COOP: dict = {}  # device index -> a captured cooperative launch ran and gave the right y


def probe_capture(dev: int) -> bool:
    """Capture one small fused decode call (cooperative, no fallback) into a throwaway graph on a
    side stream, replay it and check y. Cached per device. Until a device has passed it, calls under
    capture use two_launch_pdl: a cooperative launch refused inside a capture may invalidate the
    capture itself, so it is never tried there blind. Eager fused calls run it once, lazily."""
    if dev in _CAPTURE_COOP:
        return _CAPTURE_COOP[dev]
    _CAPTURE_COOP[dev] = False  # also guards the recursion below
    from . import configs

    cfg = dict(configs.DEFAULTS[1])
    g = torch.Generator(device=f"cuda:{dev}").manual_seed(0)
    x, V, U = (torch.randn(*s, device=f"cuda:{dev}", dtype=torch.float16, generator=g) / 8
               for s in ((1, 256), (256, 32), (64, 32)))
    ok = False
    try:
        lowrank_decode(x, V, U, cfg=cfg, fused=True, cooperative=True, fallback=False)  # compile, eagerly
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.graph(graph, stream=stream):
            y = lowrank_decode(x, V, U, cfg=cfg, fused=True, cooperative=True, fallback=False)
        graph.replay()
        torch.cuda.synchronize(dev)
        ok = bool(torch.allclose(y.float(), (x.float() @ V.float()) @ U.float().t(), rtol=2e-2, atol=2e-2))
        if not ok:
            log.warning("lrinfer: a captured cooperative launch on cuda:%d gave a wrong result; graphs use "
                        "two_launch_pdl", dev)
    except RuntimeError as e:
        log.warning("lrinfer: cuda:%d does not take a cooperative launch in a CUDA graph (%s); graphs use "
                    "two_launch_pdl", dev, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    _CAPTURE_COOP[dev] = ok
    return ok


DECODE_BLOCKS = ("BLOCK_M", "BLOCK_IN", "BLOCK_K", "BLOCK_N", "BLOCK_R")


def _check_blocks(cfg):
    for name in DECODE_BLOCKS:
        b = cfg[name]
        if b < 16 or b & (b - 1):
            raise ValueError(f"lowrank_linear decode config: {name}={b} must be a power of two >= 16")
    if cfg.get("num_stages", 1) < 1:
        raise ValueError(f"lowrank_linear decode config: num_stages={cfg['num_stages']} must be >= 1")


class Launch(NamedTuple):
    """One kernel launch: `kernel[grid](*args, **meta)`."""
    kernel: object
    grid: int
    args: tuple
    meta: dict


def _shrink_split(M, IN, KT_tiles, cfg, programs):
    """(n_m_tiles, n_splits, blocks_per_split): `in` split so phase 1 has about one item per program."""
    n_m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    n_in_blocks = triton.cdiv(IN, cfg["BLOCK_IN"])
    n_splits = max(1, min(n_in_blocks, programs // (n_m_tiles * KT_tiles)))
    blocks_per_split = triton.cdiv(n_in_blocks, n_splits)
    return n_m_tiles, triton.cdiv(n_in_blocks, blocks_per_split), blocks_per_split


def plan_decode(x2, V, U, bias, V2, U2, y, ws, ctr, *, cfg, fused, programs, gdc=False,
                cooperative=False) -> list[Launch]:
    """The launches of one decode call, from shapes and strides only (no device work).

    `programs`: how many programs phase 1 is split for and, fused, the grid's bound (the launcher
    passes SMs × occupancy). Tensors may be any objects with .shape/.stride()/.dtype/.data_ptr()
    (`inspect.compile_only` passes stand-ins), so this is the single source of the launcher's
    specialization.
    """
    M, IN = x2.shape
    OUT, K1 = U.shape
    K2 = 0 if V2 is None else V2.shape[1]
    KT = K1 + K2
    BM, BIN, BK = cfg["BLOCK_M"], cfg["BLOCK_IN"], cfg["BLOCK_K"]
    BN, BR = cfg["BLOCK_N"], cfg["BLOCK_R"]
    ieee = x2.dtype == torch.float32
    V2_, U2_ = (V, U) if V2 is None else (V2, U2)  # dummies when there is no residual pair

    n_k1_tiles = triton.cdiv(K1, BK)
    n_k_tiles = n_k1_tiles + triton.cdiv(K2, BK)
    n_m_tiles, n_splits, blocks_per_split = _shrink_split(M, IN, n_k_tiles, cfg, programs)
    ws_numel = n_m_tiles * BM * KT  # one of the two buffers
    items1 = n_m_tiles * n_k_tiles * n_splits
    items2 = n_m_tiles * triton.cdiv(OUT, BN)

    shrink_sizes = (M, IN, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split)
    shrink_strides = (x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), V2_.stride(0), V2_.stride(1))
    expand_strides = (U.stride(0), U.stride(1), U2_.stride(0), U2_.stride(1), y.stride(0), y.stride(1))
    bias_ = bias if bias is not None else y
    common = dict(HAS_BIAS=bias is not None, HAS_RES=V2 is not None, IEEE=ieee,
                  num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    if fused:
        args = (x2, V, V2_, ws, ctr, U, U2_, bias_, y,
                M, IN, OUT, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
                *shrink_strides, *expand_strides)
        meta = dict(BLOCK_M=BM, BLOCK_IN=BIN, BLOCK_K=BK, BLOCK_N=BN, BLOCK_R=BR, ZBLOCK=ZBLOCK,
                    PREFETCH_U=bool(cfg.get("PREFETCH_U", True)), **common)
        if cooperative:
            meta["launch_cooperative_grid"] = True
        return [Launch(kernels.fused_kernel, min(programs, max(items1, items2)), args, meta)]
    shrink = Launch(kernels.shrink_kernel, items1, (x2, V, V2_, ws, ctr, *shrink_sizes, *shrink_strides),
                    dict(BLOCK_M=BM, BLOCK_IN=BIN, BLOCK_K=BK, ZBLOCK=ZBLOCK, USE_GDC=gdc,
                         **{k: v for k, v in common.items() if k not in ("HAS_BIAS", "HAS_RES")}))
    expand = Launch(kernels.expand_kernel, items2,
                    (ws, ctr, U, U2_, bias_, y, M, OUT, K1, K2, KT, ws_numel, *expand_strides),
                    dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, USE_GDC=gdc, **common,
                         **({"launch_pdl": True} if gdc else {})))
    return [shrink, expand]


def drop_rank0(V, U, V2, U2):
    """(V, U, V2, U2) without pairs of rank 0 (the residual pair moves up if the first is empty)."""
    if V2 is not None and V2.shape[1] == 0:
        V2 = U2 = None
    if V.shape[1] == 0 and V2 is not None:
        V, U, V2, U2 = V2, U2, None, None
    return V, U, V2, U2


def _fill_rank0(y, bias):
    """y = bias (or 0): the layer has rank 0."""
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.expand_as(y))
    return y


def _decide_cooperative(fused: bool, cuda: bool, dev: int, capturing: bool) -> tuple[bool, bool]:
    """(fused, cooperative) for a call that asked for `fused`: cooperative where Triton can and the
    driver has not refused it on this device (eager / capture), under capture only once
    `probe_capture` passed; a fused call that wanted a cooperative launch and may not have one
    becomes two launches (the caller adds PDL). Without cooperative launch in Triton at all, the
    fused kernel keeps its halved-grid guard (module doc)."""
    want = fused and cuda and _cooperative_enabled()
    coop = want and not cooperative_refused(dev, capturing)
    if coop and not capturing and dev not in _CAPTURE_COOP:
        probe_capture(dev)  # once per device, before any capture can need the answer
    if coop and capturing:
        coop = _CAPTURE_COOP.get(dev, False)
    return (fused and (coop or not want)), coop


def lowrank_decode(x2, V, U, bias=None, V2=None, U2=None, *, cfg, fused=True, max_programs=None,
                   pdl=False, out=None, cooperative=None, fallback=True):
    """y [M, out] for x2 [M, in] (any strides) with the decode kernels.

    fused=True: one launch with a grid barrier; on CUDA the grid is SMs × occupancy of the compiled
    kernel (halved without a cooperative launch) and launched cooperatively where Triton can; off
    CUDA (TRITON_INTERPRET=1) only a grid of one program (max_programs=1) is allowed. fused=False:
    shrink + expand launches; pdl=True launches the expand kernel with programmatic dependent
    launch where supported (SM90+, Triton >= 3.4), else plain two launches. Phase 1 is split for
    `max_programs` programs (default: SMs × occupancy on CUDA, 8 off it), which also caps the
    fused grid. out: optional y [M, out] to write into (any strides).
    cooperative: None = where Triton can and the driver has not refused it on this device (CUDA);
    True/False forces it; under capture, None means only once `probe_capture` passed on the device.
    A refused cooperative launch falls back to two_launch_pdl (module doc); fallback=False raises.
    Rank 0 (k + k2 = 0) gives y = bias or 0 without a launch; a rank-0 pair is dropped.
    """
    # validate
    _check_blocks(cfg)
    cuda = x2.device.type == "cuda"
    if fused and not cuda and max_programs != 1:
        raise ValueError("lowrank_linear: the fused single-launch decode kernel needs a CUDA device "
                         "(off CUDA, under TRITON_INTERPRET=1, only max_programs=1: a grid of one program)")
    M = x2.shape[0]
    OUT = U.shape[0]
    if out is not None and (tuple(out.shape) != (M, OUT) or out.dtype != x2.dtype or out.device != x2.device):
        raise ValueError(f"lowrank_linear decode: out must be [{M}, {OUT}] {x2.dtype} on {x2.device}; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    V, U, V2, U2 = drop_rank0(V, U, V2, U2)
    KT = U.shape[1] + (0 if V2 is None else V2.shape[1])

    # allocate
    y = torch.empty((M, OUT), dtype=x2.dtype, device=x2.device) if out is None else out  # shape [M, out]
    if M == 0:
        return y
    if KT == 0:
        return _fill_rank0(y, bias)
    cap = triton.cdiv(M, cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    ws_key = _workspace_key(x2.device, cap, KT)
    ws, ctr = _workspace(x2.device, cap, KT, ws_key)  # [2, CAP, KT], [4]

    # grid: SMs × occupancy of the compiled kernel (cached per device, dtype and meta-parameters)
    dev = x2.device.index if x2.device.index is not None else (torch.cuda.current_device() if cuda else 0)
    capturing = ws_key[2] is not None
    if cooperative is None:
        fused, cooperative = _decide_cooperative(fused, cuda, dev, capturing)
        pdl = pdl or not fused
    coop = fused and bool(cooperative)
    can_pdl = cuda and pdl_supported(dev)
    gdc = (not fused) and bool(pdl) and can_pdl

    def plan(programs, fused=fused, gdc=gdc):
        return plan_decode(x2, V, U, bias, V2, U2, y, ws, ctr, cfg=cfg, fused=fused, programs=programs,
                           gdc=gdc, cooperative=coop)

    if cuda:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        first = plan(max_programs or sms)[0]  # the kernel whose occupancy bounds the grid
        key = (dev, x2.dtype, first.kernel.__name__, *(cfg[b] for b in DECODE_BLOCKS), cfg["num_warps"],
               cfg.get("num_stages", 3), bias is not None, V2 is not None, coop)
        limit = _resident_limit(key, lambda: first.kernel.warmup(*first.args, grid=(1,), **first.meta), dev,
                                _STREAM_SLACK if fused and not coop else 1)
        max_programs = limit if max_programs is None else min(max_programs, limit) if fused else max_programs
    elif max_programs is None:
        max_programs = 8

    # launch; a refused cooperative launch is re-planned as two launches on a fresh workspace
    try:
        _run(plan(max_programs), ws_key)
    except RuntimeError as e:
        if not (coop and fallback and is_cooperative_refusal(e)):
            raise
        _note_refusal(dev, capturing, e)
        ws, ctr = _workspace(x2.device, cap, KT, ws_key)  # fresh: `_run` dropped the old one
        _run(plan(max_programs, fused=False, gdc=can_pdl), ws_key)
    return y


# ----------------------------------------------------------------------------- grouped (qkv, gate_up)


def plan_grouped(x2, V, U, bias, ranks, outs, y, ws, ctr, *, cfg, programs, gdc=False) -> list[Launch]:
    """Launches of one grouped call (shapes and strides only): one `kernels.shrink_kernel` over V [in, Σk]
    into t, then ceil(S / GROUP_MAX) `kernels.grouped_expand_kernel` launches, the last one finishing.
    U: the packed contiguous 1-D [Σ out_i·k_i]; bias [Σ out_i] contiguous or None; y [M, Σ out_i]."""
    M, IN = x2.shape
    KT = V.shape[1]
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ieee = x2.dtype == torch.float32
    n_k_tiles = triton.cdiv(KT, cfg["BLOCK_K"])
    n_m_tiles, n_splits, blocks_per_split = _shrink_split(M, IN, n_k_tiles, cfg, programs)
    ws_numel = n_m_tiles * BM * KT
    warps = dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    launches = [Launch(kernels.shrink_kernel, n_m_tiles * n_k_tiles * n_splits,
                       (x2, V, V, ws, ctr, M, IN, KT, 0, KT, ws_numel, n_k_tiles, n_k_tiles, n_splits,
                        blocks_per_split, x2.stride(0), x2.stride(1), V.stride(0), V.stride(1),
                        V.stride(0), V.stride(1)),
                       dict(BLOCK_M=BM, BLOCK_IN=cfg["BLOCK_IN"], BLOCK_K=cfg["BLOCK_K"], ZBLOCK=ZBLOCK,
                            USE_GDC=gdc, IEEE=ieee, **warps))]
    kc, uo, yo = [0], [0], [0]  # where shard i's t columns, U elements, y columns start
    for k, o in zip(ranks, outs):
        kc.append(kc[-1] + k)
        uo.append(uo[-1] + k * o)
        yo.append(yo[-1] + o)
    bias_ = bias if bias is not None else y
    S = len(ranks)
    for g0 in range(0, S, GROUP_MAX):
        idx = list(range(g0, min(S, g0 + GROUP_MAX)))
        items = [n_m_tiles * triton.cdiv(outs[i], BN) for i in idx]
        lo = [sum(items[:j]) for j in range(1, len(idx))]
        n_items = sum(items)
        pad = GROUP_MAX - len(idx)

        def col(vals):
            return [vals[i] for i in idx] + [0] * pad

        args = (ws, ctr, U, bias_, y, M, KT, ws_numel, y.stride(0), y.stride(1),
                *(lo + [n_items] * (GROUP_MAX - 1 - len(lo))), n_items,
                *col(outs), *col(ranks), *col(kc), *col(uo), *col(yo))
        last = idx[-1] == S - 1
        launches.append(Launch(kernels.grouped_expand_kernel, n_items, args,
                               dict(NUM_SHARDS=len(idx), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=cfg["BLOCK_R"],
                                    HAS_BIAS=bias is not None, IEEE=ieee, USE_GDC=gdc, FINISH=last, **warps,
                                    **({"launch_pdl": True} if gdc else {}))))
    return launches


def lowrank_grouped_decode(x2, V, U, bias, ranks, outs, *, cfg, pdl=True, max_programs=None, out=None):
    """y [M, Σ out_i] of the grouped op (`plan_grouped`) for x2 [M, in] (any strides), V [in, Σk] (any
    strides), U packed contiguous 1-D, bias [Σ out_i] contiguous or None. Shard i's output columns
    are written in place (out: optional y to write into, any strides). pdl: the expand launches use
    programmatic dependent launch where supported. Phase 1 is split for `max_programs` programs
    (default: SMs × occupancy of the shrink kernel on CUDA, 8 off it). Needs ranks >= 1 (the op checks)."""
    _check_blocks(cfg)
    M = x2.shape[0]
    n_out = sum(outs)
    if out is not None and (tuple(out.shape) != (M, n_out) or out.dtype != x2.dtype or out.device != x2.device):
        raise ValueError(f"lowrank_linear_grouped: out must be [{M}, {n_out}] {x2.dtype} on {x2.device}; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    y = torch.empty((M, n_out), dtype=x2.dtype, device=x2.device) if out is None else out  # shape [M, Σ out]
    if M == 0:
        return y
    KT = V.shape[1]
    cap = triton.cdiv(M, cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    ws_key = _workspace_key(x2.device, cap, KT)
    ws, ctr = _workspace(x2.device, cap, KT, ws_key)
    cuda = x2.device.type == "cuda"
    dev = x2.device.index if x2.device.index is not None else (torch.cuda.current_device() if cuda else 0)
    gdc = bool(pdl) and cuda and pdl_supported(dev)

    def plan(programs):
        return plan_grouped(x2, V, U, bias, list(ranks), list(outs), y, ws, ctr, cfg=cfg, programs=programs, gdc=gdc)

    if max_programs is None and cuda:  # phase 1 split for SMs × occupancy of the shrink kernel
        shrink = plan(torch.cuda.get_device_properties(dev).multi_processor_count)[0]
        key = (dev, x2.dtype, "shrink_kernel", *(cfg[b] for b in DECODE_BLOCKS), cfg["num_warps"],
               cfg.get("num_stages", 3), False, False, False)
        max_programs = _resident_limit(key, lambda: shrink.kernel.warmup(*shrink.args, grid=(1,), **shrink.meta),
                                       dev, 1)
    _run(plan(max_programs or 8), ws_key)
    return y
