"""`LowRankLinear` and module swapping (`patch` / `unpatch`)."""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import torch
from torch import nn

from lrinfer.factors import FactorPair
from lrinfer.runtime.kernels.configs import RANK_ALIGN, aligned_rank as _aligned
from lrinfer.runtime.kernels.ops import (lowrank_forward, lowrank_linear_reference, needs_registered_op,
                                         validate_operands)

PAD_DEVICE_TYPES = {"cuda"}  # devices whose factors get zero-padded row-major storage (the kernels run there)
K_MAJOR_DEVICE_TYPES = {"cpu"}  # devices whose factors are stored k-major (see `k_major`)
_FACTORS = ("V", "U", "V2", "U2")


def is_k_major(t: torch.Tensor) -> bool:
    """t [rows, k] is the transpose of a contiguous [k, rows] tensor."""
    return t.dim() == 2 and t.t().is_contiguous()


def k_major(t: torch.Tensor) -> torch.Tensor:
    """The factor t [rows, k] stored k-major: the same values, as the transpose of a contiguous [k, rows].

    The CPU's layout: at decode (one row of x) the BLAS then computes x V as k dot products along `in`
    and (x V) Uᵀ as k row updates along `out`, long contiguous runs both, instead of `in` short row
    updates and `out` short dot products. Measured on SmolLM2's 210 linears with cold weights, one
    thread, float32: 1.09–1.20× faster than row-major at a 20% and a 40% cut; whole decode steps at 40%
    1.27× → 1.33× dense's (docs/results.md). A copy unless t is already k-major."""
    return t if is_k_major(t) else t.t().contiguous().t()


def k_major_(t: torch.Tensor) -> torch.Tensor:
    """`k_major` in t's own memory (t [rows, k] contiguous, viewed by nothing else): its values rewritten
    as a contiguous [k, rows], returned as the [rows, k] transpose. One factor-sized temporary, where
    `k_major` would keep t's memory alive beside the copy when t shares a storage (a file's tensors)."""
    if is_k_major(t):
        return t
    rows, k = t.shape
    tmp = t.new_empty(t.numel()).view(k, rows)
    tmp.copy_(t.t())
    out = t.view(k, rows)       # t's memory, reread as [k, rows]
    out.copy_(tmp)
    return out.t()


def _is_padded(p: torch.Tensor) -> bool:
    """p [rows, k] needs no padding, or is the leading view of the zero-padded buffer `_pad` made.

    Marked by `_pad` itself, never inferred from strides: a slice of a wider tensor (e.g. V of
    [V|V2] stored side by side) has the same strides, but its next columns are not zero."""
    kp = _aligned(p.shape[1])
    return kp == p.shape[1] or (getattr(p, "_lrinfer_zero_padded", None) == p.untyped_storage().data_ptr()
                                and p.stride() == (kp, 1))   # the mark is the buffer's: `.data = ...` drops it


def _pad(p: nn.Parameter) -> nn.Parameter:
    """The same parameter values [rows, k] as a view into a zero-filled row-major [rows, aligned(k)] buffer.

    Exact: the extra columns are zero in V and U alike, so they add nothing to (x V) Uᵀ; no op on the
    view can write them. Cost: (rows) × (aligned(k) − k) × element bytes per factor.
    """
    if p is None or p.dim() != 2 or p.device.type not in PAD_DEVICE_TYPES or (_is_padded(p) and p.stride(1) == 1):
        return p
    rows, k = p.shape
    buf = torch.zeros(rows, _aligned(k), dtype=p.dtype, device=p.device)
    with torch.no_grad():
        buf[:, :k].copy_(p)
    out = nn.Parameter(buf[:, :k], requires_grad=p.requires_grad)
    out._lrinfer_zero_padded = buf.untyped_storage().data_ptr()
    return out


def _stored(p: nn.Parameter | None, copied: bool) -> nn.Parameter | None:
    """The factor parameter in the storage its device reads fastest: padded row-major on the kernels'
    devices (`_pad`, always), k-major on the CPU (`k_major`) when `copied` (its storage was just
    made, so laying it out costs one transient copy, never a second resident one), else as it is."""
    if p is None or p.dim() != 2:
        return p
    if p.device.type in PAD_DEVICE_TYPES:
        return _pad(p)
    if copied and p.device.type in K_MAJOR_DEVICE_TYPES and not is_k_major(p):
        return nn.Parameter(k_major(p.data), requires_grad=p.requires_grad)
    return p


def _empty_factor(rows: int, k: int, kw: dict) -> nn.Parameter:
    """An uninitialised factor [rows, k] already in its device's layout (k-major on the CPU), so that
    setting it copies nothing."""
    device = torch.empty(0, device=kw.get("device")).device   # None: the default device
    return nn.Parameter(torch.empty(k, rows, **kw).t() if device.type in K_MAJOR_DEVICE_TYPES
                        else torch.empty(rows, k, **kw))


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
    parameter); a kernel or traced call compares x's width, dtype and device with V's, and the CPU's
    eager call leaves that to torch's math, naming the mismatch only when that math refuses x.

    Ranks the kernels cannot load with 16-byte rows (k not a multiple of `RANK_ALIGN`: checkpoints
    written with rank_multiple 8, ResSVD's two ranks) are padded at load: on CUDA each factor is
    stored as the [rows, k] view of a zero-filled [rows, k'] buffer (k' = k rounded up to 16),
    and the kernels get the [rows, k'] view. Exact math (zero columns in V and U); the parameters,
    `rank`, `factors()` and the state dict keep k. Cost: (in + out) × (k' − k) × element bytes per
    pair, e.g. 4096→11008 at k = 1784: 15104 × 8 × 2 B = 242 KB (0.45% of its 53.9 MB).
    On the CPU the factors are stored k-major instead (`k_major`: each the transpose of a contiguous
    [k, rows]), the layout its BLAS reads fastest at decode: as built here, as `load_checkpoint`
    loads them, after `from_pretrained` (`k_major_factors_`, in the loaded tensors' own memory), and
    after a move or dtype change; any other parameter assigned directly is kept as given. Either way the
    values, shapes and state dict are the same.
    """

    _checked = False   # the factors' shapes, dtypes and devices agree (see `forward`)

    def __init__(self, in_features: int, out_features: int, rank: int, rank2: int = 0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.V, self.U = _empty_factor(in_features, rank, kw), _empty_factor(out_features, rank, kw)
        if rank2:
            self.V2, self.U2 = _empty_factor(in_features, rank2, kw), _empty_factor(out_features, rank2, kw)
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
        if not self._checked:
            validate_operands(x, V, U, bias, V2, U2)   # raises, naming the mismatch
            self._checked = True
        if x.is_cuda or needs_registered_op(x):
            if x.shape[-1] != V.shape[0] or x.dtype is not V.dtype or x.device != V.device:
                validate_operands(x, V, U, bias, V2, U2)
            if x.is_cuda and not (torch.is_grad_enabled() and V.requires_grad):  # kernels: padded views
                return lowrank_forward(x, kernel_view(V), kernel_view(U), bias, kernel_view(V2), kernel_view(U2))
            return lowrank_forward(x, V, U, bias, V2, U2)
        try:   # the CPU's eager call: torch's math refuses a mismatched x itself, validate_operands says why
            return lowrank_linear_reference(x, V, U, bias, V2, U2)
        except RuntimeError:
            validate_operands(x, V, U, bias, V2, U2)
            raise

    def __setattr__(self, name, value):
        if name in ("V", "U", "V2", "U2", "bias"):
            self.__dict__["_checked"] = False
        if name in _FACTORS and isinstance(value, nn.Parameter):
            value = _stored(value, copied=False)   # assigned storage is kept (e.g. a memory-mapped file's)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._checked = False
        before = {n: p.untyped_storage().data_ptr() for n, p in self._parameters.items()
                  if n in _FACTORS and p is not None}
        out = super()._apply(fn, recurse)
        for name, ptr in before.items():  # a move or dtype change that built new storage gets its device's layout
            p = self._parameters[name]
            q = _stored(p, copied=p.untyped_storage().data_ptr() != ptr)
            if q is not p:
                super().__setattr__(name, q)
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


def k_major_factors_(model: nn.Module) -> int:
    """Rewrite, each in its own memory (`k_major_`), the row-major CPU factors that a loader assigned to
    `model`'s `LowRankLinear` modules (a safetensors file's tensors, a dtype conversion's copies), so they
    decode in the CPU's layout with no second resident copy. Only a factor that is its storage's only
    tensor (offset 0, the whole storage, no other parameter on it) is rewritten; any other is kept as
    given. Call it before anything else holds the loaded tensors. Returns how many were rewritten."""
    users = Counter(p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    done = 0
    for m in lowrank_modules(model).values():
        for name in _FACTORS:
            p = m._parameters.get(name)
            if (p is None or p.dim() != 2 or p.device.type not in K_MAJOR_DEVICE_TYPES or is_k_major(p)
                    or not p.is_contiguous() or p.storage_offset() != 0
                    or p.untyped_storage().nbytes() != p.numel() * p.element_size()
                    or users[p.untyped_storage().data_ptr()] != 1):
                continue
            with torch.no_grad():
                setattr(m, name, nn.Parameter(k_major_(p.data), requires_grad=p.requires_grad))
            done += 1
    return done
