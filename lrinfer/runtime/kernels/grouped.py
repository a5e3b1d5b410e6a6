"""`torch.ops.lrinfer.lowrank_linear_grouped`: S linears that read the same x (vLLM's qkv_proj,
gate_up_proj) as ONE op: one shrink t = x [V_0|...|V_{S-1}] and one expand that writes shard i's
output columns from its own rank segment of t. `pack_grouped` builds its operands."""
from __future__ import annotations

import torch

from lrinfer.errors import LrinferError
from . import ops



def check_grouped(x, V, U, bias, ranks, outs) -> None:
    """Raise LrinferError (one line: the offender and the fix) on operands that do not fit
    `lowrank_linear_grouped`."""
    what = "lowrank_linear_grouped"
    if len(ranks) != len(outs) or not ranks:
        raise LrinferError(f"{what}: ranks {list(ranks)} and outs {list(outs)} must be non-empty and of one "
                           "length (one entry per shard)")
    if any(k < 1 for k in ranks) or any(o < 0 for o in outs):
        raise LrinferError(f"{what}: every rank must be >= 1 and every out >= 0; got {list(ranks)}, {list(outs)}")
    if V.dim() != 2 or V.shape[1] != sum(ranks):
        raise LrinferError(f"{what}: V must be [in, sum(ranks)] = [*, {sum(ranks)}]; got {tuple(V.shape)}")
    if x.dim() < 1 or x.shape[-1] != V.shape[0]:
        raise LrinferError(f"{what}: x has {x.shape[-1] if x.dim() else '?'} features but V has {V.shape[0]} "
                           "rows; x [..., in] needs V [in, sum(ranks)]")
    need = sum(k * o for k, o in zip(ranks, outs))
    if U.dim() != 1 or U.shape[0] != need:
        raise LrinferError(f"{what}: U must be the packed 1-D [sum(out_i * k_i)] = [{need}]; got {tuple(U.shape)} "
                           "(build it with pack_grouped)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != sum(outs)):
        raise LrinferError(f"{what}: bias must be [sum(outs)] = [{sum(outs)}]; got {tuple(bias.shape)}")
    for name, t in (("U", U), ("bias", bias)):
        if t is not None and t.numel() > 1 and t.stride(0) != 1:
            raise LrinferError(f"{what}: {name} must be contiguous (stride 1, got {t.stride(0)}); pass "
                               f"{name}.contiguous() or build the operands with pack_grouped")
    if not x.dtype.is_floating_point:
        raise LrinferError(f"{what}: x has dtype {x.dtype}; expected a floating dtype")
    for name, t in (("V", V), ("U", U), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise LrinferError(f"{what}: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                               "all must match (cast or move them together)")


def grouped_views(V, U, ranks, outs):
    """(k0, o0, V_i [in, k_i], U_i [out_i, k_i]) for every shard; views, no copies."""
    k0 = o0 = u0 = 0
    for k, o in zip(ranks, outs):
        yield k0, o0, V[:, k0:k0 + k], U[u0:u0 + o * k].view(o, k)
        k0, o0, u0 = k0 + k, o0 + o, u0 + o * k


def lowrank_linear_grouped_reference(x, V, U, bias, ranks, outs):
    """Torch math of the grouped op: t = x V once; y[..., o_i : o_i + out_i] = t[..., k_i segment] U_iᵀ (+ bias)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t = x2 @ V                                        # the one shrink, [M, Σk]
    y = x2.new_empty((x2.shape[0], sum(outs)))
    for k0, o0, _, Ui in grouped_views(V, U, ranks, outs):
        cols = y[:, o0:o0 + Ui.shape[0]]              # a strided view: the GEMM writes its rows in place
        if bias is None:
            torch.mm(t[:, k0:k0 + Ui.shape[1]], Ui.t(), out=cols)
        else:
            torch.addmm(bias[o0:o0 + Ui.shape[0]], t[:, k0:k0 + Ui.shape[1]], Ui.t(), out=cols)
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("lrinfer::lowrank_linear_grouped", mutates_args=())
def _lowrank_linear_grouped_op(x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None,
                               ranks: list[int], outs: list[int]) -> torch.Tensor:
    if ops.use_triton(x):
        # decode M: the grouped kernel pair (one shrink over [V_0|...], one expand writing each shard's
        # columns); other M: None, then the torch math below (one shrink GEMM, one GEMM per shard)
        y = ops.grouped_forward(x, V, U, bias, ranks, outs)
        if y is not None:
            return y
    return lowrank_linear_grouped_reference(x, V, U, bias, ranks, outs)


@_lowrank_linear_grouped_op.register_fake
def _(x, V, U, bias, ranks, outs):
    check_grouped(x, V, U, bias, ranks, outs)
    return x.new_empty((*x.shape[:-1], sum(outs)))


def lowrank_linear_grouped(x, V, U, bias, ranks, outs):
    """y = [x V_0 U_0ᵀ | ... | x V_{S-1} U_{S-1}ᵀ] + bias through `torch.ops.lrinfer.lowrank_linear_grouped`.

    x [..., in]; V [in, Σk_i] (shard i's columns, a residual pair as [V_i|V2_i]); U the packed 1-D
    [Σ out_i·k_i] (shard i's U_i [out_i, k_i] row-major, one after another); bias [Σ out_i] or None;
    ranks = [k_i], outs = [out_i]. Returns [..., Σ out_i]. Build V and U with `pack_grouped`.
    """
    ranks, outs = [int(k) for k in ranks], [int(o) for o in outs]
    check_grouped(x, V, U, bias, ranks, outs)
    return torch.ops.lrinfer.lowrank_linear_grouped(x, V, U, bias, ranks, outs)


def pack_grouped(layers: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                      list[int], list[int]]:
    """(V, U, bias, ranks, outs) of `lowrank_linear_grouped` for layers that read the same input (q, k, v):
    residual pairs are concatenated ([V|V2], [U|U2]); bias is None unless every layer has one."""
    if not layers or len({m.in_features for m in layers}) != 1:
        raise ValueError("pack_grouped: give one or more layers with the same in_features")
    Vs, Us, ranks, outs = [], [], [], []
    for m in layers:
        V = m.V if m.V2 is None else torch.cat([m.V, m.V2], dim=1)
        U = m.U if m.U2 is None else torch.cat([m.U, m.U2], dim=1)
        Vs.append(V.detach())
        Us.append(U.detach().reshape(-1))
        ranks.append(V.shape[1])
        outs.append(U.shape[0])
    biases = [m.bias for m in layers]
    bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
    return torch.cat(Vs, dim=1).contiguous(), torch.cat(Us).contiguous(), bias, ranks, outs


