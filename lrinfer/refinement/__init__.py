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


@register_refiner("none", summary="no refinement: the solver's factors as they are")
def refine_none(block, modules, inputs, targets, calls) -> dict:
    return {}


from . import blockfit  # noqa: E402,F401  (register; order = `lrinfer methods` order)
