"""`LowRankLinear` and module swapping (`patch` / `unpatch`)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lrinfer.factors import FactorPair
from lrinfer.runtime.kernels.configs import RANK_ALIGN, aligned_rank as _aligned
from lrinfer.runtime.kernels.ops import validate_operands, lowrank_forward

PAD_DEVICE_TYPES = {"cuda"}  # devices whose factors get zero-padded storage (the kernels run there)
_FACTORS = ("V", "U", "V2", "U2")


def _is_padded(p: torch.Tensor) -> bool:
    """p [rows, k] needs no padding, or is the leading view of the zero-padded buffer `_pad` made.

    Marked by `_pad` itself, never inferred from strides: a slice of a wider tensor (e.g. V of
    [V|V2] stored side by side) has the same strides, but its next columns are not zero."""
    kp = _aligned(p.shape[1])
    return kp == p.shape[1] or (getattr(p, "_lrinfer_zero_padded", None) == p.untyped_storage().data_ptr()
                                and p.stride() == (kp, 1))   # the mark is the buffer's: `.data = ...` drops it


def _pad(p: nn.Parameter) -> nn.Parameter:
    """The same parameter values [rows, k] as a view into a zero-filled [rows, aligned(k)] buffer.

    Exact: the extra columns are zero in V and U alike, so they add nothing to (x V) Uᵀ; no op on the
    view can write them. Cost: (rows) × (aligned(k) − k) × element bytes per factor.
    """
    if p is None or p.dim() != 2 or p.device.type not in PAD_DEVICE_TYPES or _is_padded(p):
        return p
    rows, k = p.shape
    buf = torch.zeros(rows, _aligned(k), dtype=p.dtype, device=p.device)
    with torch.no_grad():
        buf[:, :k].copy_(p)
    out = nn.Parameter(buf[:, :k], requires_grad=p.requires_grad)
    out._lrinfer_zero_padded = buf.untyped_storage().data_ptr()
    return out


def kernel_view(p: torch.Tensor | None) -> torch.Tensor | None:
    """p [rows, k] widened to [rows, aligned(k)] over its zero padding when it has one, else p."""
    if p is None or p.shape[1] % RANK_ALIGN == 0 or not _is_padded(p):   # aligned ranks: no stride reads
        return p
    return p.as_strided((p.shape[0], _aligned(p.shape[1])), (_aligned(p.shape[1]), 1))


class LowRankLinear(nn.Module):
    """Drop-in for `nn.Linear`: y = (x V) Uᵀ [+ (x V2) U2ᵀ] + bias.

    V [in, k], U [out, k]; the optional residual pair V2 [in, k2], U2 [out, k2] (ResSVD).
    The forward computes `torch.ops.lrinfer.lowrank_linear` (Triton on CUDA, torch elsewhere); the
    factors are checked against each other once, not on every call (again after `.to()` or a new
    parameter), and each call only compares x's width, dtype and device with V's.

    Ranks the kernels cannot load with 16-byte rows (k not a multiple of `RANK_ALIGN`: checkpoints
    written with rank_multiple 8, ResSVD's two ranks) are padded at load: on CUDA each factor is
    stored as the [rows, k] view of a zero-filled [rows, k'] buffer (k' = k rounded up to 16),
    and the kernels get the [rows, k'] view. Exact math (zero columns in V and U); the parameters,
    `rank`, `factors()` and the state dict keep k. Cost: (in + out) × (k' − k) × element bytes per
    pair, e.g. 4096→11008 at k = 1784: 15104 × 8 × 2 B = 242 KB (0.45% of its 53.9 MB).
    """

    _checked = False   # the factors' shapes, dtypes and devices agree (see `forward`)

    def __init__(self, in_features: int, out_features: int, rank: int, rank2: int = 0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        if rank2:
            self.V2 = nn.Parameter(torch.empty(in_features, rank2, **kw))
            self.U2 = nn.Parameter(torch.empty(out_features, rank2, **kw))
        else:
            self.register_parameter("V2", None)
            self.register_parameter("U2", None)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @property
    def rank(self) -> int:
        return self.V.shape[1]

    @property
    def rank2(self) -> int:
        return 0 if self.V2 is None else self.V2.shape[1]

    @classmethod
    def from_factors(cls, pair: FactorPair, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from a `FactorPair`; `bias` [out] is copied from the dense layer."""
        dtype = dtype or pair.U.dtype
        m = cls(pair.V.shape[0], pair.U.shape[0], pair.rank, pair.rank2, bias is not None,
                device=pair.U.device, dtype=dtype)
        with torch.no_grad():
            m.V.copy_(pair.V)
            m.U.copy_(pair.U)
            if pair.rank2:
                m.V2.copy_(pair.V2)
                m.U2.copy_(pair.U2)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def factors(self) -> FactorPair:
        return FactorPair(self.U.data, self.V.data,
                          None if self.U2 is None else self.U2.data,
                          None if self.V2 is None else self.V2.data)

    def dense_weight(self) -> torch.Tensor:
        """W = U Vᵀ [+ U2 V2ᵀ], [out, in]."""
        return self.factors().dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters   # dict reads, not nn.Module.__getattr__: a decode step makes hundreds of calls
        V, U, bias, V2, U2 = p["V"], p["U"], p.get("bias"), p.get("V2"), p.get("U2")
        if not self._checked or x.shape[-1] != V.shape[0] or x.dtype is not V.dtype or x.device != V.device:
            validate_operands(x, V, U, bias, V2, U2)   # raises, naming the mismatch
            self._checked = True
        if x.is_cuda and not (torch.is_grad_enabled() and V.requires_grad):  # kernels: padded views
            return lowrank_forward(x, kernel_view(V), kernel_view(U), bias, kernel_view(V2), kernel_view(U2))
        return lowrank_forward(x, V, U, bias, V2, U2)

    def __setattr__(self, name, value):
        if name in ("V", "U", "V2", "U2", "bias"):
            self.__dict__["_checked"] = False
        if name in _FACTORS and isinstance(value, nn.Parameter):
            value = _pad(value)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._checked = False
        out = super()._apply(fn, recurse)
        for name in _FACTORS:  # a move to CUDA (or a dtype change there) gets padded storage again
            p = self._parameters.get(name)
            if p is not None and not _is_padded(p) and p.device.type in PAD_DEVICE_TYPES:
                super().__setattr__(name, _pad(p))
        return out

    def extra_repr(self) -> str:
        r2 = f", rank2={self.rank2}" if self.rank2 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}{r2}, bias={self.bias is not None}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Set `model.<name>` to `new`; returns the module it replaced."""
    parent, child = _parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def patch(model: nn.Module, factors: Mapping[str, FactorPair], dtype: torch.dtype | None = None
          ) -> dict[str, nn.Linear]:
    """Replace each `nn.Linear` named in `factors` by a `LowRankLinear`, in place.

    Returns the replaced dense modules, which `unpatch` puts back.
    """
    replaced = {}
    for name, pair in factors.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"patch: {name} is a {type(old).__name__}, not an nn.Linear")
        if pair.U.shape[0] != old.out_features or pair.V.shape[0] != old.in_features:
            raise ValueError(f"patch: factors for {name} are for [{pair.U.shape[0]}, {pair.V.shape[0]}] "
                             f"but the layer is [{old.out_features}, {old.in_features}]")
        new = LowRankLinear.from_factors(pair.to(old.weight.device), old.bias, dtype or old.weight.dtype)
        replaced[name] = replace_module(model, name, new)
    return replaced


def unpatch(model: nn.Module, replaced: Mapping[str, nn.Module]) -> None:
    """Put back the modules that `patch` returned."""
    for name, module in replaced.items():
        replace_module(model, name, module)


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """All `LowRankLinear` modules of `model`, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
