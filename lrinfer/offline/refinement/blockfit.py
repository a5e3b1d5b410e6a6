"""Block-level local refinement (as AA-SVD, arXiv 2604.02119, adds after its solve).

After a block's linears are factorized, a few Adam steps on the block's factor pairs minimise

    Σ_b ‖f̂(X̂_b) − f(X_b)‖²_F / Σ_b ‖f(X_b)‖²_F

where f is the dense block on the dense stream X (the targets the pipeline already has), f̂ the
compressed block on the compressed-path stream X̂: the block learns to undo both its own truncation
error and the drift it inherits from the blocks before it. Each step uses `batch` sequences (a
slice of one calibration batch; 0: the whole batch), in a fixed order drawn from `seed` (so a
resumed run repeats it bit for bit); the learning rate decays on a cosine from `lr` to zero.

What moves: U, V (and U2, V2) of every compressed linear of the block. Norms, biases and the
layers left dense stay fixed: a block's state is then exactly its factor pairs, which is what the
resume files and checkpoints hold. Training runs in float32 whatever the model's dtype, and the
factors are cast back afterwards.

Held-apart early stop (`holdout`): the last `holdout` calibration sequences of the block are not
trained on; every `check` steps the block's error on them is measured, and the factors end at the
step where it was lowest — the solved factors themselves (step 0) when no step helped, so the
refinement never makes the held-apart sequences worse. It costs those sequences' forwards at each
check and leaves fewer sequences to fit.

Defaults, measured on SmolLM2-135M at a 20% cut (SAES on the last layers, 32 × 512 calibration
tokens; held-out PPL 56.5 unrefined; docs/results.md, "Refinement"): 64 steps of 2 sequences at
lr 1e-3 → 52.9; 128 steps of 1 sequence → 52.7 at 1.4× the time; lr 3e-3 → 58.0 (the stream
drifts); the first default (16 steps of 8 sequences, lr 1e-4) did little. A block costs about
64 × 2 / 32 = 4 passes over the calibration set, forward and backward.
"""
from __future__ import annotations

import math
import time

import torch

from lrinfer.errors import LrinferError
from lrinfer.runtime.blocks import BlockCall, first_tensor
from .base import register_refiner


def _relative_error(block, inputs, targets, calls) -> float:
    num = den = 0.0
    device = next(block.parameters()).device   # streams may live on the host (--streams host)
    with torch.no_grad():
        for x, y, c in zip(inputs, targets, calls):
            x, y = x.to(device), y.to(device)
            out = first_tensor(block(x, *c.args, **c.kwargs))
            num += float((out.double() - y.double()).pow(2).sum())
            den += float(y.double().pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def _micro_batches(inputs, targets, calls, size: int) -> list[tuple]:
    """(x, y, call) per training piece: whole calibration batches (size 0), or slices (views) of `size`
    sequences (`_slice`)."""
    pieces = []
    for x, y, c in zip(inputs, targets, calls):
        n = x.shape[0]
        if size == 0 or size >= n:
            pieces.append((x, y, c))
            continue
        pieces += [_slice(x, y, c, slice(lo, lo + size)) for lo in range(0, n, size)]
    return pieces


def _slice(x, y, c, sl: slice) -> tuple:
    """Sequences `sl` of one calibration batch: the hidden states and every call tensor whose first
    dimension is the batch's (masks, per-sequence positions); tensors shared by the batch (leading 1)
    pass whole."""
    n = x.shape[0]

    def cut(v):
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            return v[sl]
        if isinstance(v, (tuple, list)):
            return type(v)(cut(u) for u in v)
        return v
    return x[sl], y[sl], BlockCall(cut(c.args), {k: cut(v) for k, v in c.kwargs.items()})


@register_refiner("blockfit", summary="Adam on the block's factor pairs: compressed block on compressed-path "
                                      "inputs → dense block outputs (AA-SVD-style local refinement)")
def refine_block(block, modules, inputs, targets, calls, *, steps: int = 64, lr: float = 1e-3,
                 batch: int = 2, seed: int = 0, holdout: int = 0, check: int = 8) -> dict:
    """Refine `modules`' factors in place; returns {"error_before", "error_after", "steps", "seconds"}
    (with `holdout`, also "heldout_before", "heldout_after" and "best_step").

    block: a decoder block holding `modules` (name -> LowRankLinear); inputs/targets: lists of
    [batch, T, hidden] (compressed-path inputs X̂_b, dense outputs f(X_b)); calls: the block's other
    arguments per batch; batch: sequences per step (0: a whole calibration batch); holdout: sequences
    held apart for the early stop (0: none), checked every `check` steps."""
    if steps < 0 or not lr > 0 or batch < 0 or holdout < 0 or check < 1:
        raise LrinferError(f"blockfit: steps, batch and holdout must be >= 0, check >= 1 and lr > 0; got "
                           f"steps={steps}, lr={lr}, batch={batch}, holdout={holdout}, check={check}")
    n_seq = sum(x.shape[0] for x in inputs)
    if holdout >= n_seq:
        raise LrinferError(f"blockfit: holdout={holdout} leaves no calibration sequence to fit ({n_seq} in all); "
                           f"use fewer than {n_seq}")
    t0 = time.perf_counter()
    before = _relative_error(block, inputs, targets, calls)
    if steps == 0 or not modules:
        return {"error_before": before, "error_after": before, "steps": 0, "seconds": 0.0}
    params = [p for m in modules.values() for p in (m.U, m.V, m.U2, m.V2) if p is not None]
    dtype = params[0].dtype
    frozen = {id(p): p.requires_grad for p in block.parameters()}
    block.float()
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    scale = sum(float(y.float().pow(2).sum()) for y in targets) / sum(y.numel() for y in targets)
    pieces = _micro_batches(*_sequences(inputs, targets, calls, 0, n_seq - holdout), batch)
    if holdout:
        held = _sequences(inputs, targets, calls, n_seq - holdout, n_seq)
        best = {"error": _relative_error(block, *held), "step": 0,
                "state": [p.detach().clone() for p in params]}
        held_before = best["error"]
    order = torch.randperm(len(pieces) * math.ceil(steps / len(pieces)),
                           generator=torch.Generator().manual_seed(seed)) % len(pieces)
    try:
        with torch.enable_grad():
            for step, k in enumerate(order[:steps].tolist()):
                if holdout and step and step % check == 0:
                    _keep_best(block, held, params, best, step)
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                x, y, c = pieces[k]
                out = first_tensor(block(x.to(params[0].device, torch.float32), *c.args, **c.kwargs))
                loss = (out - y.to(params[0].device, torch.float32)).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if holdout:
            _keep_best(block, held, params, best, steps)
            with torch.no_grad():
                for p, q in zip(params, best["state"]):
                    p.copy_(q)
    finally:
        for p in block.parameters():
            p.requires_grad_(frozen.get(id(p), False))
        for p in params:
            p.grad = None
        block.to(dtype)
    after = _relative_error(block, inputs, targets, calls)
    out = {"error_before": before, "error_after": after, "steps": steps, "seconds": round(time.perf_counter() - t0, 3)}
    if holdout:
        out.update(heldout_before=held_before, heldout_after=best["error"], best_step=best["step"])
    return out


def _keep_best(block, held, params, best: dict, step: int) -> None:
    """Measure the held-apart error now; remember the factors if it is the lowest so far."""
    err = _relative_error(block, *held)
    if err < best["error"]:
        best.update(error=err, step=step, state=[p.detach().clone() for p in params])


def _sequences(inputs, targets, calls, lo: int, hi: int) -> tuple[list, list, list]:
    """Sequences lo..hi-1 of the calibration batches (counted across batches), as lists of batch views."""
    ins, outs, cs, start = [], [], [], 0
    for x, y, c in zip(inputs, targets, calls):
        a, b = max(lo - start, 0), min(hi - start, x.shape[0])
        start += x.shape[0]
        if a < b:
            xs, ys, call = _slice(x, y, c, slice(a, b))
            ins.append(xs), outs.append(ys), cs.append(call)
    return ins, outs, cs
