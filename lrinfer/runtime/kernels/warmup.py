"""Warm-up before CUDA-graph capture: compile every kernel specialization a model will launch.

Triton compiles a kernel the first time it sees a specialization (dtype, constexprs, integer
divisibility, M bucket's config), and the decode launcher also computes occupancy, allocates its
workspace and, for the fused kernel, probes once per device whether a cooperative launch works
inside a captured graph (`fused_decode.probe_capture`). None of that should happen during capture.
`warmup(shapes, dtypes, m_buckets)` runs each (shape, dtype, M) once, eagerly, through the same
dispatch as `torch.ops.lrinfer.lowrank_linear` / `lowrank_linear_grouped`, so a capture afterwards
only records launches.

Shapes: (in, out, k[, k2[, bias]]) tuples or {"in", "out", "k", "k2", "bias"} dicts for single
linears; {"in", "ranks", "outs", "bias"} for a grouped (fused qkv / gate_up) layer.
`layer_shapes(model)` collects them from any module tree whose modules hold the factors as `V`/`U`
(`lrinfer.runtime.nn.LowRankLinear`, the vLLM plugin's layers).
"""
from __future__ import annotations

import torch

from lrinfer.errors import LrinferError
from . import configs, ops


def _norm(shape) -> dict:
    if isinstance(shape, dict):
        d = dict(shape)
    elif isinstance(shape, (tuple, list)) and 3 <= len(shape) <= 5:
        d = dict(zip(("in", "out", "k", "k2", "bias"), shape))
    else:
        raise LrinferError(f"warmup: shape {shape!r} is not (in, out, k[, k2[, bias]]) or a dict with "
                           "in/out/k or in/ranks/outs")
    d.setdefault("bias", False)
    if "ranks" in d:
        if "outs" not in d or len(d["ranks"]) != len(d["outs"]) or not d["ranks"] or min(d["ranks"]) < 1:
            raise LrinferError(f"warmup: grouped shape {shape!r} needs ranks and outs of one length, ranks >= 1")
        d["ranks"], d["outs"] = [int(k) for k in d["ranks"]], [int(o) for o in d["outs"]]
    else:
        d.setdefault("k2", 0)
        if min(int(d["in"]), int(d["out"])) < 1 or int(d["k"]) < 0 or int(d["k2"]) < 0:
            raise LrinferError(f"warmup: shape {shape!r} needs in, out >= 1 and k, k2 >= 0")
    return d


def layer_shapes(model: torch.nn.Module) -> list[dict]:
    """The distinct warm-up shapes of a model's low-rank layers (modules with `V` and `U`)."""
    seen, out = set(), []
    for mod in model.modules():
        V, U = getattr(mod, "V", None), getattr(mod, "U", None)
        if not (isinstance(V, torch.Tensor) and isinstance(U, torch.Tensor)):
            continue
        bias = getattr(mod, "bias", None) is not None
        ranks = getattr(mod, "lrinfer_ranks", None)
        if U.dim() == 1 and ranks:  # the vLLM plugin's grouped layer
            d = {"in": V.shape[0], "ranks": list(ranks), "outs": list(mod.lrinfer_outs), "bias": bias}
        else:
            V2 = getattr(mod, "V2", None)
            d = {"in": V.shape[0], "out": U.shape[0], "k": U.shape[1],
                 "k2": V2.shape[1] if isinstance(V2, torch.Tensor) else 0, "bias": bias}
        key = repr(sorted(d.items()))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def warmup(shapes, dtypes=(torch.bfloat16,), m_buckets=configs.M_BUCKETS, device=None) -> list[dict]:
    """Run every (shape, dtype, M) once through the kernels' dispatch, outside capture.

    shapes: see the module doc (or `layer_shapes(model)`); dtypes: torch dtypes; m_buckets: the
    token counts that will be captured (default: every M bucket of `configs`); device: a CUDA
    device (default: the current one). Returns one record per run: {shape..., dtype, m, method},
    method being what ran ("torch" where no Triton kernel applies: CPU, below sm_80, cuBLAS buckets).
    Call it after loading the model and before `torch.cuda.graph(...)` / `make_graphed_callables`.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise LrinferError("warmup: called during CUDA-graph capture; call it before capturing")
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    records = []
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return (torch.randn(*shape, generator=g) / max(shape[0], 1) ** 0.5).to(device=device, dtype=dtype)

    with torch.no_grad():
        for raw in shapes:
            d = _norm(raw)
            for dtype in dtypes:
                for m in m_buckets:
                    x = rand(int(m), d["in"], dtype=dtype)
                    if "ranks" in d:
                        kt, n_out = sum(d["ranks"]), sum(d["outs"])
                        V = rand(d["in"], kt, dtype=dtype)
                        U = rand(sum(k * o for k, o in zip(d["ranks"], d["outs"])), dtype=dtype)
                        b = rand(n_out, dtype=dtype) if d["bias"] else None
                        ran = ops.use_triton(x) and ops.grouped_forward(x, V, U, b, d["ranks"], d["outs"]) is not None
                        cfg = configs.get_config(max(int(m), 1), d["in"], n_out, kt,
                                                 configs.device_slug(ops._device_index(x)) if ran else "")
                    else:
                        k, k2 = int(d["k"]), int(d["k2"])
                        V, U = rand(d["in"], k, dtype=dtype), rand(d["out"], k, dtype=dtype)
                        V2, U2 = (rand(d["in"], k2, dtype=dtype), rand(d["out"], k2, dtype=dtype)) if k2 else (None, None)
                        b = rand(d["out"], dtype=dtype) if d["bias"] else None
                        ran = ops.use_triton(x)
                        ops.lowrank_forward(x, V, U, b, V2, U2)
                        cfg = configs.get_config(max(int(m), 1), d["in"], d["out"], k + k2,
                                                 configs.device_slug(ops._device_index(x)) if ran else "")
                    records.append({**d, "dtype": str(dtype).removeprefix("torch."), "m": int(m),
                                    "method": cfg["method"] if ran else "torch"})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return records
