"""From a target ratio to a rank per linear: layer selection, then rank allocation.

A *selection* picks which linears are compressed and the ratio they must reach so that the removed
parameters equal `ratio` × all compressible parameters. An *allocator* then spreads that budget over
the selected linears. Both register by name; any selection combines with any allocator and solver.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LrinferError, check_options
from .factors import rank_for_ratio
from .models import LinearInfo


@dataclass(frozen=True)
class Registered:
    name: str
    fn: Callable
    needs_spectra: bool = False     # allocator wants whitened singular values of every selected linear
    summary: str = ""

    def options(self) -> dict:
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY}

    def __call__(self, *args, **options):
        check_options(f"'{self.name}'", options, self.options())
        return self.fn(*args, **options)


SELECTIONS: dict[str, Registered] = {}
ALLOCATORS: dict[str, Registered] = {}


def register_selection(name: str, summary: str = ""):
    """Decorator for `select(linears, ratio, *, option=...) -> (selected linears, ratio within them)`."""
    def deco(fn):
        SELECTIONS[name] = Registered(name, fn, False, summary)
        return fn
    return deco


def register_allocator(name: str, needs_spectra: bool = False, summary: str = ""):
    """Decorator for `allocate(linears, ratio, multiple, spectra, *, option=...) -> {name: rank}`.

    `spectra` maps each linear's name to the singular values [min(in,out)] of W·L (L Lᵀ = XᵀX,
    dense-model inputs) when `needs_spectra`, else None."""
    def deco(fn):
        ALLOCATORS[name] = Registered(name, fn, needs_spectra, summary)
        return fn
    return deco


def _get(registry: dict, name: str, what: str) -> Registered:
    if name not in registry:
        raise LrinferError(f"unknown {what} '{name}'; choose one of: {', '.join(sorted(registry))}")
    return registry[name]


def get_selection(name: str) -> Registered:
    return _get(SELECTIONS, name, "layer selection")


def get_allocator(name: str) -> Registered:
    return _get(ALLOCATORS, name, "rank allocation")


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise LrinferError(f"{what} must be strictly between 0 and 1 (the fraction of the linears' "
                           f"parameters removed, e.g. 0.2); got {ratio}")
    return float(ratio)


def ratio_within(selected: list[LinearInfo], all_linears: list[LinearInfo], ratio: float) -> float:
    """The ratio the selected linears must reach to remove `ratio` of all linears' parameters."""
    total = sum(f.dense_params for f in all_linears)
    part = sum(f.dense_params for f in selected)
    inner = ratio * total / part
    if inner >= 1.0:
        raise LrinferError(f"the selected layers hold {part / total:.0%} of the parameters, too few to remove "
                           f"{ratio:.0%} of all; select more layers or lower the ratio")
    return inner


@register_selection("all", summary="every compressible linear")
def select_all(linears: list[LinearInfo], ratio: float) -> tuple[list[LinearInfo], float]:
    return linears, ratio


@register_allocator("uniform", summary="the same ratio for every linear (SVD-LLM, SAES-SVD)")
def allocate_uniform(linears: list[LinearInfo], ratio: float, multiple: int, spectra=None
                     ) -> dict[str, int]:
    """k ≈ (1−ratio)·in·out/(in+out) per linear, rounded to `multiple` (see `rank_for_ratio`)."""
    return {f.name: rank_for_ratio(f.in_features, f.out_features, ratio, multiple) for f in linears}


def achieved_ratio(linears: list[LinearInfo], ranks: dict[str, int]) -> float:
    """Fraction of all `linears`' parameters removed by `ranks` (a missing name stays dense)."""
    total = sum(f.dense_params for f in linears)
    kept = sum(ranks[f.name] * (f.in_features + f.out_features) if f.name in ranks else f.dense_params
               for f in linears)
    return 1.0 - kept / total


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values (D-Rank's information density)."""
    p = s.double().pow(2)
    p = p / p.sum().clamp_min(1e-300)
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


# Allocators in their own files register on import.
for _optional in ("drank",):
    try:
        __import__(f"lrinfer.allocators.{_optional}")
    except ModuleNotFoundError as _e:
        if _e.name not in (f"lrinfer.allocators.{_optional}", "lrinfer.allocators"):
            raise
