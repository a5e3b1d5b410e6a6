"""Stage 4, refinement: blockfit lowers each block's output error and composes with every stage."""
import pytest
import torch

import lrinfer
from ._tiny import tiny_llama
from lrinfer.offline.recipe import Recipe


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


def test_micro_batches_slice_the_block_call_consistently():
    """A piece of `batch` sequences (hidden states, per-sequence mask) gives the block's output on
    those sequences: the same rows as the whole batch's output."""
    from lrinfer.runtime.blocks import BlockCall, capture_inputs
    from lrinfer.offline.refinement.blockfit import _micro_batches
    model = tiny_llama(layers=1).double()
    blocks = model.model.layers
    streams = capture_inputs(model, blocks, _ids(n=4, t=16), batch_size=4, device=torch.device("cpu"))
    x, call = streams.dense[0], streams.calls[0][0]
    keep = torch.ones(4, 16, dtype=torch.bool)
    keep[1, :5] = keep[3, :2] = False                      # left padding on two sequences
    mask = torch.zeros(4, 1, 16, 16, dtype=torch.float64)
    mask.masked_fill_(~(keep[:, None, None, :] & torch.ones(16, 16, dtype=torch.bool).tril()), float("-inf"))
    mask[:, :, torch.arange(16), torch.arange(16)] = 0.0   # no fully masked row
    call = BlockCall(call.args, {**call.kwargs, "attention_mask": mask})
    with torch.no_grad():
        whole = blocks[0](x, *call.args, **call.kwargs)
        whole = whole[0] if isinstance(whole, tuple) else whole
        pieces = _micro_batches([x], [whole], [call], size=1)
        assert len(pieces) == 4
        for i, piece in enumerate(pieces):
            xs, ys, c = piece
            out = blocks[0](xs, *c.args, **c.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, whole[i:i + 1], rtol=1e-12, atol=1e-12)
            assert torch.equal(ys, whole[i:i + 1])
        assert len(_micro_batches([x], [whole], [call], size=0)) == 1
        assert len(_micro_batches([x], [whole], [call], size=3)) == 2   # 3 + 1


def test_blockfit_micro_batches_lower_the_error():
    model = tiny_llama(layers=2)
    cfg = Recipe.parse("svdllm~blockfit:steps=16,lr=0.003,batch=1").config(
        lrinfer.CompressConfig(ratio=0.4, rank_multiple=1, batch_size=4))
    res = lrinfer.compress(model, cfg, _ids(), progress=False)
    assert all(r["error_after"] < r["error_before"] for r in res.refinement.values())
    with pytest.raises(lrinfer.LrinferError, match="batch"):
        lrinfer.compress(tiny_llama(layers=1), Recipe.parse("svdllm~blockfit:batch=-1").config(
            lrinfer.CompressConfig(ratio=0.4)), _ids(), progress=False)


def test_blockfit_holdout_never_worsens_the_held_apart_sequences():
    """The early stop keeps the factors of the step with the lowest error on the held-apart sequences:
    never above the solved factors' error there; at a learning rate that wrecks the block, exactly
    the solved factors."""
    ids = _ids(n=8, seed=1)
    solved = lrinfer.compress(tiny_llama(layers=2), lrinfer.CompressConfig(method="svdllm", ratio=0.4, rank_multiple=1,
                                                                           batch_size=4), ids, progress=False)
    for lr, wrecked in [(1e-3, False), (5.0, True)]:
        model = tiny_llama(layers=2)
        cfg = lrinfer.CompressConfig(method="svdllm", ratio=0.4, rank_multiple=1, batch_size=4, refinement="blockfit",
                                     refinement_options={"steps": 16, "lr": lr, "holdout": 3, "check": 4})
        res = lrinfer.compress(model, cfg, ids, progress=False)
        for r in res.refinement.values():
            assert r["heldout_after"] <= r["heldout_before"] and r["best_step"] in (0, 4, 8, 12, 16)
        if wrecked:
            assert {r["best_step"] for r in res.refinement.values()} == {0}
            assert res.hidden_error[-1] == pytest.approx(solved.hidden_error[-1], rel=1e-5)
        else:
            assert any(r["best_step"] > 0 and r["heldout_after"] < r["heldout_before"]
                       for r in res.refinement.values())


def test_blockfit_holdout_errors():
    for opts, says in [({"holdout": 8}, "holdout=8 leaves no calibration sequence"), ({"check": 0}, "check >= 1")]:
        cfg = lrinfer.CompressConfig(method="svdllm", ratio=0.4, rank_multiple=1, batch_size=4, refinement="blockfit",
                                     refinement_options={"steps": 2, **opts})
        with pytest.raises(lrinfer.LrinferError, match=says):
            lrinfer.compress(tiny_llama(layers=1), cfg, _ids(n=8), progress=False)
