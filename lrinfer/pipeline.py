"""`run(job)`: what `lrinfer compress` does, as one call. It plans the memory (and refuses before any
weight is read when the device cannot hold it), loads the model whole or one decoder block at a time,
compresses it (or first searches recipes, `SearchOptions`), measures perplexity of the dense and the
compressed model, writes the checkpoint and its `report.json`, and removes the work directory.

    from lrinfer import CompressConfig
    from lrinfer.pipeline import CompressJob, run
    result = run(CompressJob(model="path/to/hf-dir", out="out/s20", config=CompressConfig(ratio=0.2)))
    result.path, result.report["ppl"]["ppl"]

The CLI (`lrinfer compress`) maps its flags onto `CompressJob` and prints; its defaults are these.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from lrinfer.data import resolve_data_dir
from lrinfer.errors import LrinferError
from lrinfer.evaluation.generate import has_chat_template
from lrinfer.evaluation.perplexity import PerplexityConfig, text_perplexities
from lrinfer.offline.calibration_data import NEEDS_MODEL, calibration_batch, calibration_split, resolve_calib
from lrinfer.offline.compress import CompressionResult, compress
from lrinfer.offline.config import CompressConfig
from lrinfer.offline.plan import MemoryPlan, check_streams, compress_plan, peak_rss
from lrinfer.offline.recipe import (Recipe, Screening, SearchResult, apply_result, check_candidates,
                                   default_candidates, search)
from lrinfer.offline.report import compression_report, dir_bytes, unique_params
from lrinfer.offline.resume import WorkDir
from lrinfer.offline.solvers.linalg import collect_fallbacks
from lrinfer.runtime.checkpoint import CheckpointSpec, atomic_write_bytes, prepare_out_dir, save_dtype
from lrinfer.runtime.models import DEFAULT_MODEL, load_dtype, load_model, resolve_device, torch_dtype
from lrinfer.runtime.streaming import as_written, block_source, save_compressed

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    """The recipe search (`lrinfer compress --method auto`): `candidates` are recipes (specs such as
    "saes@last:cap=0.3", or `Recipe`s; None: `default_candidates(ratio)`), each scored by perplexity on
    `heldout` calibration windows held apart from the rest; `screening` is the cheap first round
    (None: every candidate compressed in full)."""
    candidates: list[str | Recipe] | None = None
    heldout: int = 8
    screening: Screening | None = Screening()

    def recipes(self) -> list[Recipe] | None:
        """The candidates as `Recipe`s (None: the default set)."""
        if self.candidates is None:
            return None
        return [c if isinstance(c, Recipe) else Recipe.parse(c) for c in self.candidates]


@dataclass
class CompressJob:
    """One compression, as `lrinfer compress` runs it.

    model: a Hugging Face directory, a .gguf file, a hub id, or None (the packaged SmolLM2-135M).
    out: the checkpoint directory (None: out/<model>-<method>-<ratio>, method "auto" for a search).
    config: the compression; with `search`, the base every candidate recipe starts from.
    search: None compresses with `config`; `SearchOptions` chooses a recipe first (--method auto).
    device: "cpu", "cuda", "cuda:1", ... (None: cuda when available).
    compute_dtype: what the model is loaded and calibrated in (None: float32 on the CPU, else as loaded).
    dtype: what the checkpoint is written in (None: the source's own 16-bit dtype, else bfloat16).
    stream: read a safetensors directory one decoder block at a time (False: whole; GGUF files, hub
      ids, gradient solvers, chat calibration and the search always read the whole model).
    streams: where the two activation streams live: "auto" (on the device when the memory plan fits
      them there), "device" or "host".
    evaluation: perplexity of the dense and the compressed model (None: skipped).
    resume: continue an interrupted run of the same job (its progress is kept beside `out`).
    overwrite: replace `out` even when it holds another model's checkpoint.
    data_dir: local data (WikiText-2, PIQA; None: $LRINFER_DATA_DIR or ../shared/data).
    """
    model: str | None = None
    out: str | Path | None = None
    config: CompressConfig = field(default_factory=CompressConfig)
    search: SearchOptions | None = None
    device: str | None = None
    compute_dtype: str | torch.dtype | None = None
    dtype: str | torch.dtype | None = None
    stream: bool = True
    streams: str = "auto"
    evaluation: PerplexityConfig | None = PerplexityConfig()
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    data_dir: str | Path | None = None

    def out_dir(self) -> Path:
        """`out`, or out/<model>-<method>-<ratio> (method "auto" for a search)."""
        if self.out is not None:
            return Path(self.out)
        method = "auto" if self.search is not None else self.config.method
        return Path(f"out/{Path(self.model or DEFAULT_MODEL).stem}-{method}-{self.config.ratio:g}")


@dataclass
class PipelineResult:
    path: Path        # the checkpoint directory
    report: dict      # what path/report.json holds


def run(job: CompressJob, show_plan: Callable[[MemoryPlan], None] | None = None) -> PipelineResult:
    """Compress `job.model` and write the checkpoint `job.out_dir()` with its report.json.
    show_plan(plan) receives the memory plan before any weight is read (default: logged)."""
    show_plan = show_plan or (lambda plan: log.info("%s", "\n".join(plan.lines())))
    check_streams(job.streams)
    out, ev = job.out_dir(), job.evaluation
    out_dtype = torch_dtype(job.dtype) if job.dtype is not None else None   # checked before the model loads
    candidates = _candidates(job)
    model, tok, source, plan = _plan_and_load(job, candidates, show_plan)
    blocks = block_source(model)
    config = replace(job.config, calib=resolve_calib(job.config.calib, tok, can_generate=not blocks.streamed))
    prepare_out_dir(out, source, job.overwrite)              # fail before the long work, not after
    data_dir = resolve_data_dir(job.data_dir)
    if ev is not None:                                       # tokenized once, for both models
        windows = ev.token_windows(tok, data_dir)
        ppl_dense = text_perplexities(model, tok, ev, progress=job.progress, windows=windows)
    dense_params = unique_params(model)
    work_dir = out.parent / f".{out.name}.work"
    with collect_fallbacks() as fallbacks:
        used, result, calib_desc, found = _compress_or_search(job, model, tok, config, candidates, data_dir,
                                                              work_dir, plan.streams_on)
    out_dtype = out_dtype or save_dtype(model, source)
    report = compression_report(used, result, source, dense_params, unique_params(model), calib_desc)
    report["calibration"]["requested"] = job.config.calib
    report.update(fallbacks=fallbacks, dtype=str(out_dtype).removeprefix("torch."), memory_plan=plan.to_dict(),
                  streamed=blocks.streamed, streams_on=result.streams_on, peak_device_bytes=result.peak_device_bytes,
                  resume={"bytes_per_block": result.bytes_written, "bytes_total": sum(result.bytes_written)},
                  **({"recipe_search": found.report()} if found else {}))
    spec = CheckpointSpec.of_compression(used, result.ranks, **({"recipe_search": {
        "chosen": found.best.label, "criterion": found.criterion}} if found else {}))
    save_compressed(model, tok, out, spec, base_model=source, factor_dir=result.work_dir, overwrite=job.overwrite,
                    dtype=out_dtype)
    if ev is not None:                                       # the model as written, in the checkpoint's dtype
        ppl = text_perplexities(model, tok, ev, progress=job.progress, streamer=as_written(model, out, out_dtype),
                                windows=windows)
        for e in ppl.values():
            e["weights"] = f"stored in {report['dtype']}, computed in {str(blocks.dtype).removeprefix('torch.')}"
        # ppl / ppl_dense: the first text's; *_by_data: every text of --data
        report.update(ppl_dense=next(iter(ppl_dense.values())), ppl_dense_by_data=ppl_dense,
                      ppl=next(iter(ppl.values())), ppl_by_data=ppl)
    report.update(peak_host_bytes=peak_rss(), out=str(out), bytes_on_disk=dir_bytes(out))
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    WorkDir(work_dir, "").remove()
    return PipelineResult(out, report)


def _plan_and_load(job: CompressJob, candidates: list[Recipe] | None, show_plan: Callable[[MemoryPlan], None]):
    """The memory plan (shown, and checked before any weight is read when the source's config.json is at
    hand), then the model, read whole or block by block. Returns (model, tokenizer, source, plan)."""
    device = resolve_device(job.device)
    dtype = load_dtype(job.compute_dtype, device)
    ev = job.evaluation
    eval_kw = {} if ev is None else {"eval_windows": ev.windows or 64, "eval_seq_len": ev.seq_len,
                                     "eval_batch_size": ev.batch_size}
    stream = _read_block_by_block(job, device, dtype, eval_kw)
    plan = _largest_plan(job, candidates, device, dtype, stream, **eval_kw)
    if plan is not None:
        show_plan(plan)
        plan.check()
    model, tok, source = load_model(job.model, dtype, device, stream=stream)
    blocks = block_source(model)
    if plan is None or plan.streaming != blocks.streamed:    # now from the loaded model's config
        plan = _largest_plan(job, candidates, device, blocks.dtype, blocks.streamed, model_config=model.config,
                             **eval_kw)
        show_plan(plan)
    return model, tok, source, plan


def _largest_plan(job: CompressJob, candidates: list[Recipe] | None, device, dtype, stream: bool,
                  **kw) -> MemoryPlan | None:
    """The memory plan of the compression; of a search (`candidates`, from `_candidates`), the plan of
    its largest candidate (noted)."""
    if candidates is None:
        return compress_plan(job.model, job.config, device, dtype, stream, job.streams, **kw)
    plans = [compress_plan(job.model, c.config(job.config), device, dtype, stream, job.streams, **kw)
             for c in candidates]
    if not plans or plans[0] is None:
        return None
    plan = max(plans, key=lambda p: (p.device_peak, p.host_peak))
    plan.notes.append(f"the recipe search's largest candidate ({plan.method}) of {len(plans)}")
    return plan


def _candidates(job: CompressJob) -> list[Recipe] | None:
    """The search's candidate recipes (its own, or `default_candidates(ratio)`), checked against the base
    config; None without a search."""
    if job.search is None:
        return None
    if job.search.heldout < 1:
        raise LrinferError(f"the recipe search scores recipes on held-apart windows: heldout must be >= 1 "
                           f"(--heldout); got {job.search.heldout}")
    candidates = job.search.recipes() or default_candidates(job.config.ratio)
    check_candidates(candidates, job.config, job.config.n_samples)
    return candidates


def _read_block_by_block(job: CompressJob, device: str, dtype: torch.dtype | None, eval_kw: dict) -> bool:
    """Whether to ask `load_model` to stream (only a local safetensors directory then streams): not for
    the search, gradient solvers or allocations, or calibration text the model writes itself (they need the whole model);
    `--calib auto` on a model with a chat template streams only when the whole model would not fit."""
    config = job.config
    if not job.stream or job.search is not None or config.calib in NEEDS_MODEL or config.needs_backward:
        return False
    if config.calib == "auto" and _dir_has_chat_template(job.model):
        whole = compress_plan(job.model, config, device, dtype, False, job.streams, **eval_kw)
        return whole is not None and not whole.fits
    return True


def _dir_has_chat_template(spec: str | None) -> bool:
    """A local model directory whose tokenizer has a chat template (read before any weight)."""
    if not spec or not Path(spec).expanduser().is_dir():
        return False
    from transformers import AutoTokenizer
    try:
        return has_chat_template(AutoTokenizer.from_pretrained(str(Path(spec).expanduser())))
    except (OSError, ValueError):
        return False


def _compress_or_search(job: CompressJob, model, tok, config: CompressConfig, candidates: list[Recipe] | None,
                        data_dir, work_dir: Path, streams: str
                        ) -> tuple[CompressConfig, CompressionResult, str, SearchResult | None]:
    """Compress `model` in place with `config`, or with the recipe a search chooses (`job.search`).
    Returns (the config used, its CompressionResult, the calibration text's description, the search)."""
    if job.search is None:
        calib, calib_desc = calibration_batch(tok, config.calib, config.n_samples, config.seq_len, config.seed,
                                              data_dir, model, job.progress)
        result = compress(model, config, calib, job.progress, work_dir=work_dir, resume=job.resume, streams=streams)
        return config, result, calib_desc, None
    calib, heldout, calib_desc = calibration_split(tok, config.calib, config.n_samples, config.seq_len,
                                                   job.search.heldout, config.seed, data_dir, model, job.progress)
    found = search(model, config, calib, heldout, candidates, work_dir=work_dir, resume=job.resume,
                   progress=job.progress, screening=job.search.screening)
    apply_result(model, found.result)
    return (found.best.config(config), found.result,
            calib_desc + " (plain text: first 90%; recipes scored on the last 10%)", found)
