"""Stage 4, refinement: after a decoder block's linears are solved, adjust the block's factor pairs so
the compressed block reproduces the dense block's outputs.

A refiner is `refine(block, modules, inputs, targets, calls, *, option=default) -> dict`, one file per
method, registered with `@register_refiner(name)`: `modules` maps names in the block to its
`LowRankLinear`s (their U, V, U2, V2 are changed in place), `inputs` are the compressed-path hidden
states X̂ entering the block and `targets` the dense block's outputs on the dense inputs X (lists of
[batch, T, hidden], one per calibration batch, with their `calls`). It returns what it did, for the
report (at least the block's relative output error before and after).
"""
from __future__ import annotations

from ..registry import Method, Registry

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


from . import blockfit  # noqa: E402,F401  (register; order = `lrinfer methods` order)
