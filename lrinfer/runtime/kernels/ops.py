"""Registration of the `lrinfer::lowrank_linear` custom op and its dispatch.

CUDA + Triton on sm_80 or newer: the kernel path chosen per M bucket by `configs.get_config`
(fused single-launch decode, two-launch decode, Triton prefill GEMMs, or cuBLAS).
Otherwise (CPU, no Triton, GPUs below sm_80: one log line): torch math in the input dtype.
Rank 0 (a layer compressed away): y = bias or zeros, no kernel.

The op has a fake impl, so `torch.compile(fullgraph=True)` traces through it, and the CUDA
path does no host syncs and no value-dependent allocation, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.utils import _python_dispatch

from . import configs

_lib = torch.library.Library("lrinfer", "FRAGMENT")  # noqa: F841  (keeps the namespace alive)

try:  # Triton is optional; the kernel modules import it at module level
    from . import fused_decode, prefill

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    fused_decode = prefill = None
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_operands(x, V, U, bias, V2, U2):
    """Raise ValueError on shape/dtype/device mismatches (message names the offending tensor)."""
    if (V2 is None) != (U2 is None):
        raise ValueError("lowrank_linear: pass both V2 and U2 for the residual pair, or neither")
    if x.dim() < 1:
        raise ValueError("lowrank_linear: x must have at least 1 dimension [..., in]")
    for name, t in (("V", V), ("U", U), ("V2", V2), ("U2", U2)):
        if t is not None and t.dim() != 2:
            raise ValueError(f"lowrank_linear: {name} must be 2-D, got shape {tuple(t.shape)}")
    if V.shape[1] != U.shape[1]:
        raise ValueError(f"lowrank_linear: V has {V.shape[1]} columns but U has {U.shape[1]}; "
                         "V [in, k] and U [out, k] must share k")
    if x.shape[-1] != V.shape[0]:
        raise ValueError(f"lowrank_linear: x has {x.shape[-1]} features but V has {V.shape[0]} rows; "
                         "x [..., in] needs V [in, k]")
    if V2 is not None:
        if V2.shape[1] != U2.shape[1]:
            raise ValueError(f"lowrank_linear: V2 has {V2.shape[1]} columns but U2 has {U2.shape[1]}; "
                             "V2 [in, k2] and U2 [out, k2] must share k2")
        if V2.shape[0] != V.shape[0]:
            raise ValueError(f"lowrank_linear: V2 has {V2.shape[0]} rows but V has {V.shape[0]}; both must be [in, *]")
        if U2.shape[0] != U.shape[0]:
            raise ValueError(f"lowrank_linear: U2 has {U2.shape[0]} rows but U has {U.shape[0]}; both must be [out, *]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != U.shape[0]):
        raise ValueError(f"lowrank_linear: bias has shape {tuple(bias.shape)} but must be [out] = [{U.shape[0]}]")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lowrank_linear: x has dtype {x.dtype}; expected a floating dtype")
    for name, t in (("V", V), ("U", U), ("bias", bias), ("V2", V2), ("U2", U2)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"lowrank_linear: {name} has dtype {t.dtype} but x has {x.dtype}; all must match")
        if t.device != x.device:
            raise ValueError(f"lowrank_linear: {name} is on {t.device} but x is on {x.device}")


def lowrank_linear_reference(x, V, U, bias=None, V2=None, U2=None):
    """Torch math: y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias.  x [..., in], V [in, k], U [out, k].

    `F.linear` applies Uᵀ and the bias in one call, with no transposed view built per call (this is
    the CPU's decode path, where each µs of a call counts 210 times a token on SmolLM2)."""
    y = F.linear(x @ V, U, bias)
    return y if V2 is None else y + F.linear(x @ V2, U2)


MIN_CAPABILITY = (8, 0)  # the kernels' tl.dot tiles and bf16 need Ampere or newer
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_index(x) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _arch_ok(index: int) -> bool:
    """The device is sm_80 or newer; below it, say once that the torch path is used."""
    cap = tuple(torch.cuda.get_device_capability(index))
    if cap < MIN_CAPABILITY:
        logging.getLogger("lrinfer.runtime.kernels").warning(
            "lrinfer: cuda:%d is sm_%d%d, below sm_80; low-rank layers run in torch (cuBLAS), not Triton",
            index, *cap)
        return False
    return True


def use_triton(x) -> bool:
    return HAS_TRITON and x.is_cuda and x.dtype in _KERNEL_DTYPES and _arch_ok(_device_index(x))


def _triton_forward(x, V, U, bias, V2, U2):
    """Kernel path for CUDA tensors; x [..., in] -> y [..., out]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # shape [M, in]; a view when possible, any strides
    M = x2.shape[0]
    V, U, V2, U2 = fused_decode.drop_rank0(V, U, V2, U2)
    k_total = U.shape[1] + (0 if U2 is None else U2.shape[1])
    if k_total == 0:  # rank 0: the layer is its bias
        y = x2.new_zeros((M, U.shape[0])) if bias is None else bias.expand(M, -1).clone()
        return y.reshape(*lead, U.shape[0])
    dev = _device_index(x)
    cfg = configs.get_config(max(M, 1), V.shape[0], U.shape[0], k_total, configs.device_slug(dev))
    method = cfg["method"]
    if method == "torch":
        y = lowrank_linear_reference(x2, V, U, bias, V2, U2)
    elif method == "triton":
        y = prefill.lowrank_prefill(x2, V, U, bias, V2, U2, cfg=cfg)
    else:  # fused / two_launch / two_launch_pdl
        y = fused_decode.lowrank_decode(x2, V, U, bias, V2, U2, cfg=cfg, fused=method == "fused",
                                        pdl=method == "two_launch_pdl")  # grid: SMs × occupancy
    return y.reshape(*lead, U.shape[0])


def grouped_forward(x, V, U, bias, ranks, outs):
    """The grouped op's kernel path (CUDA): y [..., Σ out_i], or None where the config for this M
    is not a decode method (the caller then runs its cuBLAS math: one shrink GEMM, one GEMM per
    shard into its columns). Decode methods run `fused_decode.lowrank_grouped_decode` (shrink
    kernel + grouped expand kernel; PDL unless the method is plain two_launch)."""
    x2 = x.reshape(-1, x.shape[-1])
    dev = _device_index(x)
    cfg = configs.get_config(max(x2.shape[0], 1), V.shape[0], sum(outs), V.shape[1], configs.device_slug(dev))
    if cfg["method"] not in ("fused", "two_launch", "two_launch_pdl"):
        return None
    y = fused_decode.lowrank_grouped_decode(x2, V, U, bias, ranks, outs, cfg=cfg,
                                            pdl=cfg["method"] != "two_launch")
    return y.reshape(*x.shape[:-1], sum(outs))


@torch.library.custom_op("lrinfer::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor,
    V: torch.Tensor,
    U: torch.Tensor,
    bias: torch.Tensor | None = None,
    V2: torch.Tensor | None = None,
    U2: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_triton(x):
        return _triton_forward(x, V, U, bias, V2, U2)
    return lowrank_linear_reference(x, V, U, bias, V2, U2).contiguous()


@_lowrank_linear_op.register_fake
def _(x, V, U, bias=None, V2=None, U2=None):
    validate_operands(x, V, U, bias, V2, U2)
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _setup_context(ctx, inputs, output):
    x, V, U, bias, V2, U2 = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, V, U, V2, U2)


def _backward(ctx, g):
    """Gradients of y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias, in torch math."""
    x, V, U, V2, U2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    g2 = g.reshape(-1, g.shape[-1])  # shape [M, out]
    x2 = x.reshape(-1, x.shape[-1])  # shape [M, in]
    grads = [None] * 6
    for i, (Vi, Ui) in ((1, (V, U)), (4, (V2, U2))):
        if Vi is None:
            continue
        gt = g2 @ Ui  # shape [M, k]
        if need[0]:
            gx = gt @ Vi.t()
            grads[0] = gx if grads[0] is None else grads[0] + gx
        if need[i]:
            grads[i] = x2.t() @ gt
        if need[i + 1]:
            grads[i + 1] = g2.t() @ (x2 @ Vi)
    if grads[0] is not None:
        grads[0] = grads[0].reshape(x.shape)
    if ctx.has_bias and need[3]:
        grads[3] = g2.sum(0)
    return tuple(grads)


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


def needs_registered_op(x: torch.Tensor) -> bool:
    """True when something is tracing or capturing, so the call must go through the registered op:
    torch.compile / export, a tensor subclass (fake, functional), an active dispatch mode, or CUDA-graph
    capture. Otherwise the eager call skips the custom-op dispatch, which costs about as much as the
    math at decode sizes on a CPU."""
    return (torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or _python_dispatch._get_current_dispatch_mode() is not None
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def lowrank_forward(x, V, U, bias=None, V2=None, U2=None):
    """`lowrank_linear` without the argument checks, for callers that validated once (`LowRankLinear`)."""
    if needs_registered_op(x):
        return torch.ops.lrinfer.lowrank_linear(x, V, U, bias, V2, U2)
    if use_triton(x):
        if torch.is_grad_enabled() and (x.requires_grad or V.requires_grad or U.requires_grad):
            return torch.ops.lrinfer.lowrank_linear(x, V, U, bias, V2, U2)   # the kernels have no backward
        return _triton_forward(x, V, U, bias, V2, U2)
    return lowrank_linear_reference(x, V, U, bias, V2, U2)


def lowrank_linear(x, V, U, bias=None, V2=None, U2=None):
    """y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias, the math of `torch.ops.lrinfer.lowrank_linear`.

    x [..., in]; V [in, k]; U [out, k]; bias [out] or None; V2 [in, k2], U2 [out, k2] or None.
    A residual pair may also be passed pre-concatenated: V = [V|V2], U = [U|U2].
    Under torch.compile, fake tensors or CUDA-graph capture this calls the registered op; in plain
    eager mode it runs the same kernels directly.
    """
    validate_operands(x, V, U, bias, V2, U2)
    return lowrank_forward(x, V, U, bias, V2, U2)
