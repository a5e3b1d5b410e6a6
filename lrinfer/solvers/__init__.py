"""Solvers: (W [out, in], LinearStats, rank) -> FactorPair. One file per method; they register by name."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LrinferError, check_options
from ..factors import FactorPair

# Statistics a solver can ask for (fields of `lrinfer.calibration.LinearStats`).
STAT_FIELDS = frozenset({"gram", "gram_hat", "cross", "abs_sum", "fisher"})


@dataclass(frozen=True)
class Solver:
    name: str
    solve: Callable[..., FactorPair]   # solve(W, stats, rank, **options) -> FactorPair
    needs: frozenset                   # subset of STAT_FIELDS
    summary: str
    selection: str = "all"             # the layer selection the method's paper uses by default

    @property
    def needs_compressed_stream(self) -> bool:
        """True when the solver reads inputs of the compressed-so-far model (X̂)."""
        return bool(self.needs & {"gram_hat", "cross"})

    def options(self) -> dict:
        """Keyword options of `solve` and their defaults."""
        params = list(inspect.signature(self.solve).parameters.values())[3:]
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}

    def __call__(self, W: torch.Tensor, stats, rank: int, **options) -> FactorPair:
        check_options(f"solver '{self.name}'", options, self.options())
        return self.solve(W, stats, rank, **options)


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, needs=(), summary: str = "", selection: str = "all"):
    """Decorator: register `solve(W, stats, rank, *, option=default, ...)` under `name`.

    `selection` names the layer selection used when the user does not choose one."""
    needs = frozenset(needs)
    if not needs <= STAT_FIELDS:
        raise ValueError(f"unknown statistics {sorted(needs - STAT_FIELDS)}; known: {sorted(STAT_FIELDS)}")

    def deco(fn):
        SOLVERS[name] = Solver(name, fn, needs, summary or (fn.__doc__ or "").strip().splitlines()[0], selection)
        return fn
    return deco


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise LrinferError(f"unknown method '{name}'; choose one of: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def truncated_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of A [m, n]: (U [m, r], s [r], Vh [r, n])."""
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank], s[:rank], Vh[:rank]


def split_sigma(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold singular values evenly: returns (U Σ^{1/2} [m, r], (Σ^{1/2} Vh)ᵀ [n, r])."""
    r = s.clamp_min(0).sqrt()
    return U * r, (Vh * r[:, None]).t()


# Import the solver modules so they register (order = CLI listing order).
from . import svd, svdllm  # noqa: E402,F401
for _optional in ("asvd", "fwsvd", "ressvd", "saes"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as e:  # not written yet
        if e.name != f"{__name__}.{_optional}":
            raise
