"""Stage 1, layer selection: which linears are compressed, and the ratio they must reach so that the
removed parameters equal `ratio` × all compressible parameters.

A selection is `select(linears, ratio, *, option=default) -> (selected linears, ratio within them)`,
one file per method, registered with `@register_selection(name)`.
"""
from . import all, last  # noqa: F401  (register; order = `lrinfer methods` order)
from .base import SELECTIONS, register_selection, get_selection, ratio_within  # noqa: F401
