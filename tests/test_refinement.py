"""Stage 4, refinement: blockfit lowers each block's output error and composes with every stage."""
import pytest
import torch

import lrinfer
from _tiny import tiny_llama
from lrinfer.recipe import Recipe


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_blockfit_lowers_every_block_error_and_the_final_error():
    ids = _ids()
    runs = {}
    for refinement in ("none", "blockfit"):
        model = tiny_llama(layers=3)
        cfg = lrinfer.CompressConfig(method="svdllm", ratio=0.4, rank_multiple=1, batch_size=4,
                                     refinement=refinement, refinement_options={"steps": 12, "lr": 3e-3}
                                     if refinement == "blockfit" else {})
        runs[refinement] = (model, lrinfer.compress(model, cfg, ids, progress=False))
    res = runs["blockfit"][1]
    assert sorted(res.refinement) == [0, 1, 2]
    for r in res.refinement.values():
        assert r["error_after"] < r["error_before"] and r["steps"] == 12
    assert res.hidden_error[-1] < runs["none"][1].hidden_error[-1]
    # the returned factors are the model's refined factors (what a checkpoint and a resume hold)
    model = runs["blockfit"][0]
    for name, pair in res.factors.items():
        torch.testing.assert_close(model.get_submodule(name).dense_weight(), pair.dense())
    assert all(p.grad is None for p in model.parameters())


def test_blockfit_is_deterministic_and_keeps_dtype():
    ids = _ids()
    outs = []
    for _ in range(2):
        model = tiny_llama(layers=2).to(torch.bfloat16)
        cfg = lrinfer.CompressConfig(method="svd", ratio=0.3, batch_size=4, refinement="blockfit",
                                     refinement_options={"steps": 4})
        res = lrinfer.compress(model, cfg, _ids(), progress=False)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        outs.append(res.factors)
    for name in outs[0]:
        assert torch.equal(outs[0][name].U, outs[1][name].U) and torch.equal(outs[0][name].V, outs[1][name].V)


def test_blockfit_refines_the_residual_pair_on_selected_blocks():
    model = tiny_llama(layers=3)
    cfg = Recipe.parse("ressvd:beta=0.2@last:k=2~blockfit:steps=6,lr=0.003").config(
        lrinfer.CompressConfig(ratio=0.2, rank_multiple=1, batch_size=4))
    res = lrinfer.compress(model, cfg, _ids(), progress=False)
    assert sorted(res.refinement) == [1, 2]                  # only the selected blocks
    assert all(p.rank2 > 0 for p in res.factors.values())
    assert all(r["error_after"] < r["error_before"] for r in res.refinement.values())


def test_refinement_in_recipes_and_errors():
    r = Recipe.parse("saes@last:cap=0.3~blockfit:steps=8%64")
    assert (r.refinement, r.refinement_options, r.samples) == ("blockfit", {"steps": 8}, 64)
    assert r.label == "saes / last(cap=0.3) / uniform / blockfit(steps=8) / 64 samples"
    assert Recipe.parse("svdllm").refinement == "none"
    for bad, says in [("svdllm~nosuch", "unknown refinement 'nosuch'"), ("svdllm~blockfit:steps=2.5", "steps=2.5"),
                      ("svdllm~blockfit:lrate=1", "no option")]:
        with pytest.raises(lrinfer.LrinferError, match=says):
            Recipe.parse(bad).config(lrinfer.CompressConfig(ratio=0.2))
