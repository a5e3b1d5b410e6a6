"""The refinement registry and what every refiner shares."""
from __future__ import annotations

from lrinfer.registry import Method, Registry


REFINERS = Registry("refinement")

register_refiner = REFINERS.register   # @register_refiner(name, summary) on `refine(block, modules, ..., *, ...)`


def get_refiner(name: str) -> Method:
    return REFINERS.lookup(name)


def summarize(reports) -> dict:
    """Refiner reports of several blocks -> {"blocks", "error_before", "error_after" (and, with a
    held-apart early stop, "heldout_before", "heldout_after"): means; "seconds": sum}; {} when none refined."""
    reps = [r for r in reports if "error_before" in r]
    if not reps:
        return {}
    out = {"blocks": len(reps), "seconds": sum(r.get("seconds", 0.0) for r in reps)}
    for key in ("error_before", "error_after", "heldout_before", "heldout_after"):
        if all(key in r for r in reps):
            out[key] = sum(r[key] for r in reps) / len(reps)
    return out


@register_refiner("none", summary="no refinement: the solver's factors as they are")
def refine_none(block, modules, inputs, targets, calls) -> dict:
    return {}
