"""Stage 2, rank allocation: spread the selected linears' budget over them as one rank per linear.

An allocator is `allocate(linears, ratio, multiple, spectra, *, option=default) -> {name: rank}`,
one file per method, registered with `@register_allocator(name)`. `spectra` maps each linear's name
to the singular values [min(in, out)] of W·L (L Lᵀ = XᵀX, dense-model inputs) when the allocator
is registered with `needs_spectra=True`, else it is None.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models import LinearInfo
from ..registry import Method, Registry


@dataclass(frozen=True)
class Allocator(Method):
    needs_spectra: bool = False     # wants the whitened singular values of every selected linear


ALLOCATORS = Registry("rank allocation", Allocator)


def register_allocator(name: str, needs_spectra: bool = False, summary: str = ""):
    """Decorator registering `allocate(linears, ratio, multiple, spectra, *, option=...)` under `name`."""
    return ALLOCATORS.register(name, summary, needs_spectra=needs_spectra)


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.lookup(name)


def achieved_ratio(linears: list[LinearInfo], ranks: dict[str, int]) -> float:
    """Fraction of all `linears`' parameters removed by `ranks` (a missing name stays dense)."""
    total = sum(f.dense_params for f in linears)
    kept = sum(ranks[f.name] * (f.in_features + f.out_features) if f.name in ranks else f.dense_params
               for f in linears)
    return 1.0 - kept / total


from . import uniform, drank  # noqa: E402,F401  (register; order = `lrinfer methods` order)
