"""Every compressible linear, at the overall ratio (SVD-LLM, SAES-SVD, D-Rank)."""
from __future__ import annotations

from lrinfer.runtime.architecture import LinearInfo
from .base import register_selection


@register_selection("all", summary="every compressible linear")
def select_all(linears: list[LinearInfo], ratio: float) -> tuple[list[LinearInfo], float]:
    return linears, ratio
