"""D-Rank (arXiv 2509.25622): rank allocation by effective rank, per matrix type, with Q/K → V rebalancing.

For each selected linear f (W [out, in], w_f = in + out parameters per unit of rank):

1. Information density: R_eff(f) = exp(H(p)), p_i = σ_i²/Σσ², σ = singular values of W·L
   (L Lᵀ = XᵀX, dense-model inputs: the `spectra` the pipeline passes in).
2. Within one matrix type t (all q_proj, all down_proj, ...) the budget is the uniform one,
   P_t = (1 − R)·Σ_{f∈t} in·out, and the ranks solve min Σ R_eff/k s.t. Σ w k = P_t (Lagrange):
       k_f = sqrt(R_eff,f / w_f) · P_t / Σ_j sqrt(R_eff,j · w_j),
   clamped to [1, k_max] with the clamped ones fixed and the rest re-solved (water-filling).
3. Attention rebalancing: every q_proj and k_proj pays `tax`·k_f ranks, pooled in *parameters*
   (k·w), shared equally (in parameters) by the v_proj matrices, capped at k_max; what V cannot
   absorb is refunded to Q/K in proportion to what each paid.
4. Rounding: ranks are rounded down to `multiple`, then raised one `multiple` at a time (largest
   rounding loss first) while the total stays within Σ_t P_t; if the floors alone exceed it, ranks
   are lowered (the ±1 budget repair of the paper's code when multiple = 1).

Choices where the paper (arXiv 2509.25622) and its official code are ambiguous:
* Group size 1 (one matrix per group, no Basis-Sharing cross-layer bases), as D-Rank does for
  GQA models (LLaMA-3); our factor format has no shared bases.
* k_max = ⌊in·out/(in+out)⌋, the break-even rank, not min(in, out): beyond it a factor pair holds
  more parameters than the dense matrix. It matters for narrow GQA k/v projections.
* tax: the official code uses 0.2 in rank units for MHA (LLaMA-1/2) and 0.1 in parameter units
  for GQA (LLaMA-3, commented out). `tax=None` picks 0.2 when v_proj is as wide as q_proj and 0.1
  otherwise (GQA: V is narrow, so a Q/K tax in parameters buys many V ranks and saturates V fast).
  Parameter units make both cases correct; for MHA they coincide with rank units.
* The official code's fallback is the default (`fallback=True`): o/gate/up/down keep their dynamic
  ranks only when these lower the type's whitened tail energy, else uniform ranks; q/k/v are always
  dynamic. `fallback=False` keeps the pure dynamic allocation for every type.
"""
from __future__ import annotations

import math

import torch

from lrinfer.errors import LrinferError
from .base import break_even, register_allocator


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values s [n] (D-Rank's information density)."""
    p = s.double().pow(2)
    p = p / p.sum().clamp_min(1e-300)
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


Q_KINDS = ("q_proj", "k_proj")
V_KIND = "v_proj"


def _waterfill(weights: dict[str, float], w: dict[str, int], lo: dict[str, float], hi: dict[str, float],
               budget: float) -> dict[str, float]:
    """Continuous k_f ∝ weights[f] with Σ w_f k_f = budget and lo ≤ k ≤ hi (clamped ones fixed, rest re-solved).

    weights[f] = sqrt(R_eff/w) gives the D-Rank Lagrange solution."""
    free, fixed = set(weights), {}
    while free:
        rest = budget - sum(fixed[f] * w[f] for f in fixed)
        denom = sum(weights[f] * w[f] for f in free)
        k = {f: weights[f] * rest / denom if denom > 0 else lo[f] for f in free}
        out = {f for f in free if not lo[f] - 1e-9 <= k[f] <= hi[f] + 1e-9}
        if not out:
            fixed.update(k)
            break
        for f in out:
            fixed[f] = min(max(k[f], lo[f]), hi[f])
        free -= out
    return fixed


def lagrange_ranks(reff: dict[str, float], w: dict[str, int], kmax: dict[str, int], budget: float
                   ) -> dict[str, float]:
    """D-Rank's closed form within one matrix type: k ∝ sqrt(R_eff/w), Σ w k = budget, 1 ≤ k ≤ kmax."""
    weights = {f: math.sqrt(max(reff[f], 1e-12) / w[f]) for f in reff}
    return _waterfill(weights, w, {f: 1.0 for f in reff}, {f: float(kmax[f]) for f in reff}, budget)


def rebalance_attention(k: dict[str, float], kind: dict[str, str], w: dict[str, int], kmax: dict[str, int],
                        tax: float) -> dict[str, float]:
    """Move `tax` of every Q/K rank budget (in parameters) to the V matrices, equal parameters each."""
    payers = [f for f in k if kind[f] in Q_KINDS]
    takers = [f for f in k if kind[f] == V_KIND]
    if tax == 0 or not payers or not takers:
        return dict(k)
    k = dict(k)
    paid = {f: min(tax * k[f], k[f] - 1.0) * w[f] for f in payers}      # parameters; keep k ≥ 1
    pool = sum(paid.values())
    for f in payers:
        k[f] -= paid[f] / w[f]
    # V: equal parameter shares, capped; spill-over re-shared among the uncapped (water-filling).
    room = {f: (kmax[f] - k[f]) * w[f] for f in takers}
    give, left = {f: 0.0 for f in takers}, pool
    open_ = [f for f in takers if room[f] > 1e-9]
    while left > 1e-9 and open_:
        share = left / len(open_)
        for f in list(open_):
            g = min(share, room[f] - give[f])
            give[f] += g
            left -= g
            if room[f] - give[f] <= 1e-9:
                open_.remove(f)
    for f in takers:
        k[f] += give[f] / w[f]
    if left > 1e-9 and pool > 0:                                        # refund what V could not take
        for f in payers:
            k[f] += left * paid[f] / pool / w[f]
    return k


def round_to_budget(k: dict[str, float], w: dict[str, int], kmax: dict[str, int], multiple: int,
                    budget: float) -> dict[str, int]:
    """Integer ranks: multiples of `multiple` (or the cap when it is smaller), total Σ w k ≤ budget when possible."""
    def floor_m(x, f):
        cap = kmax[f] if kmax[f] < multiple else kmax[f] // multiple * multiple
        return max(min(int(x // multiple) * multiple, cap), min(multiple, kmax[f]), 1)

    r = {f: floor_m(k[f], f) for f in k}
    total = sum(r[f] * w[f] for f in r)
    # raise the most under-served first while the budget allows
    for f in sorted(r, key=lambda f: (r[f] - k[f]) / multiple):
        if r[f] + multiple <= kmax[f] and total + multiple * w[f] <= budget + 1e-6:
            r[f] += multiple
            total += multiple * w[f]
    # over budget (floors at `multiple` on tiny layers): lower the most over-served
    while total > budget + 1e-6:
        cands = [f for f in r if r[f] - multiple >= 1]
        if not cands:
            break
        f = max(cands, key=lambda f: (r[f] - k[f]) * w[f])
        r[f] -= multiple
        total -= multiple * w[f]
    return r


ATTENTION_QKV = ("q_proj", "k_proj", "v_proj")


def tail_energy(ranks: dict[str, float], spectra) -> float:
    """Σ over linears of the whitened energy a rank-⌊k⌋ truncation drops: Σ_{i>k} σ_i²."""
    return sum(float(spectra[n][int(k):].double().pow(2).sum()) for n, k in ranks.items())


@register_allocator("drank", needs_spectra=True,
                    summary="D-Rank: effective-rank Lagrange allocation per matrix type, Q/K→V rebalancing")
def allocate(linears, ratio: float, multiple: int, spectra, *, tax: float | None = None,
             fallback: bool = True) -> dict[str, int]:
    """linears: selected LinearInfo; ratio: fraction to remove within them; spectra[name]: σ(W·L).

    Returns {name: rank}; Σ rank·(in+out) ≤ (1 − ratio)·Σ in·out (see the module doc for the steps).
    tax=None: 0.2 for multi-head attention, 0.1 when v_proj is narrower than q_proj (GQA).
    fallback=True follows the official code: o/gate/up/down keep the dynamic ranks only when they
    lower the type's whitened tail energy Σ_{i>k} σ_i² below uniform ranks (gate_proj never);
    q/k/v always keep them. fallback=False: dynamic for every type.
    """
    if spectra is None:
        raise LrinferError("drank: needs the whitened singular values of every linear (spectra)")
    if tax is not None and not 0.0 <= tax < 1.0:
        raise LrinferError(f"drank: tax (fraction of the Q/K rank budget moved to V) must be in [0, 1); got {tax}")
    if not 0.0 < ratio < 1.0:
        raise LrinferError(f"drank: ratio must be in (0, 1); got {ratio}")
    missing = [f.name for f in linears if f.name not in spectra]
    if missing:
        raise LrinferError(f"drank: no spectrum for {missing[:3]}{'…' if len(missing) > 3 else ''}")
    w = {f.name: f.in_features + f.out_features for f in linears}
    kmax = {f.name: break_even(f.in_features, f.out_features) for f in linears}
    kind = {f.name: f.kind for f in linears}
    reff = {f.name: effective_rank(spectra[f.name]) for f in linears}

    k: dict[str, float] = {}
    by_kind: dict[str, list] = {}
    for f in linears:
        by_kind.setdefault(f.kind, []).append(f)
    for fs in by_kind.values():
        names = [f.name for f in fs]
        budget = (1.0 - ratio) * sum(f.dense_params for f in fs)
        dynamic = lagrange_ranks({n: reff[n] for n in names}, w, kmax, budget)
        if fallback and fs[0].kind not in ATTENTION_QKV:
            uniform = {f.name: (1.0 - ratio) * f.dense_params / w[f.name] for f in fs}
            if fs[0].kind == "gate_proj" or tail_energy(dynamic, spectra) >= tail_energy(uniform, spectra):
                dynamic = uniform
        k.update(dynamic)

    if tax is None:
        q_out = [f.out_features for f in linears if f.kind == "q_proj"]
        v_out = [f.out_features for f in linears if f.kind == V_KIND]
        tax = 0.1 if q_out and v_out and max(v_out) < max(q_out) else 0.2
    k = rebalance_attention(k, kind, w, kmax, tax)
    budget = (1.0 - ratio) * sum(f.dense_params for f in linears)
    return round_to_budget(k, w, kmax, multiple, budget)
