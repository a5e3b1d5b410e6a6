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
"""
from __future__ import annotations

import heapq
import logging

import torch

from lrinfer.errors import LrinferError
from .base import register_allocator

log = logging.getLogger(__name__)


def break_even(in_features: int, out_features: int) -> int:
    """The largest rank whose factors hold no more parameters than the dense matrix."""
    return max(1, in_features * out_features // (in_features + out_features))


def greedy_ranks(gains: dict[str, torch.Tensor], cost: dict[str, int], start: dict[str, int], multiple: int,
                 budget: float) -> tuple[dict[str, int], float]:
    """Greedy chunk allocation: gains[l] [n_l] = the loss-model gain of each further chunk of `multiple`
    ranks of layer l above start[l] (non-increasing), each costing multiple·cost[l] parameters.

    Returns ({l: rank}, gap): gap bounds how far the modelled loss can be above the LP optimum."""
    ranks = dict(start)
    spent = sum(start[n] * cost[n] for n in start)
    if spent > budget + 1e-6:
        raise LrinferError(f"loss allocation: the minimum ranks alone hold {spent:.0f} parameters, more than "
                           f"the budget {budget:.0f}; lower min_rank or the ratio")
    heap = [(-float(g[0]) / (multiple * cost[n]), n, 0) for n, g in gains.items() if g.numel()]
    heapq.heapify(heap)
    gap = 0.0
    first_miss = None
    while heap:
        neg_ratio, n, j = heapq.heappop(heap)
        price = multiple * cost[n]
        if spent + price > budget + 1e-6:
            if first_miss is None:   # the LP would take a fraction of this chunk: the bound's one term
                first_miss = (-neg_ratio, spent)
            continue
        ranks[n] += multiple
        spent += price
        if j + 1 < gains[n].numel():
            heapq.heappush(heap, (-float(gains[n][j + 1]) / price, n, j + 1))
    if first_miss is not None:
        ratio_star, spent_before = first_miss
        gap = ratio_star * (budget - spent_before)
    return ranks, gap


@register_allocator("loss", needs_spectra=True, needs_sensitivity=True,
                    summary="ranks minimizing a second-order model of the LM loss under the budget (greedy, stated gap)")
def allocate_loss(linears, ratio: float, multiple: int, spectra, sensitivity, *, min_rank: int = 0
                  ) -> dict[str, int]:
    """linears: selected LinearInfo; spectra[name]: σ(W·L) descending; sensitivity[name]: a_l (module doc).

    min_rank: the rank every linear keeps at least (0: one `multiple`). Returns {name: rank} with
    Σ rank·(in + out) ≤ (1 − ratio)·Σ in·out."""
    if spectra is None or sensitivity is None:
        raise LrinferError("loss allocation needs the whitened spectra and the output-gradient energies")
    if not 0.0 < ratio < 1.0:
        raise LrinferError(f"loss allocation: ratio must be in (0, 1); got {ratio}")
    missing = [f.name for f in linears if f.name not in spectra or f.name not in sensitivity]
    if missing:
        raise LrinferError(f"loss allocation: no spectrum or sensitivity for {missing[:3]}")
    floor = min_rank or multiple
    cost = {f.name: f.in_features + f.out_features for f in linears}
    start, gains = {}, {}
    for f in linears:
        cap = break_even(f.in_features, f.out_features)
        cap = cap if cap < multiple else cap // multiple * multiple
        k0 = min(floor, cap)
        energy = spectra[f.name].double().pow(2) * float(sensitivity[f.name])
        n_chunks = max(0, (cap - k0) // multiple)
        tail = energy[k0:k0 + n_chunks * multiple]
        tail = torch.cat([tail, tail.new_zeros(n_chunks * multiple - tail.numel())])   # σ beyond min(in, out): 0
        start[f.name], gains[f.name] = k0, tail.view(n_chunks, multiple).sum(1) if n_chunks else tail[:0]
    budget = (1.0 - ratio) * sum(f.dense_params for f in linears)
    ranks, gap = greedy_ranks(gains, cost, start, multiple, budget)
    kept = sum(float(spectra[n].double().pow(2)[k:].sum()) * float(sensitivity[n]) for n, k in ranks.items())
    log.info("loss allocation: modelled loss increase %.4g (½ Σ a·E), within %.3g of the LP optimum (%.2f%%)",
             kept / 2, gap / 2, 100 * gap / max(kept, 1e-300))
    return ranks
