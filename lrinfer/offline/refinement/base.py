"""The refinement registry and what every refiner shares."""
from __future__ import annotations

from lrinfer.registry import Method, Registry


REFINERS = Registry("refinement")

register_refiner = REFINERS.register   # @register_refiner(name, summary) on `refine(block, modules, ..., *, ...)`


def get_refiner(name: str) -> Method:
    return REFINERS.lookup(name)


def summarize(reports) -> dict:
    """Refiner reports of several blocks -> {"blocks", "error_before", "error_after" (means), "seconds"
    (sum)}; {} when none refined."""
    reps = [r for r in reports if "error_before" in r]
    if not reps:
        return {}
    return {"blocks": len(reps), "error_before": sum(r["error_before"] for r in reps) / len(reps),
            "error_after": sum(r["error_after"] for r in reps) / len(reps),
            "seconds": sum(r.get("seconds", 0.0) for r in reps)}


@register_refiner("none", summary="no refinement: the solver's factors as they are")
def refine_none(block, modules, inputs, targets, calls) -> dict:
    return {}
