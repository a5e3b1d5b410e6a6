"""Stage 2, rank allocation: spread the selected linears' budget over them as one rank per linear.

An allocator is `allocate(linears, ratio, multiple, spectra, *, option=default) -> {name: rank}`,
one file per method, registered with `@register_allocator(name)`. `spectra` maps each linear's name
to the singular values [min(in, out)] of W·L (L Lᵀ = XᵀX, dense-model inputs) when the allocator
is registered with `needs_spectra=True`, else it is None; with `needs_sensitivity=True` it also gets
`sensitivity`, each linear's output-gradient energy (`calibration.output_gradient_energy`).
"""
from . import uniform, drank, loss  # noqa: F401  (register; order = `lrinfer methods` order)
from .base import Allocator, ALLOCATORS, register_allocator, get_allocator, achieved_ratio  # noqa: F401
