"""Ranks that minimize a second-order model of the LM loss under the parameter budget (LEMS-style).

The model. Truncating linear l (W [out, in]) to rank k changes its outputs on the calibration tokens
by δY_l with ‖δY_l‖² = E_l(k) = Σ_{i>k} σ_{l,i}², σ_l the singular values of W·L (L Lᵀ = XᵀX, the
whitened spectrum every allocator gets; exact for SVD-LLM's truncation, an upper bound for solvers
that do better). A second-order (Gauss-Newton / empirical-Fisher) expansion of the summed NLL around
the dense model, with the output errors spread evenly over the output units, gives

    ΔL ≈ ½ Σ_l a_l E_l(k_l),    a_l = mean over tokens and output units of (∂L/∂y_l)²,

the output-gradient energy of `calibration.output_gradient_energy` (one backward pass of the dense
model: like FWSVD and KFAC, this allocation cannot stream). The gradient at a linear's output carries
everything downstream of it, so layers whose errors the rest of the network amplifies get more rank.

The solve. minimize Σ_l a_l E_l(k_l) s.t. Σ_l w_l k_l ≤ B (w_l = in + out, B = (1 − ratio)·Σ in·out),
k_l ∈ {min_rank, min_rank + m, ...} ≤ the break-even rank. Each layer's gain per chunk of m ranks,
a_l Σ_{chunk} σ², never increases (σ is sorted), so taking chunks greedily by gain per parameter is
optimal for the LP relaxation up to the first chunk that does not fit; the integer solution then
loses at most ρ*·(B − C*) against it (ρ* that chunk's gain per parameter, C* the cost taken before
it): the stated optimality gap, logged with the modelled loss. No solver package is needed.

Dense where factoring buys nothing: past its break-even rank k* (the largest multiple of m whose pair
holds no more than in·out parameters) a linear's one further step is to stay dense, costing
in·out − k*·(in + out) < in + out more and removing the rest of its error: exact at about the same size,
one matmul instead of two. Such a linear is absent from the returned ranks. That step can be worth more
per parameter than the chunk before it; each layer's steps are merged where their gain per parameter
rises (its concave envelope), which keeps the greedy exact for the LP relaxation and the gap stated.
"""
from __future__ import annotations

import heapq
import logging

import torch

from lrinfer.errors import LrinferError
from .base import break_even, register_allocator

log = logging.getLogger(__name__)


def envelope(steps: list[tuple[float, float]]) -> list[tuple[float, float, int]]:
    """A layer's steps (gain, cost), taken in order, merged where the gain per cost rises, so the merged
    steps' ratios never increase: [(gain, cost, how many original steps)]."""
    out: list[list] = []
    for g, c in steps:
        out.append([g, c, 1])
        while len(out) > 1 and out[-1][0] * out[-2][1] >= out[-2][0] * out[-1][1]:   # ratio rose: merge
            g2, c2, n2 = out.pop()
            out[-1] = [out[-1][0] + g2, out[-1][1] + c2, out[-1][2] + n2]
    return [tuple(x) for x in out]


def greedy_steps(steps: dict[str, list[tuple[float, float]]], budget: float) -> tuple[dict[str, int], float]:
    """Take each layer's steps (gain, cost) in order, best gain per cost first across layers, within
    `budget`. Returns ({layer: steps taken}, gap): the modelled gain can fall short of the LP optimum by
    at most `gap` (the ratio of the first merged step that did not fit × the budget left before it)."""
    merged = {n: envelope(s) for n, s in steps.items()}
    taken = {n: 0 for n in steps}
    heap = [(-g / max(c, 1e-12), n, 0) for n, m in merged.items() for g, c, _ in m[:1]]
    heapq.heapify(heap)
    spent, first_miss = 0.0, None
    while heap:
        neg_ratio, n, j = heapq.heappop(heap)
        g, c, k = merged[n][j]
        if spent + c > budget + 1e-6:
            if first_miss is None:   # the LP would take a fraction of this step: the bound's one term
                first_miss = (-neg_ratio, spent)
            continue
        spent += c
        taken[n] += k
        if j + 1 < len(merged[n]):
            g, c, _ = merged[n][j + 1]
            heapq.heappush(heap, (-g / max(c, 1e-12), n, j + 1))
    gap = first_miss[0] * (budget - first_miss[1]) if first_miss else 0.0
    return taken, gap


@register_allocator("loss", needs_spectra=True, needs_sensitivity=True,
                    summary="ranks minimizing a second-order model of the LM loss under the budget (greedy, stated gap)")
def allocate_loss(linears, ratio: float, multiple: int, spectra, sensitivity, *, min_rank: int = 0
                  ) -> dict[str, int]:
    """linears: selected LinearInfo; spectra[name]: σ(W·L) descending; sensitivity[name]: a_l (module doc).

    min_rank: the rank every linear keeps at least (0: one `multiple`). Returns {name: rank} with
    Σ rank·(in + out) + Σ_dense in·out ≤ (1 − ratio)·Σ in·out; a linear left dense is absent."""
    if spectra is None or sensitivity is None:
        raise LrinferError("loss allocation needs the whitened spectra and the output-gradient energies")
    if not 0.0 < ratio < 1.0:
        raise LrinferError(f"loss allocation: ratio must be in (0, 1); got {ratio}")
    missing = [f.name for f in linears if f.name not in spectra or f.name not in sensitivity]
    if missing:
        raise LrinferError(f"loss allocation: no spectrum or sensitivity for {missing[:3]}")
    budget = (1.0 - ratio) * sum(f.dense_params for f in linears)
    start, steps, energy = {}, {}, {}
    for f in linears:
        w = f.in_features + f.out_features
        cap = break_even(f.in_features, f.out_features)
        cap = cap if cap < multiple else cap // multiple * multiple
        k0 = start[f.name] = min(min_rank or multiple, cap)
        e = energy[f.name] = spectra[f.name].double().pow(2) * float(sensitivity[f.name])
        bounds = list(range(k0, cap + 1, multiple))
        steps[f.name] = [(float(e[a:b].sum()), float(multiple * w)) for a, b in zip(bounds, bounds[1:])]
        steps[f.name].append((float(e[bounds[-1]:].sum()), float(f.dense_params - bounds[-1] * w)))  # dense
    floor = sum(start[f.name] * (f.in_features + f.out_features) for f in linears)
    if floor > budget + 1e-6:
        raise LrinferError(f"loss allocation: the minimum ranks alone hold {floor:.0f} parameters, more than the "
                           f"budget {budget:.0f}; lower min_rank or the ratio")
    taken, gap = greedy_steps(steps, budget - floor)
    ranks = {}
    for f in linears:
        n = taken[f.name]
        if n < len(steps[f.name]):            # the last step is "dense": absent from the ranks
            ranks[f.name] = start[f.name] + n * multiple
    left = sum(float(energy[n][k:].sum()) for n, k in ranks.items())
    log.info("loss allocation: modelled loss increase %.4g (½ Σ a·E), within %.3g of the LP optimum; "
             "%d of %d linears left dense", left / 2, gap / 2, len(linears) - len(ranks), len(linears))
    return ranks
