"""The same ratio for every selected linear (SVD-LLM, SAES-SVD, ResSVD)."""
from __future__ import annotations

from lrinfer.factors import rank_for_ratio
from lrinfer.runtime.architecture import LinearInfo
from .base import register_allocator


@register_allocator("uniform", summary="the same ratio for every linear (SVD-LLM, SAES-SVD)")
def allocate_uniform(linears: list[LinearInfo], ratio: float, multiple: int, spectra=None) -> dict[str, int]:
    """k ≈ (1−ratio)·in·out/(in+out) per linear, rounded to the nearest `multiple` (see `rank_for_ratio`)."""
    return {f.name: rank_for_ratio(f.in_features, f.out_features, ratio, multiple) for f in linears}
