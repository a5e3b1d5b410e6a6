"""Low-rank linear runtime: the two registered ops and their kernels. Nothing here is model-specific.

`torch.ops.lrinfer.lowrank_linear(x, V, U, bias, V2, U2)` computes y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias
for x [..., in], V [in, k], U [out, k] (`ops.py`); `torch.ops.lrinfer.lowrank_linear_grouped` serves
S linears that read the same x as one op (`grouped.py`, vLLM's fused qkv/gate-up layers).
`warmup(shapes, dtypes, m_buckets)` compiles every specialization before CUDA-graph capture.
"""
from .grouped import lowrank_linear_grouped, pack_grouped
from .ops import lowrank_linear, lowrank_linear_reference
from .warmup import layer_shapes, warmup

__all__ = ["lowrank_linear", "lowrank_linear_grouped", "lowrank_linear_reference", "pack_grouped", "warmup",
           "layer_shapes"]
