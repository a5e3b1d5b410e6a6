"""The `loss` allocator: the greedy against an exhaustive integer optimum, its stated gap, the budget,
sensitivity moving rank, the output-gradient energies against autograd, and a whole compression."""
import itertools

import pytest
import torch

import lrinfer
from lrinfer.errors import LrinferError
from lrinfer.offline.allocation.base import achieved_ratio, break_even, get_allocator
from lrinfer.offline.allocation.loss import envelope, greedy_steps
from lrinfer.offline.calibration import output_gradient_energy, output_gradient_grams
from lrinfer.runtime.architecture import LinearInfo
from ._tiny import tiny_llama

loss_alloc = get_allocator("loss")


def _instance(seed, layers=3, chunks=4):
    g = torch.Generator().manual_seed(seed)
    gains = {f"l{i}": torch.sort(torch.rand(chunks, generator=g, dtype=torch.float64), descending=True).values
             for i in range(layers)}
    cost = {n: int(torch.randint(2, 9, (1,), generator=g)) for n in gains}
    return gains, cost


@pytest.mark.parametrize("seed", range(12))
def test_greedy_within_its_gap_of_the_exhaustive_optimum(seed):
    gains, cost = _instance(seed)
    # each layer: its chunks, then a last step with its own (small) cost: the "stay dense" step
    steps = {n: [(float(x), float(cost[n])) for x in g] + [(float(g[-1]) * 0.7, 1.0)] for n, g in gains.items()}
    budget = float(torch.randint(5, 60, (1,), generator=torch.Generator().manual_seed(100 + seed)))
    taken, gap = greedy_steps(steps, budget)

    def value(t):
        return sum(sum(g for g, _ in steps[n][:t[n]]) for n in t)

    def spent(t):
        return sum(sum(c for _, c in steps[n][:t[n]]) for n in t)

    assert spent(taken) <= budget
    best = max(value(dict(zip(steps, c))) for c in itertools.product(*(range(len(s) + 1) for s in steps.values()))
               if spent(dict(zip(steps, c))) <= budget)
    assert value(taken) <= best + 1e-12
    assert best - value(taken) <= gap + 1e-12            # the stated gap holds


def test_envelope_merges_rising_ratios():
    assert envelope([(4.0, 1.0), (2.0, 1.0), (3.0, 0.5)]) == [(4.0, 1.0, 1), (5.0, 1.5, 2)]
    assert envelope([(1.0, 1.0), (1.0, 1.0)]) == [(2.0, 2.0, 2)]       # equal ratios merge too
    assert envelope([(3.0, 1.0), (1.0, 1.0)]) == [(3.0, 1.0, 1), (1.0, 1.0, 1)]


def _linears(n_blocks=3):
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "down_proj": (128, 64)}
    return [LinearInfo(f"model.layers.{b}.{k}", b, k, i, o) for b in range(n_blocks) for k, (i, o) in shapes.items()]


def _spectra(lins):
    return {f.name: torch.exp(-0.15 * torch.arange(min(f.in_features, f.out_features), dtype=torch.float64))
            for f in lins}


@pytest.mark.parametrize("ratio", [0.2, 0.4])
@pytest.mark.parametrize("multiple", [1, 8])
def test_budget_and_sensitivity(ratio, multiple):
    lins = _linears()
    spectra = _spectra(lins)
    flat = {f.name: 1.0 for f in lins}
    ranks = loss_alloc(lins, ratio, multiple, spectra, flat)
    assert achieved_ratio(lins, ranks) >= ratio - 1e-9
    assert all(k % multiple == 0 and k >= multiple for k in ranks.values())
    low = min((f for f in lins if f.name in ranks), key=lambda f: ranks[f.name] / break_even(f.in_features, f.out_features))
    loud = dict(flat, **{low.name: 100.0})               # errors in the least served linear cost 100× more
    louder = loss_alloc(lins, ratio, multiple, spectra, loud)
    assert louder.get(low.name, 10 ** 9) > ranks[low.name]          # more rank, or left dense
    assert achieved_ratio(lins, louder) >= ratio - 1e-9


def test_refuses_what_it_cannot_use():
    lins = _linears()
    with pytest.raises(LrinferError, match="spectra"):
        loss_alloc(lins, 0.2, 8, None, None)
    with pytest.raises(LrinferError, match="min_rank"):
        loss_alloc(lins, 0.9, 8, _spectra(lins), {f.name: 1.0 for f in lins}, min_rank=16)


def test_output_gradient_energy_is_the_grams_trace():
    model = tiny_llama(layers=2, seed=5)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    energy = output_gradient_energy(model, names, ids)
    grams = output_gradient_grams(model, names, ids)
    for n in names:
        want = float(grams[n].double().trace()) / (3 * 15 * model.get_submodule(n).out_features)
        assert energy[n] == pytest.approx(want, rel=1e-5)
        assert energy[n] > 0


def test_compress_with_loss_allocation(calib_ids):
    model = tiny_llama(layers=2, seed=0)
    config = lrinfer.CompressConfig(method="svdllm", ratio=0.3, allocation="loss", batch_size=4, rank_multiple=4)
    assert config.needs_backward
    res = lrinfer.compress(model, config, calib_ids, progress=False)
    ranks = {n: r[0] for n, r in res.ranks.items()}
    assert achieved_ratio(res.linears, ranks) >= 0.3 - 1e-9
    assert len(set(ranks.values())) > 1                   # not uniform: the model moved rank


def test_linears_at_break_even_stay_dense():
    """k_proj [64 -> 32]: break-even rank 21 (multiple 1) or 16 (multiple 8, 16·96 = 1536 < 2048); a
    linear that reaches it is left dense (absent from the ranks) when the budget has room."""
    lins = _linears()
    spectra = _spectra(lins)
    loud = {f.name: (1e6 if f.kind == "k_proj" else 1.0) for f in lins}
    for multiple in (1, 8):
        ranks = loss_alloc(lins, 0.2, multiple, spectra, loud)
        assert not any(f.name in ranks for f in lins if f.kind == "k_proj")
        assert achieved_ratio(lins, ranks) >= 0.2 - 1e-9


def test_energy_from_the_grams_is_the_backward_pass_energy(monkeypatch):
    """kfac + loss: the energies are read from the Grams' traces, so the whole-model backward runs once."""
    model = tiny_llama(layers=2, seed=5)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    direct = output_gradient_energy(model, names, ids)
    from_grams = output_gradient_energy(model, names, ids, grams=output_gradient_grams(model, names, ids))
    for n in names:
        assert from_grams[n] == pytest.approx(direct[n], rel=1e-5)
    import lrinfer.offline.calibration as cal
    passes = []
    real = cal._output_gradients
    monkeypatch.setattr(cal, "_output_gradients", lambda *a, **k: passes.append(k["gram"]) or real(*a, **k))
    config = lrinfer.CompressConfig(method="kfac", ratio=0.3, allocation="loss", batch_size=4, rank_multiple=4)
    lrinfer.compress(tiny_llama(layers=2, seed=0), config, ids, progress=False)
    assert passes == [True]
