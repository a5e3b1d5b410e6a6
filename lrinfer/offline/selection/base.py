"""The selection registry and what every selection method shares."""
from __future__ import annotations

from lrinfer.errors import LrinferError
from lrinfer.registry import Method, Registry
from lrinfer.runtime.architecture import LinearInfo


SELECTIONS = Registry("layer selection")

register_selection = SELECTIONS.register   # @register_selection(name, summary) on `select(linears, ratio, *, ...)`


def get_selection(name: str) -> Method:
    return SELECTIONS.lookup(name)


def ratio_within(selected: list[LinearInfo], all_linears: list[LinearInfo], ratio: float) -> float:
    """The ratio the selected linears must reach to remove `ratio` of all linears' parameters."""
    total = sum(f.dense_params for f in all_linears)
    part = sum(f.dense_params for f in selected)
    inner = ratio * total / part
    if inner >= 1.0:
        raise LrinferError(f"the selected layers hold {part / total:.0%} of the parameters, too few to remove "
                           f"{ratio:.0%} of all; select more layers or lower the ratio")
    return inner
