"""Low-rank linear runtime: the `torch.ops.lrinfer.lowrank_linear` op and its kernels.

Nothing here is model-specific. `lowrank_linear(x, V, U, bias, V2, U2)` computes
y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias for x [..., in], V [in, k], U [out, k].
"""
from .ops import lowrank_linear, lowrank_linear_reference

__all__ = ["lowrank_linear", "lowrank_linear_reference"]
