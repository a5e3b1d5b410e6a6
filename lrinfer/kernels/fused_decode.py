"""Decode path (small M): y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias.

Phase 1 (`_shrink_phase`): split-K over `in` and rank tiles; each work item computes a
[BLOCK_M, BLOCK_K] slice of t = x [V|V2] and atomically adds it into an fp32 workspace.
Phase 2 (`_expand_phase`): each work item computes a [BLOCK_M, BLOCK_N] tile of
y = t [U|U2]ᵀ + bias, reading t from the workspace.

Three ways to run the two phases:
  fused           `_fused_kernel`: ONE persistent launch with an in-kernel grid barrier.
  two_launch      `_shrink_kernel` then `_expand_kernel`, ordinary stream order.
  two_launch_pdl  the same two kernels with programmatic dependent launch (SM90+): the shrink
                  kernel signals `gdc_launch_dependents` at entry, the expand kernel is launched
                  with `launch_pdl=True` and waits in `gdc_wait` before it reads anything, so its
                  launch overlaps the shrink kernel's tail. Deadlock-free: the dependent grid
                  starts only after every shrink program is running (as vLLM's LoRA ops do).

No deadlock by construction (fused). A spin barrier hangs if some programs of its grid are not
resident while the others wait. The launcher bounds the grid by SMs × occupancy (occupancy from
the compiled kernel through cuOccupancyMaxActiveBlocksPerMultiprocessor), and launches it as a
cooperative grid (`launch_cooperative_grid=True`, CU_LAUNCH_ATTRIBUTE_COOPERATIVE; Triton >= 3.2),
so the driver guarantees co-residency — whatever else runs (a second stream launching the same
kernel, MPS) — or refuses the launch with an error instead of hanging. Where the installed Triton
has no cooperative launch (or LRINFER_COOPERATIVE=0), the guard is the grid bound alone, halved
(`_STREAM_SLACK`) so that two such kernels launched at once from two streams still fit together.
`decode_launch_info()` reports which guard is active.

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
with ONE warning on the "lrinfer.kernels" logger per (device, eager/capture); later calls of that
kind skip the cooperative attempt. A refusal inside a capture may invalidate the capture itself
(CUDA semantics), so `warmup.warmup()` probes a captured cooperative launch first.

Rank 0 (k = k2 = 0): y = bias (or zeros), no launch. A pair with rank 0 is dropped.

Grouped (vLLM's fused qkv / gate_up, `lowrank_grouped_decode`): S linears on the same x, V =
[V_0|...|V_{S-1}] [in, Σk], U the packed 1-D [Σ out_i·k_i]. ONE `_shrink_kernel` launch computes
t = x V [M, Σk] (x read by one kernel, not S), then `_grouped_expand_kernel` (up to
GROUP_MAX = 4 shards per launch) gives each work item (m tile, n tile of shard i) y[:, o_i + n
tile] = t[:, k segment of i] U_iᵀ (+ bias), written straight into its columns of y (no cat). The
workspace protocol is the one above with KT = Σk; only the last expand launch finishes (resets
the counters, flips the epoch).

Kernels use only builtins of triton.language (no tl.cdiv / tl.zeros, which are themselves
@triton.jit library functions), so a copy of this module imported with TRITON_INTERPRET=1
runs in the interpreter even when triton was imported without it (see tests/kernels/conftest.py).
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

ZBLOCK = 1024  # elements each program zeroes per step
GROUP_MAX = 4  # shards one grouped expand launch serves
log = logging.getLogger("lrinfer.kernels")


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
def _shrink_kernel(
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
def _expand_kernel(
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
def _fused_kernel(
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
def _grouped_expand_kernel(
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
        return [Launch(_fused_kernel, min(programs, max(items1, items2)), args, meta)]
    shrink = Launch(_shrink_kernel, items1, (x2, V, V2_, ws, ctr, *shrink_sizes, *shrink_strides),
                    dict(BLOCK_M=BM, BLOCK_IN=BIN, BLOCK_K=BK, ZBLOCK=ZBLOCK, USE_GDC=gdc,
                         **{k: v for k, v in common.items() if k not in ("HAS_BIAS", "HAS_RES")}))
    expand = Launch(_expand_kernel, items2,
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
    """Launches of one grouped call (shapes and strides only): one `_shrink_kernel` over V [in, Σk]
    into t, then ceil(S / GROUP_MAX) `_grouped_expand_kernel` launches, the last one finishing.
    U: the packed contiguous 1-D [Σ out_i·k_i]; bias [Σ out_i] contiguous or None; y [M, Σ out_i]."""
    M, IN = x2.shape
    KT = V.shape[1]
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ieee = x2.dtype == torch.float32
    n_k_tiles = triton.cdiv(KT, cfg["BLOCK_K"])
    n_m_tiles, n_splits, blocks_per_split = _shrink_split(M, IN, n_k_tiles, cfg, programs)
    ws_numel = n_m_tiles * BM * KT
    warps = dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    launches = [Launch(_shrink_kernel, n_m_tiles * n_k_tiles * n_splits,
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
        launches.append(Launch(_grouped_expand_kernel, n_items, args,
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
        key = (dev, x2.dtype, "_shrink_kernel", *(cfg[b] for b in DECODE_BLOCKS), cfg["num_warps"],
               cfg.get("num_stages", 3), False, False, False)
        max_programs = _resident_limit(key, lambda: shrink.kernel.warmup(*shrink.args, grid=(1,), **shrink.meta),
                                       dev, 1)
    _run(plan(max_programs or 8), ws_key)
    return y
