"""`compress(model, config, calib_ids)`: selection → allocation → block by block: calibration, solving, refinement."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import get_allocator
from .calibration import (capture_inputs, collect_stats, fisher_information, linear_stages, run_block,
                          swapped_in)
from .errors import LrinferError
from .factors import FactorPair, check_ratio
from .models import check_architecture, compressible_linears, decoder_blocks
from .nn import LowRankLinear, replace_module
from .refinement import get_refiner
from .resume import WorkDir, fingerprint
from .selection import get_selection
from .solvers import get_solver
from .solvers.linalg import whitener

log = logging.getLogger(__name__)

CONFIG_VERSION = 1


@dataclass
class CompressConfig:
    """Everything that decides a compression. Defaults are the CLI's defaults.

    method: solver name (svd, svdllm, ...); ratio: fraction of the compressible linears'
    parameters removed, in (0, 1); selection / allocation: which linears, and how the budget is
    spread; rank_multiple: ranks are rounded to its nearest multiple (tensor-core friendly); modules: restrict
    to these linear names (e.g. ["q_proj", "down_proj"]); calibration: source, samples, length, seed.
    """
    method: str = "svdllm"
    ratio: float = 0.2
    selection: str | None = None        # None: the method's own default (e.g. ResSVD's last layers)
    allocation: str = "uniform"
    rank_multiple: int = 8
    modules: list[str] | None = None
    calib: str = "wikitext2"
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    method_options: dict = field(default_factory=dict)
    selection_options: dict = field(default_factory=dict)
    allocation_options: dict = field(default_factory=dict)
    refinement: str = "none"            # after each block is solved (lrinfer/refinement/)
    refinement_options: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        check_ratio(self.ratio)
        solver = get_solver(self.method)
        self.selection = self.selection or solver.selection
        for what, method, opts in (("solver", solver, self.method_options),
                                   ("selection", get_selection(self.selection), self.selection_options),
                                   ("allocation", get_allocator(self.allocation), self.allocation_options),
                                   ("refinement", get_refiner(self.refinement), self.refinement_options)):
            method.check(opts, f"{what} '{method.name}'")
        for name in ("rank_multiple", "n_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LrinferError(f"{name} must be >= 1; got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CompressionResult:
    factors: dict[str, FactorPair]            # qualified name -> factors (model dtype)
    ranks: dict[str, list[int]]               # name -> [rank, residual rank]
    linears: list                             # every compressible LinearInfo
    hidden_error: list[float]                 # per block: ‖X̂ − X‖ / ‖X‖ of its output on calibration data
    seconds: float
    notes: list[str] = field(default_factory=list)
    refinement: dict[int, dict] = field(default_factory=dict)   # block -> refiner's report (this run's blocks)


def _check_weight(name: str, W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise LrinferError(f"{name}: the weight holds {bad} NaN/Inf value(s); the model is corrupt "
                           "(re-download it or check how it was converted)")


@torch.no_grad()
def _spectra(model, blocks, streams, linears, prefix, progress) -> dict[str, torch.Tensor]:
    """Singular values of W·L (L Lᵀ = XᵀX, dense inputs) for every linear: a dense pass for allocators."""
    out = {}
    by_block: dict[int, list] = {}
    for f in linears:
        by_block.setdefault(f.block, []).append(f)
    for i, block in enumerate(tqdm(blocks, desc="spectra", unit="block", disable=not progress)):
        rel = {f.name[len(f"{prefix}.{i}."):]: f.name for f in by_block.get(i, [])}
        if rel:
            stats, dense_out = collect_stats(block, list(rel), frozenset({"gram"}), streams, streams.calls[i],
                                             {}, rel)
            for r, s in stats.items():
                W = block.get_submodule(r).weight.double()
                _check_weight(s.name, W)
                L, _ = whitener(s.gram, name=s.name)
                out[s.name] = torch.linalg.svdvals(W @ L)
        else:
            dense_out = run_block(block, streams.dense, streams.calls[i])
        streams.dense = dense_out
    return out


def compress(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor, progress: bool = True,
             work_dir: str | None = None, resume: bool = False) -> CompressionResult:
    """Compress `model` in place: every selected `nn.Linear` becomes a `LowRankLinear`.

    calib_ids [n_samples, seq_len] token ids. Blocks run one at a time on the model's device.
    With `work_dir`, progress is saved after every block; `resume=True` continues from it (the
    model must be the same dense model), giving the same result, bit for bit, as one run.
    """
    t0 = time.perf_counter()
    check_architecture(model)
    solver = get_solver(config.method)
    prefix, blocks = decoder_blocks(model)
    linears = compressible_linears(model, config.modules)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    work = WorkDir(work_dir, fingerprint(config.to_dict(), calib_ids, linears)) if work_dir else None
    saved = work.load() if (work and resume) else None
    if work and not saved:
        work.start()

    if saved:
        ranks = saved.ranks
    else:
        selected, inner_ratio = get_selection(config.selection)(
            linears, config.ratio, **config.selection_options)
        allocator = get_allocator(config.allocation)
        spectra = None
        if allocator.needs_spectra:
            streams = capture_inputs(model, blocks, calib_ids, config.batch_size, device)
            spectra = _spectra(model, blocks, streams, selected, prefix, progress)
        ranks = allocator(selected, inner_ratio, config.rank_multiple, spectra, **config.allocation_options)
    fisher = (fisher_information(model, list(ranks), calib_ids, config.batch_size)
              if "fisher" in solver.needs else {})

    with torch.no_grad():
        streams = capture_inputs(model, blocks, calib_ids, config.batch_size, device)
        factors: dict[str, FactorPair] = {}
        hidden_error: list[float] = []
        refinement: dict[int, dict] = {}
        start = 0
        if saved:
            for name, pair in saved.factors.items():
                lin = model.get_submodule(name)
                replace_module(model, name, LowRankLinear.from_factors(pair.to(device), lin.bias))
            factors.update(saved.factors)
            hidden_error = saved.hidden_error
            streams.dense = [t.to(device) for t in saved.dense]
            streams.compressed = [t.to(device) for t in saved.compressed]
            start = saved.next_block
        bar = tqdm(range(len(blocks)), desc=f"compress ({config.method})", unit="block", initial=start,
                   disable=not progress)
        for i in range(start, len(blocks)):
            rel = {f.name[len(f"{prefix}.{i}."):]: f.name for f in linears if f.block == i and f.name in ranks}
            done, refined = _compress_block(blocks[i], rel, streams, streams.calls[i], solver, config, ranks, fisher,
                                            bar)
            factors.update(done)
            if refined:
                refinement[i] = refined
            hidden_error.append(_relative_error(streams.compressed, streams.dense))
            if work:
                work.save_block(i, done, ranks, hidden_error, streams.dense, streams.compressed)
            bar.update(1)
        bar.close()
    model.train(was_training)
    out_ranks = {n: [p.rank, p.rank2] for n, p in factors.items()}
    return CompressionResult(factors, out_ranks, linears, hidden_error, time.perf_counter() - t0,
                             refinement=refinement)


def _relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """‖approx − exact‖_F / ‖exact‖_F over all batches."""
    num = sum(float((a - e).double().pow(2).sum()) for a, e in zip(approx, exact))
    den = sum(float(e.double().pow(2).sum()) for e in exact)
    return (num / max(den, 1e-300)) ** 0.5


def _compress_block(block, rel: dict[str, str], streams, calls, solver, config, ranks, fisher, bar
                    ) -> tuple[dict[str, FactorPair], dict]:
    """Solve and patch the block's linears (`rel`: name in block -> qualified name), stage by stage,
    refine them, then advance both streams through the block. Returns the block's factors and the
    refiner's report ({} without refinement)."""
    factors: dict[str, FactorPair] = {}
    dense_out = None
    originals: dict[str, nn.Module] = {}
    if rel:
        modules = {r: block.get_submodule(r) for r in rel}
        stages = (linear_stages(block, modules, streams.compressed[0], calls[0])
                  if solver.needs_compressed_stream else [list(rel)])
        for stage in stages:
            stats, out = collect_stats(block, stage, solver.needs, streams, calls, originals, rel,
                                       dense_outputs=dense_out is None)
            dense_out = dense_out if dense_out is not None else out
            for r in stage:
                name, lin = rel[r], modules[r]
                W = lin.weight.detach().double()
                _check_weight(name, W)
                if name in fisher:
                    stats[r].fisher = fisher.pop(name).to(W.device)
                pair = solver(W, stats[r], ranks[name], **config.method_options).balanced().to(lin.weight.dtype)
                if not all(torch.isfinite(t).all() for t in pair.tensors().values()):
                    raise LrinferError(f"{name}: solver '{config.method}' produced NaN/Inf factors in "
                                       f"{lin.weight.dtype}; try more calibration samples, another method, "
                                       "or float32")
                factors[name] = pair
                originals[r] = replace_module(block, r, LowRankLinear.from_factors(pair, lin.bias))
                bar.set_postfix_str(r)
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
            dense_out = run_block(block, streams.dense, calls)
    same = all(c is d for c, d in zip(streams.compressed, streams.dense))
    comp_out = dense_out if (same and not originals) else run_block(block, streams.compressed, calls)
    streams.dense, streams.compressed = dense_out, comp_out
    return factors, refined
