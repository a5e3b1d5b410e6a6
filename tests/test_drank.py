"""D-Rank allocator: budget, effective-rank ordering, GQA rebalancing, rounding."""
import pytest
import torch

from lrinfer.offline.allocation.base import achieved_ratio, get_allocator
from lrinfer.offline.allocation.drank import effective_rank, lagrange_ranks, rebalance_attention, tail_energy
from lrinfer.errors import LrinferError
from lrinfer.runtime.architecture import LinearInfo

drank = get_allocator("drank")
SHAPES_GQA = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}   # kind: (in, out)


def _linears(n_blocks=4, shapes=SHAPES_GQA):
    return [LinearInfo(f"model.layers.{b}.{k}", b, k, i, o) for b in range(n_blocks) for k, (i, o) in shapes.items()]


def _spectra(linears, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for f in linears:
        m = min(f.in_features, f.out_features)
        decay = 0.02 + 0.3 * torch.rand(1, generator=g).item()             # a different R_eff per matrix
        out[f.name] = torch.exp(-decay * torch.arange(m, dtype=torch.float64)) * (1 + 0.1 * torch.rand(m, generator=g))
    return out


def _params(linears, ranks):
    return sum(ranks[f.name] * (f.in_features + f.out_features) for f in linears)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("multiple", [1, 8])
def test_budget_respected(ratio, multiple):
    lins = _linears()
    ranks = drank(lins, ratio, multiple, _spectra(lins))
    budget = (1 - ratio) * sum(f.dense_params for f in lins)
    total = _params(lins, ranks)
    assert total <= budget
    assert total >= budget - sum(multiple * (f.in_features + f.out_features) for f in lins)   # one multiple per layer
    assert achieved_ratio(lins, ranks) >= ratio
    for f in lins:
        kmax = f.in_features * f.out_features // (f.in_features + f.out_features)
        assert 1 <= ranks[f.name] <= min(kmax, f.in_features, f.out_features)
        if multiple > 1:
            assert ranks[f.name] % multiple == 0 or ranks[f.name] == kmax


def test_higher_effective_rank_gets_more_rank():
    lins = _linears(6)
    spectra = _spectra(lins, seed=1)
    ranks = drank(lins, 0.4, 1, spectra, tax=0.0, fallback=False)
    for kind in ("o_proj", "gate_proj", "down_proj", "q_proj"):
        fs = sorted((f for f in lins if f.kind == kind), key=lambda f: effective_rank(spectra[f.name]))
        rs = [ranks[f.name] for f in fs]
        assert rs == sorted(rs) and rs[-1] > rs[0]


def test_official_fallback_to_uniform():
    """fallback=True: gate_proj always uniform; o/up/down uniform unless dynamic lowers the tail
    energy; q/k/v keep dynamic ranks."""
    lins = _linears(6)
    spectra = _spectra(lins, seed=1)
    dyn = drank(lins, 0.4, 1, spectra, tax=0.0, fallback=False)
    ranks = drank(lins, 0.4, 1, spectra, tax=0.0)
    gates = [ranks[f.name] for f in lins if f.kind == "gate_proj"]
    assert max(gates) - min(gates) <= 1                       # uniform (up to the integer repair)
    assert [ranks[f.name] for f in lins if f.kind == "q_proj"] == [dyn[f.name] for f in lins if f.kind == "q_proj"]
    for kind in ("o_proj", "up_proj", "down_proj"):
        fs = [f for f in lins if f.kind == kind]
        spread = max(ranks[f.name] for f in fs) - min(ranks[f.name] for f in fs)
        dyn_tail = tail_energy({f.name: dyn[f.name] for f in fs}, spectra)
        uni_tail = tail_energy({f.name: 0.6 * f.dense_params / (f.in_features + f.out_features) for f in fs},
                               spectra)
        if dyn_tail >= uni_tail:
            assert spread <= 1, kind                          # fell back to uniform
        else:
            assert sum(abs(ranks[f.name] - dyn[f.name]) for f in fs) <= len(fs), kind


def test_lagrange_closed_form():
    # k ∝ sqrt(R_eff / w) and Σ w k = budget when nothing is clamped
    reff, w = {"a": 4.0, "b": 16.0, "c": 9.0}, {"a": 100, "b": 100, "c": 200}
    k = lagrange_ranks(reff, w, {"a": 50, "b": 50, "c": 50}, 3000.0)
    assert sum(k[n] * w[n] for n in k) == pytest.approx(3000.0)
    assert k["b"] / k["a"] == pytest.approx(2.0)
    assert k["c"] / k["a"] == pytest.approx((9 / 200) ** 0.5 / (4 / 100) ** 0.5)
    # a clamped one is fixed at its cap and the rest absorb the budget
    k = lagrange_ranks(reff, w, {"a": 50, "b": 10, "c": 50}, 3000.0)
    assert k["b"] == pytest.approx(10) and sum(k[n] * w[n] for n in k) == pytest.approx(3000.0)


def test_gqa_rebalancing_in_parameter_units():
    lins = _linears()
    spectra = _spectra(lins)
    base = drank(lins, 0.3, 1, spectra, tax=0.0)
    moved = drank(lins, 0.3, 1, spectra, tax=0.2)
    for f in lins:
        if f.kind in ("q_proj", "k_proj"):
            assert moved[f.name] <= base[f.name]
        if f.kind == "v_proj":
            assert moved[f.name] >= base[f.name]
            assert moved[f.name] <= 64 * 32 // 96                 # break-even cap of the narrow V
    assert sum(moved[f.name] for f in lins if f.kind == "v_proj") > sum(base[f.name] for f in lins if f.kind == "v_proj")
    # parameters are conserved by the move itself (continuous), V narrower than Q
    kind = {f.name: f.kind for f in lins}
    w = {f.name: f.in_features + f.out_features for f in lins}
    kmax = {f.name: 1000 for f in lins}
    k = {f.name: 20.0 for f in lins}
    k2 = rebalance_attention(k, kind, w, kmax, 0.2)
    assert sum(k2[n] * w[n] for n in k) == pytest.approx(sum(k[n] * w[n] for n in k))
    q, v = lins[0].name, lins[2].name
    assert k2[q] == pytest.approx(16.0)
    # each V gets the Q/K tax of one layer in parameters: (4·128 + 4·96)/96 ranks
    assert k2[v] == pytest.approx(20 + (4 * 128 + 4 * 96) / 96)
    # V capped: the spill-over is refunded to Q/K
    kmax = {n: (21 if kind[n] == "v_proj" else 1000) for n in k}
    k3 = rebalance_attention(k, kind, w, kmax, 0.2)
    assert k3[v] == pytest.approx(21) and sum(k3[n] * w[n] for n in k) == pytest.approx(sum(k[n] * w[n] for n in k))


def test_default_tax_gqa_vs_mha():
    mha = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64)}
    lins = _linears(3, mha)
    sp = _spectra(lins)
    assert drank(lins, 0.3, 1, sp) == drank(lins, 0.3, 1, sp, tax=0.2)
    lins = _linears(3)
    sp = _spectra(lins)
    assert drank(lins, 0.3, 1, sp) == drank(lins, 0.3, 1, sp, tax=0.1)


def test_errors():
    lins = _linears(1)
    with pytest.raises(LrinferError, match="spectra"):
        drank(lins, 0.3, 1, None)
    with pytest.raises(LrinferError, match="tax"):
        drank(lins, 0.3, 1, _spectra(lins), tax=1.5)
    sp = _spectra(lins)
    sp.pop(lins[0].name)
    with pytest.raises(LrinferError, match="no spectrum"):
        drank(lins, 0.3, 1, sp)
