"""The memory plan of a compression, from the model config alone (no weights): peak device memory,
peak host memory and resume-disk use, where the activation streams go, and whether it fits.

What is counted (bytes; D = the compute dtype's size, N × T calibration tokens, B × T per batch,
H hidden, I MLP width, `in_max` the widest linear input):

  block        one decoder block's weights, D each (streaming: the only block in memory)
  outside      embeddings, final norm and head, loaded once (tied embeddings once)
  streams      the activation streams: the dense and compressed inputs of the current block plus the
               dense outputs being built, 3 × N·T·H·D (2 × while the two streams still agree)
  statistics   float64 sums, (number the solver needs) × in² × 8 per distinct input (q/k/v and gate/up
               share theirs): all four inputs of a block at once for one-pass solvers (SVD-LLM),
               the largest stage for sequential ones (SAES); FWSVD adds a float32 Fisher of every linear,
               KFAC a float32 out × out output-gradient Gram of every linear (both: the whole model, no streaming)
  solve        one linear's float64 solve at its largest (solvers/linalg.py): SVD-LLM in² + 2·in·out
               + 3·min(in, out)² (L factored in place, W, W·L, the smaller Gram and its eigenvectors);
               SAES 2·in² + 7·in·out + 3·min²
  activations  one batch through the block (MLP and attention temporaries, the hooked inputs, the
               float64 chunks that feed the statistics)
  factors      the finished block's factors while it is written, (1 − ratio) × block
  runtime      the process itself on the host: Python, torch, transformers (measured ~0.45 GiB on CPU;
               a CUDA context adds ~0.5 GiB of host memory)
  loading      streaming: one block read from the shards; the whole model: the loader's copy, 1 × the weights

Device peak = outside + block + factors + streams (when on the device) + statistics + max(solve,
activations), or, when perplexity runs, the larger of that and its logits (3 × B·T·vocab·4). Host peak =
runtime + loading + streams (when on the host); on a CPU-only run the device
is the host, and the two add up. Measured on the CPU (bench/results/compress_memory_cpu.json): streamed,
the plan is 1.19-1.23 × the peak RSS (it counts embeddings and head that a CPU run maps from the shards
and never fully touches); the whole model in memory, 0.8-1.05 ×. Without streaming the whole model
replaces `block`. Resume disk = the factors of every block written so far, (1 − ratio) × the
linears, + two streams files (the new one is durable before the old one is deleted).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrinfer.errors import LrinferError
from lrinfer.evaluation.perplexity import PerplexityConfig
from .config import CompressConfig

GiB = 1 << 30
RUNTIME_HOST = int(0.45 * GiB)        # Python + torch + transformers + lrinfer, measured (bench/compress_memory.py)
CUDA_CONTEXT_HOST = int(0.5 * GiB)
STAT_COUNT = {"gram": 1, "gram_hat": 1, "cross": 1}
STREAMS = ("auto", "device", "host")   # where the activation streams may live ("auto": the plan decides)


def check_streams(streams: str) -> None:
    if streams not in STREAMS:
        raise LrinferError(f"streams must be one of {', '.join(STREAMS)}; got {streams!r}")


def _gib(n: float | int | None) -> str:
    """Bytes as GiB (MiB under 1 GiB)."""
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model config."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers config or a config.json dict (text config of multimodal Gemma 3 too)."""
        c = config if isinstance(config, dict) else config.to_dict()
        c = c.get("text_config") or c
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return cls(hidden, int(c["intermediate_size"]), int(c["num_hidden_layers"]), heads,
                   int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or hidden // heads),
                   int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[str, int, int]]:
        """(kind, in, out) of one block's linears."""
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", H, q), ("k_proj", H, kv), ("v_proj", H, kv), ("o_proj", q, H),
                ("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]

    @property
    def block_params(self) -> int:
        return sum(i * o for _, i, o in self.linears()) + 2 * self.hidden

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@dataclass
class MemoryPlan:
    """Estimated peaks of one compression (bytes) and the decision where the streams live."""
    device: str
    dtype: str
    streaming: bool
    streams_on: str                     # "device" or "host"
    samples: int
    seq_len: int
    batch_size: int
    method: str
    block: int
    outside: int
    streams: int
    statistics: int
    solve: int
    activations: int
    factors: int
    runtime: int
    device_peak: int
    host_peak: int
    resume_disk: int
    checkpoint: int
    device_free: int | None = None
    host_free: int | None = None
    fits: bool = True
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plan in a few printed lines."""
        where = "streamed block by block" if self.streaming else "whole model in memory"
        cpu = self.device.startswith("cpu")
        out = [f"memory plan ({where}, {self.dtype}, {self.samples} x {self.seq_len} calibration tokens, "
               f"batch {self.batch_size}, {self.method}; streams on the {self.streams_on}):",
               f"  {'device' if not cpu else 'compute'} peak {_gib(self.device_peak)} on {self.device} = "
               f"{'block' if self.streaming else 'model'} {_gib(self.block)} + embeddings/head {_gib(self.outside)} "
               f"+ streams {_gib(self.streams if self.streams_on == 'device' else 0)} "
               f"+ statistics {_gib(self.statistics)} + solve/activations {_gib(max(self.solve, self.activations))} "
               f"+ factors {_gib(self.factors)}"
               + (f"; free {_gib(self.device_free)}" if self.device_free is not None and not cpu else ""),
               f"  host peak {_gib(self.host_peak)}" + (" (the compute device is the host)" if cpu else "")
               + (f"; available {_gib(self.host_free)}" if self.host_free is not None else ""),
               f"  resume disk {_gib(self.resume_disk)} (factors + streams files); checkpoint {_gib(self.checkpoint)}"]
        out += [f"  note: {n}" for n in self.notes]
        if not self.fits:
            out.append(f"  does not fit; would fit with: {' or '.join(self.advice) or 'nothing smaller (a larger device)'}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise the plan's one-line refusal when it does not fit."""
        if self.fits:
            return
        cpu = self.device.startswith("cpu")
        need, have, where = ((self.host_peak, self.host_free, "host memory") if cpu or self.device_fits
                             else (self.device_peak, self.device_free, self.device))
        fix = " or ".join(self.advice) if self.advice else "nothing smaller fits; use a device with more memory"
        raise LrinferError(f"the memory plan needs {_gib(need)} on {where} but {_gib(have)} is available "
                           f"(block {_gib(self.block)}, streams {_gib(self.streams)}, statistics "
                           f"{_gib(self.statistics)}); would fit: {fix}")

    @property
    def device_fits(self) -> bool:
        return self.device_free is None or self.device.startswith("cpu") or self.device_peak <= self.device_free


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype.itemsize


def _solve_bytes(needs: frozenset, method: str, i: int, o: int) -> int:
    """Float64 workspace of one linear's solve, W [o, i] (solvers/linalg.py, from the code's allocations)."""
    small = min(i, o)
    if "grad_gram" in needs:         # KFAC: the output side's G, G + δI and its factor, on top of the input side's
        return 3 * o * o * 8 + _solve_bytes(needs - {"grad_gram"}, method, i, o)
    if "gram_hat" in needs:          # SAES: M's factor, Δ, S, D, their projections, the eigenproblem
        return (2 * i * i + 7 * i * o + 3 * small * small) * 8
    if method == "ressvd":           # the whitener's L and L⁻¹, an SVD and the residual
        return (4 * i * i + 4 * i * o + 3 * small * small) * 8
    if "gram" in needs:              # SVD-LLM: L (G + δI factored in place), W, W·L, the smaller Gram, eigenvectors
        return (i * i + 2 * i * o + 3 * small * small) * 8
    if "fisher" in needs:
        return (4 * i * o + 3 * small * small) * 8
    return (2 * i * o + 3 * small * small) * 8


def estimate(config, *, n_samples: int = CompressConfig.n_samples, seq_len: int = CompressConfig.seq_len,
             batch_size: int = CompressConfig.batch_size, dtype="float32", method: str = CompressConfig.method,
             ratio: float = CompressConfig.ratio, device: str = "cpu", streaming: bool = True,
             streams: str = "auto", device_free: int | None = None, host_free: int | None = None,
             eval_windows: int = 0, eval_seq_len: int = PerplexityConfig.seq_len,
             eval_batch_size: int = PerplexityConfig.batch_size) -> MemoryPlan:
    """The memory plan of compressing a model of `config` (a transformers config or a config.json dict).

    device_free / host_free: bytes available (None: not checked). streams: "auto" (on the device when
    the plan fits so, else on the host), "device" or "host". eval_windows > 0: perplexity runs too (its
    peak: the float32 logits of one batch, their shifted copy and log-softmax, 3 × B·T·vocab·4, and, streamed,
    the hidden states of every window). Nothing is loaded."""
    from lrinfer.offline.solvers.base import get_solver
    check_streams(streams)
    s = Shape.of(config)
    D = _itemsize(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    solver = get_solver(method)
    needs = solver.needs
    cpu = str(device).startswith("cpu")
    lin = s.linears()
    in_max = max(i for _, i, _ in lin)
    linear_params = sum(i * o for _, i, o in lin)
    notes = []

    per_block = s.block_params * D
    block = per_block if streaming else per_block * s.layers
    outside = s.outside_params * D
    n_stats = sum(STAT_COUNT.get(k, 0) for k in needs)
    inputs = {kind: i for kind, i, _ in lin}      # one input per group: q/k/v, o, gate/up, down
    groups = [inputs["q_proj"], inputs["o_proj"], inputs["gate_proj"], inputs["down_proj"]]
    per_group = [n_stats * d * d * 8 + (d * 8 if "abs_sum" in needs else 0) for d in groups]
    statistics = max(per_group) if solver.needs_compressed_stream else sum(per_group)
    if "fisher" in needs:
        statistics += linear_params * s.layers * 4
        notes.append("fwsvd back-propagates through the whole model: it does not stream")
        streaming, block = False, per_block * s.layers
    if "grad_gram" in needs:
        statistics += sum(o * o for _, _, o in lin) * s.layers * 4
        notes.append(f"{method} back-propagates through the whole model: it does not stream")
        streaming, block = False, per_block * s.layers
    solve = max(_solve_bytes(needs, method, i, o) for _, i, o in lin)
    factors = int((1 - ratio) * s.block_params * D)
    runtime = RUNTIME_HOST + (0 if cpu else CUDA_CONTEXT_HOST)
    # streaming: one block read from the shards at a time; whole: transformers' loader holds the model's
    # safetensors pages as well as its tensors (measured ~1x the weights on top, bench/compress_memory.py)
    read_buffer = per_block if streaming else per_block * s.layers + outside

    def terms(n: int, b: int) -> tuple[int, int]:
        stream = 3 * n * seq_len * s.hidden * D
        tokens = min(b, n) * seq_len
        act = (tokens * (3 * s.intermediate + 6 * s.hidden) * D + tokens * in_max * D
               + 2 * min(1 << 28, tokens * in_max * 8))
        return stream, act

    evaluation = 0
    if eval_windows:
        evaluation = 3 * min(eval_batch_size, eval_windows) * eval_seq_len * s.vocab * 4
        evaluation += (2 * eval_windows * eval_seq_len * s.hidden * D if streaming
                       else min(eval_batch_size, eval_windows) * eval_seq_len * (3 * s.intermediate + 6 * s.hidden) * D)

    def peaks(on: str, n: int, b: int) -> tuple[int, int]:
        stream, act = terms(n, b)
        dev = outside + block + max(factors + statistics + max(solve, act) + (stream if on == "device" else 0),
                                    evaluation)
        host = runtime + read_buffer + (stream if on == "host" else 0)
        return dev, host + dev if cpu else host

    def fits(on: str, n: int, b: int) -> bool:
        dev, host = peaks(on, n, b)
        return (cpu or device_free is None or dev <= device_free) and (host_free is None or host <= host_free)

    if cpu:
        on = "device"
    else:
        on = streams if streams != "auto" else ("device" if fits("device", n_samples, batch_size) else "host")
    dev, host = peaks(on, n_samples, batch_size)
    ok = fits(on, n_samples, batch_size)
    advice = []
    if evaluation:
        notes.append(f"perplexity's logits and hidden states: {_gib(evaluation)} at their peak")
    if not ok:
        if on == "device" and not cpu and fits("host", n_samples, batch_size):
            advice.append("streams on the host (--streams host)")
        for where in ([on] if cpu else list(dict.fromkeys([on, "host"]))):
            n = n_samples // 2
            while n >= 1 and not fits(where, n, batch_size):
                n //= 2
            if n >= 1:
                advice.append(f"--samples {n}" + (" with --streams host" if where != on else ""))
                break
        b = batch_size // 2
        while b >= 1 and not fits(on, n_samples, b):
            b //= 2
        if b >= 1:
            advice.append(f"--batch-size {b}")
    stream_bytes, activations = terms(n_samples, batch_size)
    one_stream = n_samples * seq_len * s.hidden * D
    resume_disk = int((1 - ratio) * linear_params * s.layers * D) + 2 * 2 * one_stream
    checkpoint = int(((1 - ratio) * linear_params + s.block_params - linear_params) * s.layers * 2
                     + s.outside_params * 2)
    return MemoryPlan(str(device), dtype_name, streaming, on, n_samples, seq_len, batch_size, method, block, outside,
                      stream_bytes, statistics, solve, activations, factors, runtime, dev, host, resume_disk,
                      checkpoint, device_free, host_free, ok, advice, notes)


def available_memory(device: str | torch.device) -> tuple[int | None, int | None]:
    """(free bytes on `device`, available host bytes); None where unknown. CUDA: `torch.cuda.mem_get_info`;
    the host: MemAvailable of /proc/meminfo plus this process's own resident memory."""
    device = torch.device(device)
    dev = None
    if device.type == "cuda" and torch.cuda.is_available():
        dev = torch.cuda.mem_get_info(device)[0]
    host = None
    try:
        with open("/proc/meminfo") as f:
            rows = dict(line.split(":", 1) for line in f)
        host = int(rows["MemAvailable"].split()[0]) * 1024
        with open("/proc/self/status") as f:
            rows = dict(line.split(":", 1) for line in f)
        host += int(rows["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return dev, host


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a file or a model directory, as a dict."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LrinferError(f"config not found: {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LrinferError(f"{path}: not a readable config.json ({e})") from None
    if not isinstance(config, dict) or "hidden_size" not in config and "text_config" not in config:
        raise LrinferError(f"{path}: not a transformers model config (no hidden_size)")
    return config


def config_dtype(config: dict, default: str = "float32") -> str:
    """The dtype a model of `config` loads in by default (its `dtype` / `torch_dtype`)."""
    c = config.get("text_config") or config
    d = c.get("dtype") or c.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    return d if d in ("float32", "float16", "bfloat16") else default


def plan_for(config: dict, device: str, dtype: str | None = None, device_memory: int | None = None,
             host_memory: int | None = None, **kwargs) -> MemoryPlan:
    """`estimate` with the available memory found on this machine unless given."""
    dev, host = available_memory(device) if device_memory is None or host_memory is None else (None, None)
    return estimate(config, dtype=dtype or config_dtype(config), device=device,
                    device_free=device_memory if device_memory is not None else dev,
                    host_free=host_memory if host_memory is not None else host, **kwargs)


def compress_plan(spec: str | None, config, device, dtype: torch.dtype | None, streaming: bool,
                  streams: str = "auto", model_config=None, **eval_kw) -> MemoryPlan | None:
    """The plan of `lrinfer compress` (config: a `CompressConfig`): from the source's config.json when it
    is a local directory, before any weight is read; from `model_config` (a loaded model's) otherwise.
    None when neither is at hand (a GGUF file or a hub id before loading)."""
    from lrinfer.runtime.streaming import streamable_dir
    if model_config is not None:
        cfg = model_config.to_dict()
    else:
        path = Path(os.path.expanduser(spec)) if spec else None
        if path is None or not (path / "config.json").is_file() or (path / "lrinfer.json").is_file():
            return None
        cfg = read_config(path)
        streaming = streaming and streamable_dir(path)
    dt = str(dtype).removeprefix("torch.") if dtype is not None else config_dtype(cfg)
    return plan_for(cfg, str(device), dt, n_samples=config.n_samples, seq_len=config.seq_len,
                    batch_size=config.batch_size, method=config.method, ratio=config.ratio, streaming=streaming,
                    streams=streams, **eval_kw)


def peak_rss() -> int | None:
    """This process's peak resident memory so far (VmHWM), bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            rows = dict(line.split(":", 1) for line in f)
        return int(rows["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
