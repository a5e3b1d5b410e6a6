"""Stage 3, solving: (W [out, in], LinearStats, rank) -> FactorPair, one file per method, registered
with `@register_solver(name, needs=...)`; `needs` names the calibration statistics it reads."""
from . import svd, svdllm, asvd, fwsvd, ressvd, saes, kfac  # noqa: F401
from .base import (STAT_FIELDS, BACKWARD_FIELDS, Solver, SOLVERS, register_solver, get_solver, truncated_svd,
                   split_sigma)  # noqa: F401
