"""Tensor-parallel sharding of `LowRankLinear` factors, for serving stacks (see docs/serving.md).

y = (x V) Uᵀ + b with V [in, k], U [out, k]. The rank k is never split:
  column-parallel (q/k/v, gate/up: the output is split): rank r keeps U rows
      [r·out/W, (r+1)·out/W) and the bias slice, and a full copy of V. Its output is the
      matching column block of y; concatenating the blocks (all-gather) gives y.
  row-parallel (o_proj, down_proj: the input is split): rank r keeps V rows
      [r·in/W, (r+1)·in/W) and a full copy of U, and reads the matching slice of x. Its output
      (x_r V_r) Uᵀ is a partial sum; all-reduce (sum) gives y. The bias is kept on rank 0 only,
      so it is added once.
A residual pair (V2, U2) is sharded the same way as (V, U).

Cost: column-parallel repeats the shrink x V on every rank (k·in multiply-adds, small next to
out·k/W when k << out); row-parallel could instead all-reduce t = Σ_r x_r V_r [M, k] and expand
locally, sending k instead of out values per token (`row_parallel_partial(..., reduce="rank")`).

Fused layers (vLLM's qkv_proj, gate_up_proj): `torch.ops.lrinfer.lowrank_linear_grouped` serves S
linears that read the same x as ONE op: one shrink t = x [V_0|...|V_{S-1}] and one expand that writes
shard i's output columns from its own rank segment of t. `pack_grouped` builds its operands.
"""
from __future__ import annotations

import torch

from .nn import LowRankLinear


def _block(n: int, rank: int, world: int, what: str) -> slice:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor-parallel rank {rank} is out of range for world size {world}")
    if n % world:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel world size {world}")
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def _shard(layer: LowRankLinear, in_rows: slice | None, out_rows: slice | None, keep_bias: bool) -> LowRankLinear:
    def cut(t, rows):
        return None if t is None else (t if rows is None else t[rows]).detach().clone()

    V, U = cut(layer.V, in_rows), cut(layer.U, out_rows)
    V2, U2 = cut(layer.V2, in_rows), cut(layer.U2, out_rows)
    bias = cut(layer.bias, out_rows) if keep_bias else None
    m = LowRankLinear(V.shape[0], U.shape[0], layer.rank, layer.rank2, bias is not None,
                      device=V.device, dtype=V.dtype)
    with torch.no_grad():
        for name, t in (("V", V), ("U", U), ("V2", V2), ("U2", U2), ("bias", bias)):
            if t is not None:
                getattr(m, name).copy_(t)
    return m


def shard_column_parallel(layer: LowRankLinear, rank: int, world: int) -> LowRankLinear:
    """This rank's share of a column-parallel layer: U [out/W, k] rows, bias [out/W], V [in, k] replicated.
    Its forward maps x [..., in] to y[..., rank block of out]; concatenating the W outputs gives y."""
    rows = _block(layer.out_features, rank, world, "out_features")
    return _shard(layer, None, rows, keep_bias=True)


def shard_row_parallel(layer: LowRankLinear, rank: int, world: int) -> LowRankLinear:
    """This rank's share of a row-parallel layer: V [in/W, k] rows, U [out, k] replicated, bias on rank 0.
    Its forward maps the input slice x[..., rank block of in] to a partial y [..., out]; summing the
    W partials (all-reduce) gives y."""
    rows = _block(layer.in_features, rank, world, "in_features")
    return _shard(layer, rows, None, keep_bias=rank == 0)


def input_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """x[..., rank block of in]: the input a row-parallel rank reads (the previous column-parallel
    layer already produced exactly this block, so no communication is needed in between)."""
    return x[..., _block(x.shape[-1], rank, world, "the input's last dimension")]


def row_parallel_partial(shard: LowRankLinear, x_slice: torch.Tensor, reduce: str = "output") -> torch.Tensor:
    """The tensor a row-parallel rank all-reduces. reduce="output": the partial y [..., out] (the
    shard's forward). reduce="rank": the partial t = x_r V_r [..., k] (+ [..., k2]), fewer values to
    send; after the all-reduce call `expand_reduced(shard_of_rank0, t)` (same U on every rank)."""
    if reduce == "output":
        return shard(x_slice)
    if reduce == "rank":
        t = x_slice @ shard.V
        return t if shard.V2 is None else torch.cat([t, x_slice @ shard.V2], dim=-1)
    raise ValueError(f"reduce must be 'output' or 'rank'; got {reduce!r}")


def expand_reduced(shard: LowRankLinear, t: torch.Tensor) -> torch.Tensor:
    """y = t Uᵀ (+ t2 U2ᵀ) + bias from the all-reduced t [..., k (+ k2)] of `row_parallel_partial(reduce="rank")`;
    pass rank 0's shard (the one holding the bias), or add the bias yourself."""
    k = shard.rank
    y = t[..., :k] @ shard.U.t()
    if shard.U2 is not None:
        y = y + t[..., k:] @ shard.U2.t()
    return y if shard.bias is None else y + shard.bias


# --- one op for a fused layer -------------------------------------------------------------------


def _grouped_check(x, V, U, bias, ranks, outs) -> None:
    """Raise LrinferError (one line: the offender and the fix) on operands that do not fit
    `lowrank_linear_grouped`."""
    from .errors import LrinferError

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


def _grouped_views(V, U, ranks, outs):
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
    for k0, o0, _, Ui in _grouped_views(V, U, ranks, outs):
        cols = y[:, o0:o0 + Ui.shape[0]]              # a strided view: the GEMM writes its rows in place
        if bias is None:
            torch.mm(t[:, k0:k0 + Ui.shape[1]], Ui.t(), out=cols)
        else:
            torch.addmm(bias[o0:o0 + Ui.shape[0]], t[:, k0:k0 + Ui.shape[1]], Ui.t(), out=cols)
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("lrinfer::lowrank_linear_grouped", mutates_args=())
def _lowrank_linear_grouped_op(x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None,
                               ranks: list[int], outs: list[int]) -> torch.Tensor:
    from .kernels import ops
    if ops._use_triton(x):
        # decode M: the grouped kernel pair (one shrink over [V_0|...], one expand writing each shard's
        # columns); other M: None, then the torch math below (one shrink GEMM, one GEMM per shard)
        y = ops.grouped_forward(x, V, U, bias, ranks, outs)
        if y is not None:
            return y
    return lowrank_linear_grouped_reference(x, V, U, bias, ranks, outs)


@_lowrank_linear_grouped_op.register_fake
def _(x, V, U, bias, ranks, outs):
    _grouped_check(x, V, U, bias, ranks, outs)
    return x.new_empty((*x.shape[:-1], sum(outs)))


def lowrank_linear_grouped(x, V, U, bias, ranks, outs):
    """y = [x V_0 U_0ᵀ | ... | x V_{S-1} U_{S-1}ᵀ] + bias through `torch.ops.lrinfer.lowrank_linear_grouped`.

    x [..., in]; V [in, Σk_i] (shard i's columns, a residual pair as [V_i|V2_i]); U the packed 1-D
    [Σ out_i·k_i] (shard i's U_i [out_i, k_i] row-major, one after another); bias [Σ out_i] or None;
    ranks = [k_i], outs = [out_i]. Returns [..., Σ out_i]. Build V and U with `pack_grouped`.
    """
    ranks, outs = [int(k) for k in ranks], [int(o) for o in outs]
    _grouped_check(x, V, U, bias, ranks, outs)
    return torch.ops.lrinfer.lowrank_linear_grouped(x, V, U, bias, ranks, outs)


def pack_grouped(layers: list[LowRankLinear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
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


# --- `lrinfer serve DIR` -------------------------------------------------------------------------

VLLM_SERVER = "vllm.entrypoints.openai.api_server"


def _architecture_override(path) -> list[str]:
    """`--hf-overrides` naming the architecture for a checkpoint whose config.json lacks `architectures`
    (written before lrinfer recorded it); vLLM picks its model class from that field."""
    import json as _json
    from pathlib import Path

    config = _json.loads((Path(path) / "config.json").read_text())
    if config.get("architectures"):
        return []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    return ["--hf-overrides", _json.dumps({"architectures": [arch]})] if arch else []


def serve_command(path, host: str = "127.0.0.1", port: int = 8000, vllm_args=()) -> list[str]:
    """The command `lrinfer serve` runs: vLLM's OpenAI-compatible server on a checkpoint directory, in this
    Python. Raises LrinferError when the directory is not an lrinfer checkpoint, vLLM is missing, or
    lrinfer's plugin entry point is not installed in this environment."""
    import importlib.metadata
    import importlib.util
    import sys
    from pathlib import Path

    from .checkpoint import read_manifest
    from .errors import LrinferError
    from .vllm_plugin import INSTALL_HINT

    path = Path(path)
    if not path.is_dir():
        raise LrinferError(f"checkpoint directory not found: {path}")
    read_manifest(path)   # CheckpointError (an LrinferError) when it is not an lrinfer checkpoint
    if importlib.util.find_spec("vllm") is None:
        raise LrinferError(f"vLLM is not installed in this environment ({sys.executable}); install it: {INSTALL_HINT}")
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    if plugins.get("lrinfer") != "lrinfer.vllm_plugin:register":
        raise LrinferError("lrinfer's vLLM plugin is not registered in this environment (vLLM loads it through the "
                           "`vllm.general_plugins` entry point of the installed lrinfer): pip install --no-deps -e "
                           "<lrinfer checkout> in the environment that has vLLM")
    args = list(vllm_args)
    if args[:1] == ["--"]:
        args = args[1:]
    extra = [] if any(a.startswith("--hf-overrides") for a in args) else _architecture_override(path)
    return [sys.executable, "-m", VLLM_SERVER, "--model", str(path), "--host", host, "--port", str(port),
            *extra, *args]


def serve(path, host: str = "127.0.0.1", port: int = 8000, vllm_args=(), dry_run: bool = False) -> list[str]:
    """`lrinfer serve`: replace this process with vLLM's OpenAI-compatible server on the checkpoint (the
    plugin loads through its entry point in every vLLM process). dry_run: return the command instead."""
    import os

    cmd = serve_command(path, host, port, vllm_args)
    if dry_run:
        return cmd
    os.execv(cmd[0], cmd)
