"""Stage 4, refinement: after a decoder block's linears are solved, adjust the block's factor pairs so
the compressed block reproduces the dense block's outputs.

A refiner is `refine(block, modules, inputs, targets, calls, *, option=default) -> dict`, one file per
method, registered with `@register_refiner(name)`: `modules` maps names in the block to its
`LowRankLinear`s (their U, V, U2, V2 are changed in place), `inputs` are the compressed-path hidden
states X̂ entering the block and `targets` the dense block's outputs on the dense inputs X (lists of
[batch, T, hidden], one per calibration batch, with their `calls`). It returns what it did, for the
report (at least the block's relative output error before and after).
"""
from . import blockfit  # noqa: F401  (register; order = `lrinfer methods` order)
from .base import REFINERS, register_refiner, get_refiner, summarize  # noqa: F401
