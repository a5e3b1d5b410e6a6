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
    sequences. A slice cuts the hidden states and every call tensor whose first dimension is the
    batch's (masks, per-sequence positions); tensors shared by the batch (leading 1) pass whole."""
    def cut(v, n, sl):
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            return v[sl]
        if isinstance(v, (tuple, list)):
            return type(v)(cut(u, n, sl) for u in v)
        return v

    pieces = []
    for x, y, c in zip(inputs, targets, calls):
        n = x.shape[0]
        if size == 0 or size >= n:
            pieces.append((x, y, c))
            continue
        for lo in range(0, n, size):
            sl = slice(lo, lo + size)
            call = BlockCall(cut(c.args, n, sl), {k: cut(v, n, sl) for k, v in c.kwargs.items()})
            pieces.append((x[sl], y[sl], call))
    return pieces


@register_refiner("blockfit", summary="Adam on the block's factor pairs: compressed block on compressed-path "
                                      "inputs → dense block outputs (AA-SVD-style local refinement)")
def refine_block(block, modules, inputs, targets, calls, *, steps: int = 64, lr: float = 1e-3,
                 batch: int = 2, seed: int = 0) -> dict:
    """Refine `modules`' factors in place; returns {"error_before", "error_after", "steps", "seconds"}.

    block: a decoder block holding `modules` (name -> LowRankLinear); inputs/targets: lists of
    [batch, T, hidden] (compressed-path inputs X̂_b, dense outputs f(X_b)); calls: the block's other
    arguments per batch; batch: sequences per step (0: a whole calibration batch)."""
    if steps < 0 or not lr > 0 or batch < 0:
        raise LrinferError(f"blockfit: steps and batch must be >= 0 and lr > 0; got steps={steps}, lr={lr}, "
                           f"batch={batch}")
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
    pieces = _micro_batches(inputs, targets, calls, batch)
    order = torch.randperm(len(pieces) * math.ceil(steps / len(pieces)),
                           generator=torch.Generator().manual_seed(seed)) % len(pieces)
    try:
        with torch.enable_grad():
            for step, k in enumerate(order[:steps].tolist()):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                x, y, c = pieces[k]
                out = first_tensor(block(x.to(params[0].device, torch.float32), *c.args, **c.kwargs))
                loss = (out - y.to(params[0].device, torch.float32)).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in block.parameters():
            p.requires_grad_(frozen.get(id(p), False))
        for p in params:
            p.grad = None
        block.to(dtype)
    after = _relative_error(block, inputs, targets, calls)
    return {"error_before": before, "error_after": after, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3)}
