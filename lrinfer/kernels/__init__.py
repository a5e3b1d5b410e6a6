"""Low-rank linear runtime: the `torch.ops.lrinfer.lowrank_linear` op and its kernels.

Nothing here is model-specific. `lowrank_linear(x, V, U, bias, V2, U2)` computes
y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias for x [..., in], V [in, k], U [out, k].
`warmup(shapes, dtypes, m_buckets)` compiles every specialization before CUDA-graph capture.
"""
from .ops import lowrank_linear, lowrank_linear_reference
from .warmup import layer_shapes, warmup

__all__ = ["lowrank_linear", "lowrank_linear_reference", "warmup", "layer_shapes"]
