"""Decode kernels (small M): y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias. Launched by `fused_decode.py`.

Phase 1 (`_shrink_phase`): split-K over `in` and rank tiles; each work item computes a
[BLOCK_M, BLOCK_K] slice of t = x [V|V2] and atomically adds it into an fp32 workspace.
Phase 2 (`_expand_phase`): each work item computes a [BLOCK_M, BLOCK_N] tile of
y = t [U|U2]ᵀ + bias, reading t from the workspace.

Three ways to run the two phases:
  fused           `fused_kernel`: ONE persistent launch with an in-kernel grid barrier.
  two_launch      `shrink_kernel` then `expand_kernel`, ordinary stream order.
  two_launch_pdl  the same two kernels with programmatic dependent launch (SM90+): the shrink
                  kernel signals `gdc_launch_dependents` at entry, the expand kernel is launched
                  with `launch_pdl=True` and waits in `gdc_wait` before it reads anything, so its
                  launch overlaps the shrink kernel's tail. Deadlock-free: the dependent grid
                  starts only after every shrink program is running (as vLLM's LoRA ops do).

Under TRITON_INTERPRET=1 (CPU) the interpreter runs a grid's programs one after another, so the
fused kernel runs there with a grid of ONE program: its barrier then passes at once and its whole
body (both phases, epoch flip, zeroing of the next buffer, finishing reset) is checked on the CPU.

Bandwidth arithmetic (decode is memory-bound; `estimate.py` turns it into an ESTIMATE). To stream
at full bandwidth each SM must keep BW × latency / SMs bytes in flight: H100 3.35 TB/s × ~700 ns /
132 ≈ 17.8 KB, H200 4.8 TB/s → ≈ 25.5 KB. A program keeps (num_stages − 1) tiles in flight once
its weights stream through cp.async (software pipelined), which needs ranks that are multiples of
16 (the row stride AND the masked bound; k ≡ 8 mod 16 compiles to 2-byte scalar loads and no
pipelining: `configs.RANK_ALIGN`, padding in `LowRankLinear`). Default config (BLOCK_IN 128,
BLOCK_K 64, BLOCK_N 32, BLOCK_R 128, 4 warps, 3 stages), sm_90, bf16, 4096→11008 at k = 1792:
96 registers, 40 KB shared → 5 programs per SM, grid 5 × 132 = 660 capped at the 448 phase-1
items; shrink: V tiles 128 × 64 × 2 B = 16 KB, 2 in flight = 32 KB per program; expand: U tiles
128 × 32 × 2 B = 8 KB, 2 in flight = 16 KB per program, 344 items over 132 SMs ≈ 2.6 programs
≈ 42 KB per SM (was 64 × 32 × 2 B = 4 KB tiles on one program per SM: ~8 KB). Split-K adds are
relaxed reductions (no per-atomic MEMBAR/CCTL). The first U tile of each program (8 KB × 448 =
3.7 MB) is loaded before the grid barrier, so HBM stays busy while programs wait (PREFETCH_U).
Weights 54.1 MB vs dense 90.2 MB: the ESTIMATE is ≈ 18 µs vs 27 µs on H100 (`lrinfer kernels
inspect`); only a GPU confirms it.

Workspace protocol (no host syncs, CUDA-graph safe, no memset launch):
    ws   fp32 [2, CAP, KT]  two buffers, CAP = rows capacity, KT = k + k2
    ctr  int32 [4]          [barrier arrivals, finish arrivals, epoch, unused]
The buffer `epoch` is used by this call while every program zeroes its share of the other
one (all zero on entry); the last program to finish resets the counters and flips `epoch`.

Grouped (vLLM's fused qkv / gate_up, `lowrank_grouped_decode`): S linears on the same x, V =
[V_0|...|V_{S-1}] [in, Σk], U the packed 1-D [Σ out_i·k_i]. ONE `shrink_kernel` launch computes
t = x V [M, Σk] (x read by one kernel, not S), then `grouped_expand_kernel` (up to
GROUP_MAX = 4 shards per launch) gives each work item (m tile, n tile of shard i) y[:, o_i + n
tile] = t[:, k segment of i] U_iᵀ (+ bias), written straight into its columns of y (no cat). The
workspace protocol is the one above with KT = Σk; only the last expand launch finishes (resets
the counters, flips the epoch).

Kernels use only builtins of triton.language (no tl.cdiv / tl.zeros, which are themselves
@triton.jit library functions), so a copy of this module imported with TRITON_INTERPRET=1
runs in the interpreter even when triton was imported without it (see tests/kernels/conftest.py).

"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ZBLOCK = 1024  # elements each program zeroes per step
GROUP_MAX = 4  # shards one grouped expand launch serves


@triton.jit
def _shrink_tile(
    x_ptr, v_ptr, ws_ptr,
    M, IN, K_SEG, KT,
    stride_xm, stride_xi, stride_vi, stride_vk,
    mt, col0, ws_off, block0, n_blocks,
    BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """ws[m tile, ws_off + col0 : +BLOCK_K] += x[m tile, in blocks] @ V[in blocks, col0 : +BLOCK_K]."""
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = col0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K_SEG
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for b in range(0, n_blocks):
        offs_i = (block0 + b) * BLOCK_IN + tl.arange(0, BLOCK_IN)
        mask_i = offs_i < IN
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :] * stride_xi,
                     mask=mask_m[:, None] & mask_i[None, :], other=0.0)  # [BLOCK_M, BLOCK_IN]
        vt = tl.load(v_ptr + offs_i[:, None] * stride_vi + offs_k[None, :] * stride_vk,
                     mask=mask_i[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_IN, BLOCK_K]
        if IEEE:
            acc = tl.dot(xt, vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, vt, acc)
    # relaxed: a plain reduction (REDG), no fence per atomic. What orders these adds before any
    # read of t is, in the fused kernel, the grid barrier: every thread's adds come before the
    # block-wide `debug_barrier`, then one release add on the arrival counter (cumulative: it
    # publishes all the block's prior writes), matched by the readers' acquire loads; in the
    # two-launch forms, the kernel boundary or `gdc_wait` (which waits for the whole shrink grid
    # and its memory).
    tl.atomic_add(ws_ptr + offs_m[:, None] * KT + (ws_off + offs_k)[None, :], acc,
                  mask=mask_m[:, None] & mask_k[None, :], sem="relaxed")


@triton.jit
def _shrink_phase(
    # pointers
    x_ptr, v_ptr, v2_ptr, ws_ptr, ws_next_ptr,
    # sizes
    M, IN, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
    # strides
    stride_xm, stride_xi, stride_vi, stride_vk, stride_v2i, stride_v2k,
    # program id and count (persistent loop)
    pid, n_prog,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_K: tl.constexpr,
    ZBLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    """t[M, KT] += x[M, IN] @ [V|V2][IN, KT] into ws (fp32); zero ws_next.

    Work item = (m tile, rank tile, in split); rank tiles [0, n_k1_tiles) index V, the rest V2.
    """
    # zero our share of the other buffer for the next call
    for z0 in range(pid * ZBLOCK, ws_numel, n_prog * ZBLOCK):
        offs_z = z0 + tl.arange(0, ZBLOCK)
        tl.store(ws_next_ptr + offs_z, tl.full((ZBLOCK,), 0.0, tl.float32), mask=offs_z < ws_numel)

    n_m_tiles = (M + BLOCK_M - 1) // BLOCK_M
    n_items = n_m_tiles * n_k_tiles * n_splits
    for item in range(pid, n_items, n_prog):
        split = item % n_splits
        kt = (item // n_splits) % n_k_tiles
        mt = item // (n_splits * n_k_tiles)
        if kt < n_k1_tiles:  # segment 1: V
            _shrink_tile(x_ptr, v_ptr, ws_ptr, M, IN, K1, KT, stride_xm, stride_xi, stride_vi, stride_vk,
                         mt, kt * BLOCK_K, 0, split * blocks_per_split, blocks_per_split,
                         BLOCK_M, BLOCK_IN, BLOCK_K, IEEE)
        else:  # segment 2: V2, stored after the K1 columns of t
            _shrink_tile(x_ptr, v2_ptr, ws_ptr, M, IN, K2, KT, stride_xm, stride_xi, stride_v2i, stride_v2k,
                         mt, (kt - n_k1_tiles) * BLOCK_K, K1, split * blocks_per_split, blocks_per_split,
                         BLOCK_M, BLOCK_IN, BLOCK_K, IEEE)


@triton.jit
def _first_u_tile(u_ptr, M, OUT, K1, stride_un, stride_uk, pid,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """U[rows of item `pid`, 0 : BLOCK_R]ᵀ as [BLOCK_R, BLOCK_N]: the first U tile this program's
    expand phase reads. It does not depend on t, so the fused kernel loads it before the barrier."""
    n_n_tiles = (OUT + BLOCK_N - 1) // BLOCK_N
    n_items = (M + BLOCK_M - 1) // BLOCK_M * n_n_tiles
    offs_n = (pid % n_n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_end = tl.where(pid < n_items, OUT, 0)  # a program without expand items loads nothing
    return tl.load(u_ptr + offs_r[:, None] * stride_uk + offs_n[None, :] * stride_un,
                   mask=(offs_r < K1)[:, None] & (offs_n < n_end)[None, :], other=0.0)


@triton.jit
def _expand_phase(
    # pointers
    ws_ptr, u_ptr, u2_ptr, bias_ptr, y_ptr,
    # sizes
    M, OUT, K1, K2, KT,
    # strides
    stride_un, stride_uk, stride_u2n, stride_u2k, stride_ym, stride_yn,
    # program id and count (persistent loop)
    pid, n_prog,
    # U[item pid, 0:BLOCK_R] loaded before the barrier (`_first_u_tile`), used when HAS_FIRST
    u_first,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, HAS_FIRST: tl.constexpr,
):
    """y[M, OUT] = t[:, :K1] @ U[OUT, K1]ᵀ (+ t[:, K1:] @ U2[OUT, K2]ᵀ) (+ bias), t = ws (fp32)."""
    n_n_tiles = (OUT + BLOCK_N - 1) // BLOCK_N
    n_items = (M + BLOCK_M - 1) // BLOCK_M * n_n_tiles
    for item in range(pid, n_items, n_prog):
        mt = item // n_n_tiles
        nt = item % n_n_tiles
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < OUT
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        r_start = 0
        if HAS_FIRST:
            if item == pid:  # this program's first item: its first U tile is already loaded
                offs_r = tl.arange(0, BLOCK_R)
                t = tl.load(ws_ptr + offs_m[:, None] * KT + offs_r[None, :],
                            mask=mask_m[:, None] & (offs_r < K1)[None, :], other=0.0, cache_modifier=".cg")
                if IEEE:
                    acc = tl.dot(t.to(u_first.dtype), u_first, acc, input_precision="ieee")
                else:
                    acc = tl.dot(t.to(u_first.dtype), u_first, acc)
                r_start = BLOCK_R
        for r0 in range(r_start, K1, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < K1
            # .cg: other programs' atomics live in L2, bypass L1
            t = tl.load(ws_ptr + offs_m[:, None] * KT + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
            ut = tl.load(u_ptr + offs_r[:, None] * stride_uk + offs_n[None, :] * stride_un,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            if IEEE:
                acc = tl.dot(t.to(ut.dtype), ut, acc, input_precision="ieee")
            else:
                acc = tl.dot(t.to(ut.dtype), ut, acc)
        if HAS_RES:
            for r0 in range(0, K2, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < K2
                t = tl.load(ws_ptr + offs_m[:, None] * KT + (K1 + offs_r)[None, :],
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
                ut = tl.load(u2_ptr + offs_r[:, None] * stride_u2k + offs_n[None, :] * stride_u2n,
                             mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(t.to(ut.dtype), ut, acc, input_precision="ieee")
                else:
                    acc = tl.dot(t.to(ut.dtype), ut, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _finish(ctr_ptr, n_prog):
    """Arrive; the last program resets the counters and flips the epoch."""
    old = tl.atomic_add(ctr_ptr + 1, 1)
    if old == n_prog - 1:
        tl.atomic_xchg(ctr_ptr + 0, 0)
        tl.atomic_xchg(ctr_ptr + 1, 0)
        e = tl.atomic_add(ctr_ptr + 2, 0)
        tl.atomic_xchg(ctr_ptr + 2, 1 - e)


@triton.jit
def shrink_kernel(
    x_ptr, v_ptr, v2_ptr, ws_ptr, ctr_ptr,
    M, IN, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
    stride_xm, stride_xi, stride_vi, stride_vk, stride_v2i, stride_v2k,
    BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_K: tl.constexpr,
    ZBLOCK: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Phase 1 alone. x [M, IN], V [IN, K1], V2 [IN, K2], ws fp32 [2, CAP, KT], ctr int32 [4].

    USE_GDC: let the (PDL-launched) expand kernel start now; it waits for us in `gdc_wait`.
    """
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    e = tl.load(ctr_ptr + 2)
    _shrink_phase(x_ptr, v_ptr, v2_ptr, ws_ptr + e * ws_numel, ws_ptr + (1 - e) * ws_numel,
                  M, IN, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
                  stride_xm, stride_xi, stride_vi, stride_vk, stride_v2i, stride_v2k,
                  pid, n_prog, BLOCK_M, BLOCK_IN, BLOCK_K, ZBLOCK, IEEE)


@triton.jit
def expand_kernel(
    ws_ptr, ctr_ptr, u_ptr, u2_ptr, bias_ptr, y_ptr,
    M, OUT, K1, K2, KT, ws_numel,
    stride_un, stride_uk, stride_u2n, stride_u2k, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Phase 2 alone. U [OUT, K1], U2 [OUT, K2], bias [OUT], y [M, OUT].

    USE_GDC: launched early by PDL; wait for the whole shrink kernel (and its memory) first.
    """
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    e = tl.load(ctr_ptr + 2)
    _expand_phase(ws_ptr + e * ws_numel, u_ptr, u2_ptr, bias_ptr, y_ptr, M, OUT, K1, K2, KT,
                  stride_un, stride_uk, stride_u2n, stride_u2k, stride_ym, stride_yn,
                  pid, n_prog, 0.0, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, HAS_RES, IEEE, False)
    tl.debug_barrier()
    _finish(ctr_ptr, n_prog)


@triton.jit
def fused_kernel(
    x_ptr, v_ptr, v2_ptr, ws_ptr, ctr_ptr, u_ptr, u2_ptr, bias_ptr, y_ptr,
    M, IN, OUT, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
    stride_xm, stride_xi, stride_vi, stride_vk, stride_v2i, stride_v2k,
    stride_un, stride_uk, stride_u2n, stride_u2k, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ZBLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, PREFETCH_U: tl.constexpr,
):
    """Both phases in one persistent launch. Every program of the grid must be resident at once
    (the launcher bounds the grid and asks for a cooperative launch); interpreted: grid of 1.

    PREFETCH_U: the first U tile of this program's first expand item is loaded before the grid
    barrier, so HBM stays busy while the programs wait for each other (see the module doc)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    e = tl.load(ctr_ptr + 2)
    ws_cur = ws_ptr + e * ws_numel
    _shrink_phase(x_ptr, v_ptr, v2_ptr, ws_cur, ws_ptr + (1 - e) * ws_numel,
                  M, IN, K1, K2, KT, ws_numel, n_k1_tiles, n_k_tiles, n_splits, blocks_per_split,
                  stride_xm, stride_xi, stride_vi, stride_vk, stride_v2i, stride_v2k,
                  pid, n_prog, BLOCK_M, BLOCK_IN, BLOCK_K, ZBLOCK, IEEE)
    u_first = 0.0
    if PREFETCH_U:
        u_first = _first_u_tile(u_ptr, M, OUT, K1, stride_un, stride_uk, pid, BLOCK_M, BLOCK_N, BLOCK_R)
    # grid barrier: all phase-1 atomics land before anyone reads t
    tl.debug_barrier()
    tl.atomic_add(ctr_ptr, 1, sem="release")
    arrived = tl.atomic_add(ctr_ptr, 0, sem="acquire")
    while arrived < n_prog:
        arrived = tl.atomic_add(ctr_ptr, 0, sem="acquire")
    tl.debug_barrier()
    _expand_phase(ws_cur, u_ptr, u2_ptr, bias_ptr, y_ptr, M, OUT, K1, K2, KT,
                  stride_un, stride_uk, stride_u2n, stride_u2k, stride_ym, stride_yn,
                  pid, n_prog, u_first, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, HAS_RES, IEEE, PREFETCH_U)
    tl.debug_barrier()
    _finish(ctr_ptr, n_prog)


@triton.jit
def _grouped_shard(ws_ptr, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn,
                   item, n_items, out_i, k_i, kc_i, uo_i, yo_i,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """Work item `item` (of n_items) of shard i: y[:, yo_i + n tile] = t[:, kc_i : kc_i + k_i] U_iᵀ
    (+ bias[yo_i + n tile]), U_i = u[uo_i : uo_i + out_i·k_i] viewed [out_i, k_i] row-major."""
    _expand_phase(ws_ptr + kc_i, u_ptr + uo_i, u_ptr + uo_i, bias_ptr + yo_i, y_ptr + yo_i * stride_yn,
                  M, out_i, k_i, 0, KT, k_i, 1, k_i, 1, stride_ym, stride_yn,
                  item, n_items, 0.0, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, False, IEEE, False)


@triton.jit
def grouped_expand_kernel(
    ws_ptr, ctr_ptr, u_ptr, bias_ptr, y_ptr,
    M, KT, ws_numel, stride_ym, stride_yn,
    lo1, lo2, lo3, n_items,
    out0, out1, out2, out3, k0, k1, k2, k3, kc0, kc1, kc2, kc3, uo0, uo1, uo2, uo3, yo0, yo1, yo2, yo3,
    NUM_SHARDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr, FINISH: tl.constexpr,
):
    """Expand of up to GROUP_MAX shards, one work item per program. Program pid serves shard
    s = #{lo_j <= pid} (items [lo_s, lo_{s+1})), item pid − lo_s of it. Per shard: out_s rows of U,
    rank k_s, its t columns from kc_s, its U from element uo_s, its y columns from yo_s (all plain
    integer arguments, so Triton's divisibility specialization sees them and U loads stay 16-byte).
    USE_GDC: PDL-launched, waits for the shrink kernel. FINISH: the call's last expand launch."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    e = tl.load(ctr_ptr + 2)
    ws = ws_ptr + e * ws_numel
    # constexpr branches: only the shards this launch has are compiled
    if NUM_SHARDS == 1:
        _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid, n_items,
                       out0, k0, kc0, uo0, yo0, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
    else:
        if pid < lo1:
            _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid, lo1,
                           out0, k0, kc0, uo0, yo0, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
        else:
            if NUM_SHARDS == 2:
                _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid - lo1, n_items - lo1,
                               out1, k1, kc1, uo1, yo1, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
            else:
                if pid < lo2:
                    _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid - lo1, lo2 - lo1,
                                   out1, k1, kc1, uo1, yo1, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
                else:
                    if NUM_SHARDS == 3:
                        _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid - lo2, n_items - lo2,
                                       out2, k2, kc2, uo2, yo2, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
                    else:
                        if pid < lo3:
                            _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid - lo2, lo3 - lo2,
                                           out2, k2, kc2, uo2, yo2, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
                        else:
                            _grouped_shard(ws, u_ptr, bias_ptr, y_ptr, M, KT, stride_ym, stride_yn, pid - lo3, n_items - lo3,
                                           out3, k3, kc3, uo3, yo3, BLOCK_M, BLOCK_N, BLOCK_R, HAS_BIAS, IEEE)
    if FINISH:
        tl.debug_barrier()
        _finish(ctr_ptr, tl.num_programs(0))
