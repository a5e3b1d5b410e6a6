"""Tensor-parallel sharding of `LowRankLinear` factors, in one process: the rule the vLLM plugin's
loaders follow, and the reference its tests check them against (docs/serving.md).

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


