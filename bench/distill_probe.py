"""Probe: does end-to-end distillation after compression help on top of blockfit? (It did not.)

    python bench/distill_probe.py --factors out/.refine_sweep_0.2_n32/<trial>.safetensors --steps 32 --lr 1e-4

Loads SmolLM2-135M, patches it with a search trial's saved factors, then trains every factor pair
with Adam on the KL divergence from the dense model's next-token distribution (its top-k log-probs
per token, computed once) over the search's 32 × 512 calibration windows, `--batch` sequences a step,
cosine learning rate. Prints held-apart perplexity before and after (the search's criterion) and
test perplexity after. Not a stage of lrinfer: measured here, it made both worse (docs/results.md,
"Refinement and the cheap search").
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from safetensors.torch import load_file

import lrinfer
from lrinfer.offline.calibration_data import calibration_split
from lrinfer.factors import unflatten_factors
from lrinfer.offline.recipe import apply_result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factors", required=True, help="a trial's .safetensors from bench/recipe_search.py")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = lrinfer.resolve_data_dir()
    dense, tok, _ = lrinfer.load_model(None)
    dense.eval()
    calib, held, _ = calibration_split(tok, "wikitext2", 32, 512, 8, 0, data_dir)
    with torch.no_grad():   # the teacher: top-k log-probs of every calibration token
        teacher = [dense(input_ids=ids).logits.float().log_softmax(-1).topk(args.topk, dim=-1)
                   for ids in calib.split(args.batch)]
    model = copy.deepcopy(dense)
    apply_result(model, lrinfer.CompressionResult(unflatten_factors(load_file(args.factors)), {}, [], [], 0.0))
    print(f"held-out PPL before: {lrinfer.perplexity(model, held, progress=False)['ppl']:.3f}", flush=True)
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("U", "V", "U2", "V2")]
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.Adam(params, lr=args.lr)
    order = torch.randperm(len(teacher) * math.ceil(args.steps / len(teacher)),
                           generator=torch.Generator().manual_seed(0)) % len(teacher)
    t0 = time.perf_counter()
    for step, b in enumerate(order[:args.steps].tolist()):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        logq = model(input_ids=calib[b * args.batch:(b + 1) * args.batch]).logits.float().log_softmax(-1)
        logp, idx = teacher[b]
        loss = (logp.exp() * (logp - logq.gather(-1, idx))).sum(-1).mean()   # KL on the teacher's top k
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 8 == 0:
            print(f"step {step}: KL {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for p in params:
        p.requires_grad_(False)
    windows, _ = lrinfer.eval_windows(tok, "wikitext2", 512, args.windows, data_dir)
    print(f"held-out PPL after: {lrinfer.perplexity(model, held, progress=False)['ppl']:.3f}; "
          f"test PPL after: {lrinfer.perplexity(model, windows, progress=False)['ppl']:.3f}; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
