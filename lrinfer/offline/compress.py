"""`compress(model, config, calib_ids)`: selection → allocation → block by block: calibration, solving, refinement."""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair
from lrinfer.offline.allocation.base import get_allocator
from lrinfer.offline.refinement.base import get_refiner
from lrinfer.offline.selection.base import get_selection
from lrinfer.offline.solvers.base import get_solver
from lrinfer.offline.solvers.linalg import factor_gram, singular_values
from lrinfer.runtime.architecture import check_architecture, compressible_linears
from lrinfer.runtime.blocks import capture_inputs, run_block, to_device
from lrinfer.runtime.checkpoint import CheckpointSpec, skeleton
from lrinfer.runtime.nn import LowRankLinear, replace_module
from lrinfer.runtime.streaming import BlockStreamer, InMemoryBlocks, block_source
from .calibration import (collect_stats, fisher_information, linear_stages, output_gradient_energy,
                          output_gradient_grams, swapped_in)
from .config import CompressConfig
from .plan import available_memory, check_streams, estimate
from .resume import WorkDir, fingerprint

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    factors: dict[str, FactorPair]            # qualified name -> factors (model dtype)
    ranks: dict[str, list[int]]               # name -> [rank, residual rank]
    linears: list                             # every compressible LinearInfo
    hidden_error: list[float]                 # per block: ‖X̂ − X‖ / ‖X‖ of its output on calibration data
    seconds: float
    notes: list[str] = field(default_factory=list)
    refinement: dict[int, dict] = field(default_factory=dict)   # block -> refiner's report (this run's blocks)
    bytes_written: list[int] = field(default_factory=list)       # per block: bytes of its work files (resume)
    work_dir: str | None = None          # where each block's factors were written (streamed: read them from here)
    streamed: bool = False               # blocks were loaded one at a time (`streaming.load_streamed`)
    streams_on: str = "device"           # where the activation streams lived: "device" or "host"
    peak_device_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated over the run


def _check_weight(name: str, W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise LrinferError(f"{name}: the weight holds {bad} NaN/Inf value(s); the model is corrupt "
                           "(re-download it or check how it was converted)")


@torch.no_grad()
def _spectra(source: BlockStreamer | InMemoryBlocks, streams, linears, progress: bool, device: torch.device
             ) -> dict[str, torch.Tensor]:
    """Singular values of W·L (L Lᵀ = XᵀX, dense inputs) for every linear: a dense pass for allocators."""
    out = {}
    by_block: dict[int, list] = {}
    for f in linears:
        by_block.setdefault(f.block, []).append(f)
    for i in tqdm(range(len(source.blocks)), desc="spectra", unit="block", disable=not progress):
        block = source.load_block(i)
        rel = {f.name[len(f"{source.prefix}.{i}."):]: f.name for f in by_block.get(i, [])}
        if rel:
            stats, dense_out = collect_stats(block, list(rel), frozenset({"gram"}), streams, streams.calls[i],
                                             {}, rel, device=device)
            for r, s in stats.items():
                W = block.get_submodule(r).weight.double()
                _check_weight(s.name, W)
                out[s.name] = singular_values(factor_gram(s.gram, name=s.name).right(W)).cpu()
            del stats
        else:
            dense_out = run_block(block, streams.dense, streams.calls[i], device)
        streams.dense = dense_out
        source.release_block(i)
    return out


def _streams_device(model, config, device: torch.device, streams: str, streaming: bool) -> torch.device:
    """Where the activation streams live: the compute device, or the host when asked or (streams="auto")
    when the memory plan does not fit them on the device."""
    host = torch.device("cpu")
    check_streams(streams)
    if device.type == "cpu" or streams == "device":
        return device
    if streams == "host":
        return host
    free, _ = available_memory(device)
    if free is None:
        return device
    if device.type == "cuda":
        free += torch.cuda.memory_allocated(device)     # what this process already holds is in the plan
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    plan = estimate(model.config, n_samples=config.n_samples, seq_len=config.seq_len,
                    batch_size=config.batch_size, dtype=dtype, method=config.method, ratio=config.ratio,
                    device=str(device), streaming=streaming, device_free=free)
    return device if plan.streams_on == "device" else host


def compress(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor, progress: bool = True,
             work_dir: str | None = None, resume: bool = False, device: str | torch.device | None = None,
             streams: str = "auto") -> CompressionResult:
    """Compress `model` in place: every selected `nn.Linear` becomes a `LowRankLinear`.

    calib_ids [n_samples, seq_len] token ids. Blocks run one at a time where the model's weights are
    (`device`, when given, must be that place). With `work_dir`, progress is saved after every block;
    `resume=True` continues from it (the model must be the same dense model), giving the same result,
    bit for bit, as one run. streams: where the two activation streams live, "device", "host", or
    "auto" (on the device when the memory plan fits them there, else on the host).

    The blocks come from `streaming.block_source(model)`. A model from `streaming.load_streamed` (weights
    on meta) has each block's weights read from the shards when it is reached and freed once its factors
    are in `work_dir` (a temporary directory when None; `result.work_dir`): its `LowRankLinear`s stay on
    meta and `result.factors` is empty. Either way, `streaming.save_compressed` writes the checkpoint.
    """
    t0 = time.perf_counter()
    check_architecture(model)
    solver = get_solver(config.method)
    source = block_source(model)
    linears = compressible_linears(model, config.modules)
    if source.streamed and config.needs_backward:
        raise LrinferError(f"{config.method} / {config.allocation} back-propagates through the whole model (gradient "
                           "statistics), so it cannot stream one block at a time; load the model whole "
                           "(lrinfer compress --no-stream, or load_model(..., stream=False))")
    asked = torch.device(device) if device is not None else source.device
    both_indexed = asked.index is not None and source.device.index is not None   # "cuda" matches any cuda:N
    if asked.type != source.device.type or (both_indexed and asked.index != source.device.index):
        raise LrinferError(f"compress: the model's blocks run on {source.device}, not {device}; move the model "
                           "there (or load it there), or leave device unset")
    device = source.device
    stream_device = _streams_device(model, config, device, streams, source.streamed)
    if source.streamed and work_dir is None:     # its factors go to disk, never to memory
        work_dir = tempfile.mkdtemp(prefix="lrinfer-work-")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    work = WorkDir(work_dir, fingerprint(config.to_dict(), calib_ids, linears)) if work_dir else None
    saved = work.load(factors=not source.streamed) if (work and resume) else None
    if work and not saved:
        work.start()

    grad_grams: dict[str, torch.Tensor] = {}
    if saved:
        ranks = saved.ranks
    else:
        selected, inner_ratio = get_selection(config.selection)(
            linears, config.ratio, **config.selection_options)
        allocator = get_allocator(config.allocation)
        spectra = None
        if allocator.needs_spectra:
            streams_ = _place(capture_inputs(model, source.blocks, calib_ids, config.batch_size, device),
                              stream_device)
            spectra = _spectra(source, streams_, selected, progress, device)
            del streams_
        sensitivity = ()
        if allocator.needs_sensitivity:
            names = [f.name for f in selected]
            if "grad_gram" in solver.needs:   # one backward serves both: the energies are the Grams' traces
                grad_grams = output_gradient_grams(model, names, calib_ids, 1)
            sensitivity = (output_gradient_energy(model, names, calib_ids, 1, grad_grams or None),)
        ranks = allocator(selected, inner_ratio, config.rank_multiple, spectra, *sensitivity,
                          **config.allocation_options)
    fisher = (fisher_information(model, list(ranks), calib_ids, config.batch_size)   # squares per batch:
              if "fisher" in solver.needs else {})                                  # the batch matters
    # output gradients one sequence at a time: per-token gradients of the summed NLL, so the same Grams,
    # without a batch of activations kept for the backward (SmolLM2, 8 × 512 tokens: peak RSS 9.36 GiB
    # at batch 8, 2.86 GiB at batch 1; CPU time 50.0 → 42.6 s)
    if "grad_gram" in solver.needs and not grad_grams:
        grad_grams = output_gradient_grams(model, list(ranks), calib_ids, 1)
    grad_grams = {n: g for n, g in grad_grams.items() if n in ranks}   # linears left dense need none

    with torch.no_grad():
        streams = _place(capture_inputs(model, source.blocks, calib_ids, config.batch_size, device), stream_device)
        factors: dict[str, FactorPair] = {}
        out_ranks: dict[str, list[int]] = {}
        hidden_error: list[float] = []
        refinement: dict[int, dict] = {}
        bytes_written: list[int] = []
        start = 0
        if saved:
            if source.streamed:   # finished blocks stay on disk; the skeleton learns their shapes
                skeleton(model, CheckpointSpec(saved.factor_ranks), str(work_dir))
            for name, pair in saved.factors.items():     # in memory: the finished blocks' factors
                lin = model.get_submodule(name)
                new = LowRankLinear.from_factors(pair.to(device), lin.bias)
                replace_module(model, name, new)
                factors[name] = new.factors()
            out_ranks.update(saved.factor_ranks)
            hidden_error = saved.hidden_error
            bytes_written = list(saved.bytes_written)
            streams.dense = [t.to(stream_device) for t in saved.dense]
            streams.compressed = (list(streams.dense) if saved.compressed is saved.dense
                                  else [t.to(stream_device) for t in saved.compressed])
            start = saved.next_block
        bar = tqdm(range(len(source.blocks)), desc=f"compress ({config.method})", unit="block", initial=start,
                   disable=not progress)
        for i in range(start, len(source.blocks)):
            block = source.load_block(i)
            rel = {f.name[len(f"{source.prefix}.{i}."):]: f.name for f in linears if f.block == i and f.name in ranks}
            done, refined = _compress_block(block, rel, streams, streams.calls[i], solver, config, ranks, fisher,
                                            bar, device, grad_grams)
            out_ranks.update({n: [p.rank, p.rank2] for n, p in done.items()})
            if not source.streamed:
                factors.update(done)
            if refined:
                refinement[i] = refined
            hidden_error.append(_relative_error(streams.compressed, streams.dense))
            if work:
                bytes_written.append(work.save_block(i, done, ranks, hidden_error, streams.dense,
                                                     streams.compressed, bytes_written))
            del done
            source.release_block(i)
            bar.update(1)
        bar.close()
    model.train(was_training)
    out_ranks = {f.name: out_ranks[f.name] for f in linears if f.name in out_ranks}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return CompressionResult(factors, out_ranks, linears, hidden_error, time.perf_counter() - t0,
                             refinement=refinement, bytes_written=bytes_written,
                             work_dir=str(work_dir) if work_dir else None, streamed=source.streamed,
                             streams_on="host" if stream_device != device else "device", peak_device_bytes=peak)


def _place(streams, device: torch.device):
    """Move freshly captured streams to `device` (both lists share their tensors until they differ);
    host streams of a CUDA run are pinned, for faster copies to the device."""
    if streams.dense and streams.dense[0].device != device:
        moved = [t.to(device) for t in streams.dense]
        if device.type == "cpu" and torch.cuda.is_available():
            moved = [t.pin_memory() for t in moved]
        streams.dense, streams.compressed = moved, list(moved)
    return streams


def _relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """‖approx − exact‖_F / ‖exact‖_F over all batches."""
    num = sum(float((a - e).double().pow(2).sum()) for a, e in zip(approx, exact))
    den = sum(float(e.double().pow(2).sum()) for e in exact)
    return (num / max(den, 1e-300)) ** 0.5


def _compress_block(block, rel: dict[str, str], streams, calls, solver, config, ranks, fisher, bar,
                    device: torch.device | None = None, grad_grams: dict | None = None) -> tuple[dict[str, FactorPair], dict]:
    """Solve and patch the block's linears (`rel`: name in block -> qualified name), stage by stage,
    refine them, then advance both streams through the block. Returns the block's factors and the
    refiner's report ({} without refinement)."""
    factors: dict[str, FactorPair] = {}
    dense_out = None
    originals: dict[str, nn.Module] = {}
    if rel:
        modules = {r: block.get_submodule(r) for r in rel}
        stages = (linear_stages(block, modules, to_device(streams.compressed[0], device), calls[0])
                  if solver.needs_compressed_stream else [list(rel)])
        for stage in stages:
            stats, out = collect_stats(block, stage, solver.needs, streams, calls, originals, rel,
                                       dense_outputs=dense_out is None, device=device)
            dense_out = dense_out if dense_out is not None else out
            for r in stage:
                name, lin = rel[r], modules[r]
                W = lin.weight.detach().double()
                _check_weight(name, W)
                if name in fisher:
                    stats[r].fisher = fisher.pop(name).to(W.device)
                if grad_grams and name in grad_grams:
                    stats[r].grad_gram = grad_grams.pop(name).to(W.device)
                pair = solver(W, stats[r], ranks[name], **config.method_options).balanced().to(lin.weight.dtype)
                if not all(torch.isfinite(t).all() for t in pair.tensors().values()):
                    raise LrinferError(f"{name}: solver '{config.method}' produced NaN/Inf factors in "
                                       f"{lin.weight.dtype}; try more calibration samples, another method, "
                                       "or float32")
                new = LowRankLinear.from_factors(pair, lin.bias)
                originals[r] = replace_module(block, r, new)
                factors[name] = new.factors()      # the module's own tensors: no second copy
                del pair
                bar.set_postfix_str(r)
            del stats                              # before the next stage's statistics are summed
    refined = {}
    if originals and config.refinement != "none":
        modules = {r: block.get_submodule(r) for r in originals}
        bar.set_postfix_str(f"refine ({config.refinement})")
        refined = get_refiner(config.refinement)(block, modules, streams.compressed, dense_out, calls,
                                                 **config.refinement_options)
        for r, m in modules.items():   # the refined factors, balanced again for the cast to 16 bits
            pair = m.factors().balanced()
            factors[rel[r]] = pair
            for name, t in pair.tensors().items():
                getattr(m, name).data.copy_(t)
    if dense_out is None:
        with swapped_in(block, originals):
            dense_out = run_block(block, streams.dense, calls, device)
    same = all(c is d for c, d in zip(streams.compressed, streams.dense))
    streams.dense = dense_out
    if same and not originals:
        streams.compressed = list(dense_out)
    else:      # in place: each batch's old input is freed as its output is made
        for b, call in enumerate(calls):
            streams.compressed[b] = run_block(block, [streams.compressed[b]], [call], device)[0]
    return factors, refined
