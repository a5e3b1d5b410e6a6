"""Prefill path (large M): two tensor-core tiled matmuls.

shrink: t = x [V|V2]                  t [M, k + k2] in the input dtype (fp32 accumulate)
expand: y = t[:, :k] Uᵀ + t[:, k:] U2ᵀ + bias   (bias and residual fused in the epilogue/K loop)

One kernel, `_mm_kernel`, computes C = A B (+ A2 B2) (+ bias) with grouped tile ordering
(as in the Triton matmul tutorial); all operands are addressed through strides, so Uᵀ and
column slices of t are views, never copies.
Kernels use only builtins of triton.language (no tl.cdiv / tl.zeros, which are themselves
@triton.jit library functions), so a copy of this module imported with TRITON_INTERPRET=1
runs in the interpreter even when triton was imported without it (see tests/kernels/conftest.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mm_accumulate(
    acc, a_ptr, b_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    offs_m, offs_n,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """acc[BLOCK_M, BLOCK_N] += A[offs_m, :K] @ B[:K, offs_n]."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mm_kernel(
    # pointers
    a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    # sizes
    M, N, K, K2,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (+ A2[M, K2] @ B2[K2, N]) (+ bias[N]); fp32 accumulate."""
    pid = tl.program_id(0)
    n_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    n_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    # grouped ordering: GROUP_M row tiles share B tiles in L2
    n_in_group = GROUP_M * n_pid_n
    group_id = pid // n_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % n_in_group) % group_size
    pid_n = (pid % n_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc = _mm_accumulate(acc, a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                         offs_m, offs_n, BLOCK_K, IEEE)
    if HAS_RES:
        acc = _mm_accumulate(acc, a2_ptr, b2_ptr, M, N, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n,
                             offs_m, offs_n, BLOCK_K, IEEE)
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


def _check_blocks(cfg):
    for name in ("PM", "PN", "PK"):
        b = cfg[name]
        if b < 16 or b & (b - 1):
            raise ValueError(f"lowrank_linear prefill config: {name}={b} must be a power of two >= 16")


def _mm_launch(a, b, out, a2=None, b2=None, bias=None, *, cfg):
    """The `Launch` of out [M, N] = a [M, K] @ b [K, N] (+ a2 [M, K2] @ b2 [K2, N]) (+ bias [N])."""
    from .fused_decode import Launch

    M, K = a.shape
    N = b.shape[1]
    K2 = 0 if a2 is None else a2.shape[1]
    a2_, b2_ = (a, b) if a2 is None else (a2, b2)  # dummies without the second pair
    BM, BN = cfg["PM"], cfg["PN"]
    grid = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    args = (a, b, a2_, b2_, bias if bias is not None else out, out,
            M, N, K, K2,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1),
            out.stride(0), out.stride(1))
    meta = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["PK"], GROUP_M=cfg["GROUP_M"],
                HAS_BIAS=bias is not None, HAS_RES=a2 is not None, IEEE=a.dtype == torch.float32,
                num_warps=cfg["p_warps"], num_stages=cfg["p_stages"])
    return Launch(_mm_kernel, grid, args, meta)


def matmul(a, b, out, a2=None, b2=None, bias=None, *, cfg):
    """out [M, N] = a [M, K] @ b [K, N] (+ a2 [M, K2] @ b2 [K2, N]) (+ bias [N]); any strides."""
    launch = _mm_launch(a, b, out, a2, b2, bias, cfg=cfg)
    launch.kernel[(launch.grid,)](*launch.args, **launch.meta)
    return out


def plan_prefill(x2, V, U, bias, V2, U2, y, t, *, cfg):
    """The launches of one prefill call (shapes and strides only; `inspect.compile_only` uses it):
    shrink x V -> t[:, :k] (and x V2 -> t[:, k:]), then expand with bias and residual fused."""
    K1 = U.shape[1]
    t1, t2 = t[:, :K1], t[:, K1:]  # shape [M, k], [M, k2]
    launches = [_mm_launch(x2, V, t1, cfg=cfg)]
    if V2 is not None:
        launches.append(_mm_launch(x2, V2, t2, cfg=cfg))
    launches.append(_mm_launch(t1, U.t(), y, a2=t2 if V2 is not None else None,
                               b2=U2.t() if U2 is not None else None, bias=bias, cfg=cfg))
    return launches


def lowrank_prefill(x2, V, U, bias=None, V2=None, U2=None, *, cfg):
    """y [M, out] for x2 [M, in] (any strides): shrink GEMM into t, expand GEMM with fused epilogue."""
    _check_blocks(cfg)
    M = x2.shape[0]
    OUT, K1 = U.shape
    K2 = 0 if V2 is None else V2.shape[1]

    # allocate
    y = torch.empty((M, OUT), dtype=x2.dtype, device=x2.device)  # shape [M, out]
    t = torch.empty((M, K1 + K2), dtype=x2.dtype, device=x2.device)  # shape [M, k + k2]
    if M == 0:
        return y

    # launch: shrink (one GEMM per factor), then expand with bias + residual fused
    for launch in plan_prefill(x2, V, U, bias, V2, U2, y, t, cfg=cfg):
        launch.kernel[(launch.grid,)](*launch.args, **launch.meta)
    return y
