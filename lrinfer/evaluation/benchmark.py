"""Prefill and decode speed, memory and size of a model; a compressed model against its dense source.

    from lrinfer.evaluation.benchmark import bench_model, compare
    row = bench_model(model, batch=1, prompt_len=128, new_tokens=64)     # one model
    report = compare(dense, compressed, batches=[1, 8])                 # both, repeats alternated

One run: a prefill forward over `prompt_len` random tokens per sequence (logits of the last
position only), then `new_tokens` one-token decode steps, each feeding back the greedy token, on a
KV cache sized prompt_len + new_tokens. Timings are medians over `repeats` runs after a warm-up
run; in `compare`, dense and compressed runs alternate (and swap order every repeat), so drift of
the machine (clocks, other load) hits both sides alike. `decode_speedup` is the ratio of the median
wall times, `decode_speedup_paired` the median of the per-repeat ratios; on the CPU each run also
records this process's CPU time (`decode_cpu_ms_per_step`, `decode_speedup_cpu_time`), which time
spent descheduled by other jobs does not inflate — the figure to trust on a shared machine with one
thread.

Same treatment for both sides:
  CPU   eager forwards, static KV cache by default (`cache="dynamic"`: HF's growing cache).
  CUDA  the forward wrapped in torch.compile(mode="reduce-overhead", fullgraph=True): every
        prefill and decode call replays a CUDA graph, so kernel-launch overhead does not decide
        the comparison. Needs the static cache (fixed addresses); the cache is filled once eagerly
        first, which also measures memory.

Memory (`peak_bytes`):
  CUDA  weights + the increase of torch.cuda.max_memory_allocated over one eager prefill and
        decode (KV cache + activations), measured before any graph is captured.
  CPU   weights + KV-cache bytes (parameter + buffer + cache tensor bytes; activations and
        allocator slack are not counted — the process RSS holds both models, so it is not used).
`streamed_bytes`: bytes of weights every decode step reads (all parameters except an input
embedding table that is not also the output head) — what bounds decode speed when it is
memory-bound; the dense/compressed ratio of it is the ideal decode speed-up.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lrinfer.errors import LrinferError

PEAK_METHOD = {
    "cuda": "weights + increase of torch.cuda.max_memory_allocated over one eager prefill+decode "
            "(KV cache and activations; CUDA-graph pools not included)",
    "cpu": "parameter + buffer + KV-cache tensor bytes (activations not included; not RSS)",
}


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = id(t) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.storage_offset(),
                                                     tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_stats(model: nn.Module) -> dict:
    """params (tied tensors once), param_bytes, buffer_bytes, weights_bytes (both), streamed_bytes
    (weights one decode step reads: all parameters except an untied input embedding)."""
    params = _unique(model.parameters())
    buffers = _unique(model.buffers())
    streamed = params
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        head_w = getattr(head, "weight", None)
        if head_w is None or head_w.data_ptr() != emb.weight.data_ptr():
            streamed = [p for p in params if p is not emb.weight]
    return {"params": sum(p.numel() for p in params), "param_bytes": _bytes(params), "buffer_bytes": _bytes(buffers),
            "weights_bytes": _bytes(params) + _bytes(buffers), "streamed_bytes": _bytes(streamed)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allow_recompiles(n: int = 64) -> None:
    """Dense and compressed share LlamaForCausalLM.forward's code object; each (model, shape) is a
    separate graph, so raise dynamo's per-code-object limit above the default 8."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


def compiled_forward(model: nn.Module) -> Callable:
    """model.forward under torch.compile(mode="reduce-overhead", fullgraph=True): CUDA graphs."""
    _allow_recompiles()
    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)


class Runner:
    """Prefill + decode runs of one model at one batch size (inputs and cache made once)."""

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, new_tokens: int, *,
                 cache: str = "static", forward: Callable | None = None, seed: int = 0):
        from transformers import DynamicCache, StaticCache

        if cache not in ("static", "dynamic"):
            raise LrinferError(f"cache must be 'static' or 'dynamic'; got {cache!r}")
        if batch < 1 or prompt_len < 1 or new_tokens < 1:
            raise LrinferError(f"batch, prompt length and new tokens must be >= 1; got {batch}, {prompt_len}, "
                               f"{new_tokens}")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit and prompt_len + new_tokens > limit:
            raise LrinferError(f"prompt length + new tokens = {prompt_len + new_tokens} exceeds the model's "
                               f"{limit} positions")
        self.model, self.batch, self.prompt_len, self.new_tokens = model, batch, prompt_len, new_tokens
        self.device = _device(model)
        self.eager = model.forward
        self.forward = forward or model.forward
        self.graphs = forward is not None and self.device.type == "cuda"
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).to(self.device)
        if cache == "static":
            self._cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
            self.new_cache = lambda: (self._cache.reset(), self._cache)[1]
        else:
            self.new_cache = lambda: DynamicCache(config=model.config)
        self.cache_kind = cache
        self.kv_cache_bytes = None
        self.extra_bytes = None    # CUDA: measured increase over the eager run

    @torch.no_grad()
    def run(self, steps: int | None = None, forward: Callable | None = None) -> tuple[float, float]:
        """One prefill and `steps` (default new_tokens) decode steps. Returns wall seconds (prefill,
        decode) and this process's CPU seconds (prefill, decode)."""
        forward = forward or self.forward
        steps = self.new_tokens if steps is None else steps
        graphs = self.graphs and forward is self.forward
        cache = self.new_cache()
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = forward(input_ids=self.ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = forward(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        t2, c2 = time.perf_counter(), time.process_time()
        if steps == self.new_tokens:   # the cache at its full length (a dynamic cache grows)
            self.kv_cache_bytes = _bytes(t for layer in cache.layers for t in (layer.keys, layer.values)
                                         if isinstance(t, torch.Tensor))
        return t1 - t0, t2 - t1, c1 - c0, c2 - c1

    def warm_up(self) -> None:
        """An eager run first (it allocates the static cache outside any graph and measures memory
        on CUDA), then, with graphs, a few short runs (compile, graph recording), then a full run."""
        cuda = self.device.type == "cuda"
        if cuda:
            _sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.run(steps=2, forward=self.eager)
        if cuda:
            _sync(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - base
        if self.graphs:
            for _ in range(3):
                self.run(steps=3)
        self.run()


def _summary(runner: Runner, times: list[tuple], weights: dict) -> dict:
    b, p, n = runner.batch, runner.prompt_len, runner.new_tokens
    prefill, decode, decode_cpu = [t[0] for t in times], [t[1] for t in times], [t[3] for t in times]
    pre, dec = statistics.median(prefill), statistics.median(decode)
    extra = runner.extra_bytes if runner.extra_bytes is not None else runner.kv_cache_bytes
    return {
        "batch": b,
        "prefill_ms": round(pre * 1e3, 3),
        "prefill_tokens_per_s": round(b * p / pre, 2),
        "decode_ms_per_step": round(dec / n * 1e3, 3),
        "decode_tokens_per_s": round(b * n / dec, 2),
        "decode_ms_per_step_min": round(min(decode) / n * 1e3, 3),   # the least disturbed run
        # CPU: this process's CPU time per step (time spent descheduled by other load is not in it)
        "decode_cpu_ms_per_step": round(statistics.median(decode_cpu) / n * 1e3, 3) if runner.device.type == "cpu"
        else None,
        "peak_bytes": weights["weights_bytes"] + extra,
        "kv_cache_bytes": runner.kv_cache_bytes,
        "prefill_s": [round(t, 5) for t in prefill],
        "decode_s": [round(t, 5) for t in decode],
    }


def _settings(model: nn.Module, graphs: bool | None, cache: str, repeats: int) -> tuple[bool, str]:
    if repeats < 1:
        raise LrinferError(f"repeats must be at least 1; got {repeats}")
    device = _device(model)
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise LrinferError(f"CUDA graphs need a CUDA device; the model is on {device}")
    if graphs and cache != "static":
        raise LrinferError("CUDA graphs need the static cache (fixed addresses); drop cache='dynamic'")
    return graphs, cache


def bench_model(model: nn.Module, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5,
                *, graphs: bool | None = None, cache: str = "static", seed: int = 0) -> dict:
    """Prefill and decode speed of one model at one batch size, medians of `repeats` runs.
    graphs: CUDA graphs via torch.compile (default: on CUDA). Returns the row dict of `compare`
    plus the model's weight_stats."""
    graphs, cache = _settings(model, graphs, cache, repeats)
    runner = Runner(model, batch, prompt_len, new_tokens, cache=cache, seed=seed,
                    forward=compiled_forward(model) if graphs else None)
    runner.warm_up()
    times = [runner.run() for _ in range(repeats)]
    weights = weight_stats(model)
    return {**weights, **_summary(runner, times, weights)}


def compare(dense: nn.Module, compressed: nn.Module, batches=(1,), prompt_len: int = 128, new_tokens: int = 64,
            repeats: int = 5, *, graphs: bool | None = None, cache: str = "static", seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict:
    """Both models side by side, at every batch size: repeats alternate dense/compressed (the order
    swaps every repeat). Returns {settings..., dense: weight_stats, compressed: weight_stats,
    rows: [{batch, dense: {...}, compressed: {...}, decode_speedup, prefill_speedup (ratios of the
    medians), decode_speedup_paired (median of the per-repeat ratios)}]}."""
    if _device(dense) != _device(compressed):
        raise LrinferError(f"the models are on different devices ({_device(dense)} and {_device(compressed)})")
    dtypes = {next(m.parameters()).dtype for m in (dense, compressed)}
    if len(dtypes) != 1:
        raise LrinferError(f"the models have different dtypes ({', '.join(str(d) for d in dtypes)}); load both in one")
    graphs, cache = _settings(dense, graphs, cache, repeats)
    device = _device(dense)
    sides = {"dense": dense, "compressed": compressed}
    forwards = {k: compiled_forward(m) if graphs else None for k, m in sides.items()}
    weights = {k: weight_stats(m) for k, m in sides.items()}
    rows = []
    for batch in batches:
        runners = {k: Runner(m, batch, prompt_len, new_tokens, cache=cache, forward=forwards[k], seed=seed)
                   for k, m in sides.items()}
        for k, r in runners.items():
            if log:
                log(f"batch {batch}: warming up {k}")
            r.warm_up()
        times = {k: [] for k in sides}
        for i in range(repeats):
            order = ("dense", "compressed") if i % 2 == 0 else ("compressed", "dense")
            for k in order:
                times[k].append(runners[k].run())
            if log:
                log(f"batch {batch}: repeat {i + 1}/{repeats}: decode "
                    + ", ".join(f"{k} {times[k][-1][1] / new_tokens * 1e3:.2f} ms/step (cpu "
                                f"{times[k][-1][3] / new_tokens * 1e3:.2f})" for k in sides))
        row = {"batch": batch}
        for k in sides:
            row[k] = _summary(runners[k], times[k], weights[k])
        row["decode_speedup"] = round(row["compressed"]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"], 4)
        row["prefill_speedup"] = round(row["compressed"]["prefill_tokens_per_s"]
                                       / row["dense"]["prefill_tokens_per_s"], 4)
        # each repeat's two runs are adjacent in time: the median of their ratios cancels slow drift
        row["decode_speedup_paired"] = round(statistics.median(d[1] / c[1] for d, c in
                                                               zip(times["dense"], times["compressed"])), 4)
        if device.type == "cpu":
            row["decode_speedup_cpu_time"] = round(row["dense"]["decode_cpu_ms_per_step"]
                                                   / row["compressed"]["decode_cpu_ms_per_step"], 4)
        rows.append(row)
        del runners
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtypes.pop()).removeprefix("torch."),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cuda_graphs": graphs,
        "cache": cache,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "statistic": "median",
        "peak_method": PEAK_METHOD["cuda" if device.type == "cuda" else "cpu"],
        "dense": weights["dense"],
        "compressed": weights["compressed"],
        "bytes_ratio": round(weights["dense"]["streamed_bytes"] / weights["compressed"]["streamed_bytes"], 4),
        "rows": rows,
        "host": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                 "cpu": _cpu_name()},
    }


def load_pair(path, base: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """The compressed checkpoint at `path` and its dense base model (the manifest's `base_model`, or
    `base`), both on `device` in one dtype (`dtype`, default the checkpoint's).
    Returns (dense, compressed, info: {checkpoint, base_model, method, ratio})."""
    from pathlib import Path

    from lrinfer.runtime.checkpoint import read_manifest
    from lrinfer.runtime.models import load_model

    path = Path(path)
    if not path.is_dir():
        raise LrinferError(f"checkpoint directory not found: {path}")
    manifest = read_manifest(path)
    base = base or manifest.get("base_model")
    if not base or not isinstance(base, str):
        raise LrinferError(f"{path}: lrinfer.json records no base_model; pass --base MODEL "
                           "(the dense model it was compressed from)")
    compressed, _, _ = load_model(str(path), dtype, device)
    dtype = next(compressed.parameters()).dtype
    try:
        dense, _, source = load_model(base, dtype, device)
    except LrinferError as e:
        raise LrinferError(f"{path}: cannot load its dense base model '{base}' ({e}); "
                           "pass --base MODEL (the dense model it was compressed from)") from None
    for field in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        a, b = getattr(dense.config, field, None), getattr(compressed.config, field, None)
        if a != b:
            raise LrinferError(f"the base model {source} does not match {path} ({field} {a} vs {b}); "
                               "pass --base with the model it was compressed from")
    return dense, compressed, {"checkpoint": str(path), "base_model": source, "method": manifest.get("method"),
                               "ratio": manifest.get("ratio")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(report: dict) -> str:
    """The comparison as a few aligned lines."""
    mib = 2 ** 20
    head = (f"{report['device']}, {report['dtype']}"
            + (f", {report['threads']} thread{'s' if report['threads'] != 1 else ''}" if report.get("threads") else "")
            + f", prompt {report['prompt_len']}, {report['new_tokens']} new tokens, median of {report['repeats']}, "
            f"{report['cache']} cache, {'CUDA graphs' if report['cuda_graphs'] else 'eager'}")
    lines = [head, f"{'':12}{'params':>14}{'weights MiB':>13}{'streamed MiB':>14}"]
    for k in ("dense", "compressed"):
        w = report[k]
        lines.append(f"{k:12}{w['params']:>14,}{w['weights_bytes'] / mib:>13.1f}{w['streamed_bytes'] / mib:>14.1f}")
    cpu_col = any(row["dense"].get("decode_cpu_ms_per_step") is not None for row in report["rows"])
    lines.append(f"{'batch':>5}  {'model':12}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>10}"
                 + (f"{'cpu ms/step':>13}" if cpu_col else "") + f"{'peak MiB':>10}")
    for row in report["rows"]:
        for k in ("dense", "compressed"):
            r = row[k]
            lines.append(f"{row['batch']:>5}  {k:12}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}"
                         f"{r['decode_ms_per_step']:>10.2f}"
                         + (f"{r['decode_cpu_ms_per_step']:>13.2f}" if cpu_col else "")
                         + f"{r['peak_bytes'] / mib:>10.1f}")
        cpu = f", cpu time {row['decode_speedup_cpu_time']:.2f}x" if "decode_speedup_cpu_time" in row else ""
        lines.append(f"{'':>5}  compressed/dense: decode {row['decode_speedup']:.2f}x "
                     f"(paired {row['decode_speedup_paired']:.2f}x{cpu}), prefill "
                     f"{row['prefill_speedup']:.2f}x (weight bytes per step allow {report['bytes_ratio']:.2f}x)")
    lines.append(f"peak: {report['peak_method']}")
    return "\n".join(lines)
