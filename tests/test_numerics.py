"""Numerics under degenerate calibration (issue #6): every solver, on a tiny random Llama, must give
finite factors and finite logits, and where a fallback kicks in (rank-deficient or zero Gram
matrices) it is logged at INFO on the `lrinfer` logger.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

import lrinfer
from lrinfer.offline.calibration import LinearStats
from lrinfer.offline.solvers.base import SOLVERS

WHITENING = {"svdllm", "ressvd", "saes"}          # solvers whose statistics go through `whitener`
ALL = sorted(SOLVERS)


def compress(model, ids, method, ratio=0.5, **kw):
    cfg = lrinfer.CompressConfig(method=method, ratio=ratio, selection="all", **kw)
    return lrinfer.compress(model, cfg, ids, progress=False)


def assert_finite(model, result, ids):
    for name, pair in result.factors.items():
        for k, t in pair.tensors().items():
            assert torch.isfinite(t).all(), f"{name}.{k} is not finite"
    with torch.no_grad():
        logits = model(ids[:2]).logits
    assert torch.isfinite(logits).all()


def fallback_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("lrinfer")
            and ("rank-deficient" in r.getMessage() or "not positive definite" in r.getMessage()
                 or "Gram matrix is zero" in r.getMessage())]


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="lrinfer")   # fallbacks are DEBUG lines (--verbose)
    return caplog


# --------------------------------------------------------------------------- degenerate calibration

def ids_few_tokens(calib_ids):
    return calib_ids[:1, :6]                          # 6 tokens for a hidden size of 64


def ids_constant(calib_ids):
    return torch.full((4, 16), 7)                     # the same token everywhere


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("make_ids", [ids_few_tokens, ids_constant], ids=["few_tokens", "constant_text"])
def test_rank_deficient_gram(method, make_ids, make_tiny, calib_ids, info_logs):
    model = make_tiny()
    ids = make_ids(calib_ids)
    result = compress(model, ids, method)
    assert_finite(model, result, ids)
    if method in WHITENING:
        logs = fallback_logs(info_logs)
        assert logs, "a rank-deficient Gram matrix must be logged"
        assert any("rank-deficient" in m and "too few or repeated calibration tokens" in m for m in logs), logs


def zero_rows_and_columns(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:5] = 0          # zero output rows
            layer.self_attn.q_proj.weight[:, :3] = 0       # zero input columns
            layer.mlp.down_proj.weight[:, :10] = 0
            layer.mlp.up_proj.weight[7] = 0
            layer.input_layernorm.weight[:4] = 0           # input channels that are always zero


@pytest.mark.parametrize("method", ALL)
def test_zero_rows_and_columns(method, make_tiny, calib_ids, info_logs):
    model = make_tiny()
    zero_rows_and_columns(model)
    result = compress(model, calib_ids, method)
    assert_finite(model, result, calib_ids)
    if method in WHITENING:     # q/k/v see 4 dead channels: their Gram has 4 empty directions
        assert any("self_attn.q_proj: Gram matrix is rank-deficient (4 of 64" in m
                   for m in fallback_logs(info_logs)), fallback_logs(info_logs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("method", ALL)
def test_dead_layer_zero_gram(method, dtype, make_tiny, calib_ids, info_logs):
    """A layer that only ever sees zeros: G = 0. Without the identity fallback the whitened factors
    were scaled by δ^{∓1/4} (2.5e8 in float32, inf in float16)."""
    model = make_tiny()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()
    model = model.to(dtype)
    result = compress(model, calib_ids, method)
    assert_finite(model, result, calib_ids)
    big = max(float(t.abs().max()) for p in result.factors.values() for t in p.tensors().values())
    assert big < 1e3, big
    if method in WHITENING:
        assert any("model.layers.0.self_attn.q_proj: Gram matrix is zero" in m for m in fallback_logs(info_logs))


# --------------------------------------------------------------------------- float16 statistics

def loud_fp16_model(make_tiny, gain):
    """A float16 Llama whose q/k/v and gate/up inputs are ~`gain`× larger than usual."""
    model = make_tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(gain)
            layer.post_attention_layernorm.weight.mul_(gain)
    return model.half()


def record_stats(monkeypatch, method, name):
    """Wrap solver `method` so the LinearStats it gets for linear `name` are kept."""
    seen = {}
    orig = SOLVERS[method]

    @functools.wraps(orig.fn)
    def solve(W, stats, rank, **kw):
        if stats.name == name:
            seen["stats"] = stats
        return orig.fn(W, stats, rank, **kw)
    monkeypatch.setitem(SOLVERS, method, dataclasses.replace(orig, fn=solve))
    return seen


@pytest.mark.parametrize("method", ALL)
def test_fp16_statistics_accumulate_in_float64(method, make_tiny, calib_ids, monkeypatch):
    model = loud_fp16_model(make_tiny, gain=200.0)
    lin = "model.layers.0.self_attn.q_proj"
    xs = []
    h = model.get_submodule(lin).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(calib_ids)
    h.remove()
    x = torch.cat(xs)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()
    assert not torch.isfinite(x.t() @ x).all(), "the case must overflow a float16 Gram matrix"
    gram64 = x.double().t() @ x.double()
    assert torch.isfinite(gram64).all()

    seen = record_stats(monkeypatch, method, lin)
    result = compress(model, calib_ids, method)
    assert_finite(model, result, calib_ids)
    stats: LinearStats = seen["stats"]
    for field in ("gram", "gram_hat", "cross", "abs_sum", "fisher"):
        value = getattr(stats, field)
        if value is not None:
            # FWSVD's Fisher (squared gradients, never a Gram) accumulates in float32 on the device
            assert value.dtype == (torch.float32 if field == "fisher" else torch.float64), field
            assert torch.isfinite(value).all(), field
    if stats.gram is not None:
        torch.testing.assert_close(stats.gram, gram64, rtol=1e-9, atol=0)
    if stats.abs_sum is not None:
        torch.testing.assert_close(stats.abs_sum, x.double().abs().sum(0), rtol=1e-9, atol=0)


def test_fp16_fisher_overflow(make_tiny, calib_ids):
    """float16 gradients of this model overflow; Fisher information is taken in float32 instead.
    (The compressed float16 model's own forward may still overflow at this gain: not asserted.)"""
    model = loud_fp16_model(make_tiny, gain=1000.0)
    result = compress(model, calib_ids, "fwsvd")
    assert next(model.parameters()).dtype == torch.float16
    assert all(torch.isfinite(t).all() for p in result.factors.values() for t in p.tensors().values())


# --------------------------------------------------------------------------- extreme ratios and ranks

@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("ratio", [0.01, 0.99])
def test_extreme_ratios(method, ratio, make_tiny, calib_ids):
    model = make_tiny()
    result = compress(model, calib_ids, method, ratio=ratio, rank_multiple=1)
    ranks = [r + r2 for r, r2 in result.ranks.values()]
    if ratio == 0.99:
        assert max(ranks) <= 2
    else:
        assert min(ranks) >= 21          # k/v_proj are [32, 64] (GQA): int(0.99·64·32/96) = 21
    assert_finite(model, result, calib_ids)


def synthetic_stats(W, n_tokens, seed=0, name="lin"):
    """Every statistic any solver reads, from n_tokens random correlated inputs (float64)."""
    g = torch.Generator().manual_seed(seed)
    out, d = W.shape
    X = torch.randn(n_tokens, d, generator=g, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) / d)
    X[:, 0] *= 20                                              # an outlier channel
    Xh = X + 0.05 * torch.randn(X.shape, generator=g, dtype=torch.float64)
    fisher = torch.rand(out, d, generator=g, dtype=torch.float64) ** 4
    grads = torch.randn(n_tokens, out, generator=g, dtype=torch.float64)   # output gradients (rank-deficient at 3 tokens)
    return LinearStats(name, n=n_tokens, gram=X.t() @ X, gram_hat=Xh.t() @ Xh, cross=X.t() @ Xh,
                       abs_sum=X.abs().sum(0), fisher=fisher, grad_gram=grads.t() @ grads)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (1, 7), (7, 1)], ids=str)
@pytest.mark.parametrize("n_tokens", [3, 200], ids=["3_tokens", "200_tokens"])
def test_solver_rank_one_and_full(method, shape, n_tokens):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64) / shape[1] ** 0.5
    stats = synthetic_stats(W, n_tokens)
    full = min(shape)
    for rank in sorted({1, full}):
        pair = SOLVERS[method](W, stats, rank)
        assert pair.rank + pair.rank2 == rank
        assert pair.U.shape[0] == shape[0] and pair.V.shape[0] == shape[1]
        for k, t in pair.tensors().items():
            assert torch.isfinite(t).all(), (method, rank, k)
        if rank == full and not method.endswith("saes"):    # saes' target is not W itself (β·WΔ term)
            err = float((pair.dense() - W).norm() / W.norm())
            assert err < 1e-6, f"{method} at full rank {rank}: rel err {err:.3g}"


@pytest.mark.parametrize("method", ALL)
def test_solver_on_zero_weight(method):
    W = torch.zeros(16, 24, dtype=torch.float64)
    stats = synthetic_stats(torch.ones(16, 24, dtype=torch.float64), 50)
    for rank in (1, 16):
        pair = SOLVERS[method](W, stats, rank)
        assert all(torch.isfinite(t).all() for t in pair.tensors().values())
        assert float(pair.dense().abs().max()) < 1e-9
