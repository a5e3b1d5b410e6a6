"""The solvers registry and what every solver method shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lrinfer.factors import FactorPair
from lrinfer.registry import Method, Registry


# Statistics a solver can ask for (fields of `lrinfer.offline.calibration.LinearStats`).
STAT_FIELDS = frozenset({"gram", "gram_hat", "cross", "abs_sum", "fisher", "grad_gram"})

# Statistics that need a backward pass through the whole model (no block-by-block streaming).
BACKWARD_FIELDS = frozenset({"fisher", "grad_gram"})


@dataclass(frozen=True)
class Solver(Method):
    """`solve(W, stats, rank, *, option=default) -> FactorPair` and what it needs."""
    needs: frozenset = frozenset()     # subset of STAT_FIELDS
    selection: str = "all"             # the layer selection the method's paper uses by default

    @property
    def needs_compressed_stream(self) -> bool:
        """True when the solver reads inputs of the compressed-so-far model (X̂)."""
        return bool(self.needs & {"gram_hat", "cross"})

    @property
    def needs_backward(self) -> bool:
        """True when the solver reads gradients of the whole model's loss (it cannot stream)."""
        return bool(self.needs & BACKWARD_FIELDS)


SOLVERS = Registry("method", Solver)


def register_solver(name: str, needs=(), summary: str = "", selection: str = "all"):
    """Decorator: register `solve(W, stats, rank, *, option=default, ...)` under `name`.

    `selection` names the layer selection used when the user does not choose one."""
    needs = frozenset(needs)
    if not needs <= STAT_FIELDS:
        raise ValueError(f"unknown statistics {sorted(needs - STAT_FIELDS)}; known: {sorted(STAT_FIELDS)}")

    return SOLVERS.register(name, summary, needs=needs, selection=selection)


def get_solver(name: str) -> Solver:
    return SOLVERS.lookup(name)


def truncated_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of A [m, n]: (U [m, r], s [r], Vh [r, n])."""
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank], s[:rank], Vh[:rank]


def split_sigma(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold singular values evenly: returns (U Σ^{1/2} [m, r], (Σ^{1/2} Vh)ᵀ [n, r])."""
    r = s.clamp_min(0).sqrt()
    return U * r, (Vh * r[:, None]).t()
