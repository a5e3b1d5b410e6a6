"""The rank allocation registry and what every allocator shares."""
from __future__ import annotations

from dataclasses import dataclass

from lrinfer.registry import Method, Registry
from lrinfer.runtime.architecture import LinearInfo


@dataclass(frozen=True)
class Allocator(Method):
    needs_spectra: bool = False       # wants the whitened singular values of every selected linear
    needs_sensitivity: bool = False   # wants each linear's output-gradient energy (a whole-model backward)


ALLOCATORS = Registry("rank allocation", Allocator)


def register_allocator(name: str, needs_spectra: bool = False, needs_sensitivity: bool = False, summary: str = ""):
    """Decorator registering `allocate(linears, ratio, multiple, spectra, *, option=...)` under `name`;
    with needs_sensitivity, `allocate(linears, ratio, multiple, spectra, sensitivity, *, ...)`."""
    return ALLOCATORS.register(name, summary, needs_spectra=needs_spectra, needs_sensitivity=needs_sensitivity)


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.lookup(name)


def break_even(in_features: int, out_features: int) -> int:
    """The largest rank whose factor pair holds no more parameters than the dense [out, in] matrix."""
    return max(1, in_features * out_features // (in_features + out_features))


def achieved_ratio(linears: list[LinearInfo], ranks: dict[str, int]) -> float:
    """Fraction of all `linears`' parameters removed by `ranks` (a missing name stays dense)."""
    total = sum(f.dense_params for f in linears)
    kept = sum(ranks[f.name] * (f.in_features + f.out_features) if f.name in ranks else f.dense_params
               for f in linears)
    return 1.0 - kept / total
