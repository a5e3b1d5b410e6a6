"""KFAC-SVD's output-side damping on SmolLM2, measured on text no run reports: statistics once (the dense
model's input Grams by forward hooks, output-gradient Grams by one backward pass, 32 × 512 calibration
tokens as `lrinfer compress` draws them), then each `grad_damp` solved for every linear (uniform ranks,
all layers) and scored by perplexity on WikiText-2 test windows [64, 64 + W) — disjoint from the 64
windows the results table reports and from the calibration text (the validation split).

    PYTHONPATH=. python bench/kfac_damping.py --ratios 0.2 0.4 --damps 0 0.01 0.1 1 inf --windows 16
(`inf`: SVD-LLM, the limit of the ridge.) Prints one JSON line per (ratio, damp).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import lrinfer
from lrinfer.offline.allocation.base import get_allocator
from lrinfer.offline.calibration import output_gradient_grams
from lrinfer.data import eval_windows, resolve_data_dir
from lrinfer.offline.selection.base import get_selection
from lrinfer.offline.solvers.kfac import two_sided_truncation
from lrinfer.offline.solvers.svdllm import whitened_truncation


def input_grams(model, names, ids, batch_size):
    """Σ XᵀX [in, in] float64 of each named linear's inputs in the dense model."""
    grams = {n: None for n in names}

    def hook(n):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            g = x.t() @ x
            grams[n] = g if grams[n] is None else grams[n].add_(g)
        return fn
    hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in ids.split(batch_size):
            model(input_ids=b, use_cache=False)
    for h in hs:
        h.remove()
    return grams


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    ap.add_argument("--damps", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0, float("inf")])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args(argv)
    data = resolve_data_dir()
    model, tok, _ = lrinfer.load_model("smollm2", torch.float32)
    ids, _ = lrinfer.calibration_batch(tok, "wikitext2", args.samples, 512, seed=0, data_dir=data)
    allw, _ = eval_windows(tok, "wikitext2", 512, 64 + args.windows, data)
    held = allw[64:]
    linears = lrinfer.compressible_linears(model)
    names = [f.name for f in linears]
    t0 = time.perf_counter()
    S = input_grams(model, names, ids, 8)
    G = output_gradient_grams(model, names, ids, 8)
    print(json.dumps({"statistics_s": round(time.perf_counter() - t0, 1)}), flush=True)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    print(json.dumps({"dense_ppl": round(lrinfer.perplexity(model, held, progress=False)["ppl"], 3)}), flush=True)
    for ratio in args.ratios:
        selected, inner = get_selection("all")(linears, ratio)
        ranks = get_allocator("uniform")(selected, inner, 16, None)
        for damp in args.damps:
            t0 = time.perf_counter()
            for n in names:
                W = dense[n].double()
                if damp == float("inf"):
                    p = whitened_truncation(W, S[n], ranks[n])
                    U, V = p.U, p.V
                else:
                    U, V = two_sided_truncation(W, S[n], G[n], ranks[n], grad_damp=damp, name=n)
                model.get_submodule(n).weight.data.copy_((U @ V.t()).float())
            solve_s = time.perf_counter() - t0
            ppl = lrinfer.perplexity(model, held, progress=False)["ppl"]
            print(json.dumps({"ratio": ratio, "grad_damp": damp, "heldout_ppl": round(ppl, 3),
                              "solve_s": round(solve_s, 1)}), flush=True)
    for n in names:
        model.get_submodule(n).weight.data.copy_(dense[n])


if __name__ == "__main__":
    main()
