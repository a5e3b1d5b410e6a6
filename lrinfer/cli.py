"""`lrinfer compress | eval | info`: a thin CLI over the Python API. Defaults come from `CompressConfig`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path

from . import cli_kernels
from .errors import LrinferError

_DEFAULTS = None


def _defaults() -> dict:
    global _DEFAULTS
    if _DEFAULTS is None:
        from lrinfer.offline.compress import CompressConfig
        _DEFAULTS = {f.name: f.default for f in fields(CompressConfig) if not callable(f.default_factory)}
    return _DEFAULTS


def _options(pairs: list[str] | None, flag: str) -> dict:
    """["beta=0.5", "mode=plain"] -> {"beta": 0.5, "mode": "plain"} (see `registry.parse_value`)."""
    from .registry import parse_value
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LrinferError(f"{flag} takes KEY=VALUE; got '{pair}'")
        out[key] = parse_value(value)
    return out


def _eval_args(p: argparse.ArgumentParser, data_default: str = "wikitext2") -> None:
    p.add_argument("--data", default=data_default,
                   help=f"evaluation texts, comma-separated (default {data_default}): wikitext2 (raw test split), "
                        "timemachine (a public-domain novel shipped with lrinfer; evaluation only), a .txt/.jsonl file")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--windows", type=int, default=16, help="number of non-overlapping windows; 0 = all (default 16)")
    p.add_argument("--eval-batch-size", type=int, default=4)


def _common(p: argparse.ArgumentParser, dtype_help: str = "compute dtype (default: the model's own)") -> None:
    p.add_argument("--data-dir", default=None,
                   help="local data directory (WikiText-2, PIQA); default $LRINFER_DATA_DIR or ../shared/data")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help=dtype_help)
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--verbose", action="store_true", help="print every log line (e.g. each layer's numerical fallback)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from lrinfer.offline.allocation.base import ALLOCATORS
    from lrinfer.offline.selection.base import SELECTIONS
    from lrinfer.offline.solvers.base import SOLVERS

    d = _defaults()
    parser = argparse.ArgumentParser(prog="lrinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and write a checkpoint directory")
    c.add_argument("--model", default=None, help="HF directory, .gguf file, hub id, or 'smollm2' (default)")
    c.add_argument("--method", default=d["method"], choices=sorted(SOLVERS) + ["auto"],
                   help=f"solver (default {d['method']}); auto: search recipes on held-apart calibration text")
    c.add_argument("--candidates", nargs="+", metavar="RECIPE", default=None,
                   help="--method auto: recipes to try instead of the default set, as "
                        "solver[:k=v,..][+allocation[:k=v,..]][@selection[:k=v,..]][~refinement[:k=v,..]][%%samples], "
                        "e.g. saes@last:cap=0.3 saes:beta_max=0.9+drank svdllm%%16")
    c.add_argument("--heldout", type=int, default=8,
                   help="--method auto: held-apart calibration windows that score each recipe (default 8)")
    c.add_argument("--screen", nargs=2, type=int, metavar=("SAMPLES", "KEEP"), default=None,
                   help="--method auto: proxies on SAMPLES calibration samples, the best KEEP compressed in full "
                        "(default 4 1; 4 2 costs about one more compression and found the better recipe at 40%%"
                        " on SmolLM2; 0 0: every candidate in full)")
    c.add_argument("--ratio", type=float, default=d["ratio"],
                   help=f"fraction of the linears' parameters removed, in (0, 1) (default {d['ratio']})")
    c.add_argument("--selection", default=None, choices=sorted(SELECTIONS),
                   help="which layers are compressed (default: the method's own)")
    c.add_argument("--allocation", default=d["allocation"], choices=sorted(ALLOCATORS),
                   help=f"rank allocation (default {d['allocation']})")
    from lrinfer.offline.refinement.base import REFINERS
    c.add_argument("--refinement", default=d["refinement"], choices=list(REFINERS),
                   help=f"after each block is solved (default {d['refinement']}; blockfit: AA-SVD-style local refinement)")
    c.add_argument("--rank-multiple", type=int, default=d["rank_multiple"],
                   help=f"round ranks to the nearest multiple of this (default {d['rank_multiple']})")
    c.add_argument("--modules", default=None, help="comma-separated linear names to compress (default: all)")
    from lrinfer.offline.calibration_data import CHAT_MODEL_CALIB
    c.add_argument("--calib", default=d["calib"],
                   help=f"calibration text (default {d['calib']}: {CHAT_MODEL_CALIB} for a model with a chat template, "
                        "else wikitext2): wikitext2; chat (the model's own answers to shipped prompts through its "
                        "chat template); mix (half chat, half wikitext2); self; or a .txt/.jsonl file")
    c.add_argument("--samples", type=int, default=d["n_samples"], help=f"calibration samples (default {d['n_samples']})")
    c.add_argument("--calib-seq-len", type=int, default=d["seq_len"],
                   help=f"tokens per calibration sample (default {d['seq_len']})")
    c.add_argument("--seed", type=int, default=d["seed"])
    c.add_argument("--batch-size", type=int, default=d["batch_size"], help="calibration batch size")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE", help="solver option (repeatable)")
    c.add_argument("--selection-opt", action="append", metavar="KEY=VALUE", help="selection option")
    c.add_argument("--allocation-opt", action="append", metavar="KEY=VALUE", help="allocation option")
    c.add_argument("--refinement-opt", action="append", metavar="KEY=VALUE", help="refinement option")
    c.add_argument("--out", default=None, help="output directory (default out/<model>-<method>-<ratio>)")
    c.add_argument("--overwrite", action="store_true", help="replace --out even if it holds another model")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same arguments (progress is kept beside --out)")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity of dense and compressed models")
    c.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype the model is loaded and calibrated in (default: as loaded; a GGUF gives float32)")
    c.add_argument("--streams", default="auto", choices=["auto", "device", "host"],
                   help="where the two activation streams live (default auto: on the device when the memory "
                        "plan fits them there, else on the host)")
    c.add_argument("--no-stream", action="store_true",
                   help="load the whole model even from a safetensors directory (default: one decoder block "
                        "at a time)")
    _eval_args(c)
    _common(c, dtype_help="dtype of the written checkpoint (default: the source's own 16-bit dtype, else bfloat16)")

    e = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of a compressed directory or a dense model")
    e.add_argument("model", help="compressed directory, HF directory, .gguf file, hub id, or 'smollm2'")
    _eval_args(e)
    e.add_argument("--tasks", default=None,
                   help="comma-separated tasks: piqa (through lm-eval), chat (short questions through the chat "
                        "template, greedy: accuracy and empty answers)")
    e.add_argument("--chat-records", action="store_true",
                   help="--tasks chat: each question's answer and verdict in the JSON report")
    e.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (only --tasks)")
    _common(e)

    m = sub.add_parser("methods", help="every solver, rank allocation and layer selection, with its options")
    m.add_argument("--json", action="store_true")
    m.add_argument("--debug", action="store_true")

    i = sub.add_parser("info", help="describe a compressed directory")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--debug", action="store_true")

    from .evaluation import plot
    plot.add_parser(sub)
    _add_generate_bench(sub)
    _add_plan(sub)
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    """`lrinfer serve DIR`: vLLM's OpenAI-compatible server on a checkpoint (lrinfer/runtime/serve.py)."""
    s = sub.add_parser("serve", help="serve a compressed directory with vLLM's OpenAI-compatible server")
    s.add_argument("dir", help="compressed directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    s.add_argument("--debug", action="store_true", help="show tracebacks")
    s.add_argument("--vllm", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                   help="everything after it goes to vLLM's server, e.g. --vllm --dtype float32 --max-model-len 2048")


def cmd_serve(args) -> dict:
    import shlex

    from lrinfer.runtime.serve import serve
    cmd = serve(args.dir, args.host, args.port, args.vllm, dry_run=args.dry_run)   # execs unless --dry-run
    print(shlex.join(cmd))
    return {"command": cmd}


def _add_plan(sub) -> None:
    """`lrinfer plan`: the memory plan of a compression from a config alone (lrinfer/offline/plan.py)."""
    p = sub.add_parser("plan", help="peak device/host memory and resume disk of a compression, from a config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config.json (e.g. Llama-2-70B's)")
    src.add_argument("--model", help="a model directory holding config.json")
    p.add_argument("--method", default="svdllm")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the config's)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB the device holds (default: what this machine's device has free)")
    p.add_argument("--host-memory", type=float, default=None, help="GiB of host memory (default: available here)")
    p.add_argument("--streams", default="auto", choices=["auto", "device", "host"])
    p.add_argument("--no-stream", action="store_true", help="plan the whole model in memory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")


def cmd_plan(args) -> dict:
    from lrinfer.offline.plan import GiB, plan_for, read_config
    cfg = read_config(args.config or args.model)
    gib = lambda x: None if x is None else int(x * GiB)  # noqa: E731
    plan = plan_for(cfg, args.device, args.dtype, gib(args.device_memory), gib(args.host_memory),
                    n_samples=args.samples, seq_len=args.calib_seq_len, batch_size=args.batch_size,
                    method=args.method, ratio=args.ratio, streaming=not args.no_stream, streams=args.streams)
    if not args.json:
        print("\n".join(plan.lines()))
    return plan.to_dict()


def _print_plan(plan, args) -> None:
    """The memory plan's lines: the first output of `compress` (on stderr with --json)."""
    print("\n".join(plan.lines()), file=sys.stderr if args.json else sys.stdout, flush=True)


def _add_generate_bench(sub) -> None:
    """`lrinfer generate` and `lrinfer bench` (lrinfer/evaluation/generate.py, lrinfer/evaluation/benchmark.py)."""
    def device_args(p):
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
        p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    g = sub.add_parser("generate", help="complete a prompt with a compressed directory or a dense model")
    g.add_argument("model", help="compressed directory, HF directory, .gguf file, hub id, or 'smollm2'")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus mass (default 1.0: off)")
    g.add_argument("--seed", type=int, default=None, help="with --sample: random seed")
    device_args(g)

    b = sub.add_parser("bench", help="prefill/decode speed and memory: a compressed directory against its dense base")
    b.add_argument("dir", help="compressed directory")
    b.add_argument("--base", default=None, help="the dense model (default: base_model recorded in the checkpoint)")
    b.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    b.add_argument("--new-tokens", type=int, default=64, help="decode steps per run (default 64)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per side; the median is reported (default 5)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--cache", choices=["static", "dynamic"], default="static", help="KV cache (default static)")
    b.add_argument("--no-graphs", action="store_true", help="CUDA: eager forwards instead of CUDA graphs")
    device_args(b)

    cli_kernels.add_parser(sub)


def cmd_generate(args) -> dict:
    from lrinfer.evaluation.generate import check_options, generate
    from lrinfer.runtime.models import load_model

    device, dtype = _setup(args)
    check_options(args.max_new_tokens, args.sample, args.temperature, args.top_p)   # before the model loads
    model, tok, source = load_model(args.model, _compute_dtype(dtype, device), device)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    report = {"model": source, **generate(model, tok, args.prompt, args.max_new_tokens, raw=args.raw,
                                          sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                                          seed=args.seed, stream=stream)}
    if not args.json:
        print()
        print(f"[{report['tokens']} tokens in {report['seconds']:.2f} s, {report['finish_reason']}]", file=sys.stderr)
    return report


def cmd_bench(args) -> dict:
    import torch

    from lrinfer.evaluation.benchmark import compare, format_table, load_pair

    device, dtype = _setup(args)
    if args.threads is not None:
        if args.threads < 1:
            raise LrinferError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    dense, compressed, info = load_pair(args.dir, args.base, device, _compute_dtype(dtype, device))
    log = logging.getLogger("lrinfer.bench").info
    report = {**info, **compare(dense, compressed, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                                graphs=False if args.no_graphs else None, cache=args.cache, log=log)}
    if not args.json:
        print(f"{report['checkpoint']}: {report['method']} at ratio {report['ratio']} of {report['base_model']}")
        print(format_table(report))
    return report


def _setup(args):
    import torch
    verbose = getattr(args, "debug", False) or getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lrinfer").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return device, dtype


def _compute_dtype(dtype, device: str):
    """The dtype a model is loaded in: `dtype` when given; else float32 on the CPU (16-bit matmuls are
    slow and inexact there; a 16-bit checkpoint is upcast, exactly), the checkpoint's own elsewhere."""
    import torch
    return dtype if dtype is not None else (torch.float32 if device == "cpu" else None)


def _ppl(model, tok, args, data_dir, progress, streamer=None) -> tuple[dict, dict]:
    """Perplexity on each text of --data: (the first text's result, {text: result} for all of them)."""
    from .data import eval_sources
    from lrinfer.evaluation.perplexity import perplexities
    by_data = perplexities(model, tok, eval_sources(args.data), args.seq_len, args.windows or None,
                           args.eval_batch_size, data_dir, progress, streamer)
    return next(iter(by_data.values())), by_data


def cmd_compress(args) -> dict:
    import torch

    from lrinfer.runtime.checkpoint import CheckpointSpec, atomic_write_bytes, save_checkpoint, save_dtype
    from lrinfer.offline.compress import CompressConfig
    from .data import eval_sources, resolve_data_dir
    from lrinfer.runtime.models import load_model
    from lrinfer.offline.report import compression_report, dir_bytes, format_summary, unique_params
    from lrinfer.offline.solvers.linalg import collect_fallbacks

    device, out_dtype = _setup(args)
    eval_sources(args.data)   # a bad --data fails before the model loads
    dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    progress = not args.no_progress
    auto = args.method == "auto"
    config = CompressConfig(
        method="svdllm" if auto else args.method, ratio=args.ratio, selection=args.selection, allocation=args.allocation,
        rank_multiple=args.rank_multiple, modules=args.modules.split(",") if args.modules else None,
        calib=args.calib, n_samples=args.samples, seq_len=args.calib_seq_len, seed=args.seed,
        batch_size=args.batch_size, method_options=_options(args.opt, "--opt"),
        selection_options=_options(args.selection_opt, "--selection-opt"),
        allocation_options=_options(args.allocation_opt, "--allocation-opt"),
        refinement=args.refinement, refinement_options=_options(args.refinement_opt, "--refinement-opt"))
    candidates = None
    if args.candidates:
        if not auto:
            raise LrinferError("--candidates lists recipes for --method auto; add --method auto or drop it")
        from lrinfer.offline.recipe import Recipe, check_candidates
        candidates = [Recipe.parse(spec) for spec in args.candidates]
        check_candidates(candidates, config, config.n_samples)   # before the model loads
    if args.screen is not None:
        if not auto:
            raise LrinferError("--screen sets the search's screening round; add --method auto or drop it")
        _screening(args.screen)   # before the model loads
    out = Path(args.out or f"out/{Path(args.model or 'smollm2').stem}-{config.method}-{config.ratio:g}")
    from lrinfer.runtime.checkpoint import prepare_out_dir
    from lrinfer.offline.plan import compress_plan, peak_rss
    from lrinfer.offline.solvers.base import get_solver
    from lrinfer.runtime.streaming import streamer_of
    from lrinfer.offline.calibration_data import NEEDS_MODEL, resolve_calib
    stream = (not args.no_stream and not auto and config.calib not in NEEDS_MODEL    # these need the whole model
              and not get_solver(config.method).needs_backward)
    eval_kw = {} if args.no_eval else {"eval_windows": args.windows or 64, "eval_seq_len": args.seq_len,
                                       "eval_batch_size": args.eval_batch_size}
    if stream and config.calib == "auto" and _dir_has_chat_template(args.model):
        # chat calibration needs the whole model to write its conversations: load it whole when that fits
        whole = compress_plan(args.model, config, device, _compute_dtype(dtype, device), False, args.streams,
                              **eval_kw)
        stream = whole is not None and not whole.fits
    plan = compress_plan(args.model, config, device, _compute_dtype(dtype, device), stream, args.streams,
                         **eval_kw)   # before any weight is read
    if plan is not None:
        _print_plan(plan, args)
        plan.check()
    model, tok, source = load_model(args.model, _compute_dtype(dtype, device), device, stream=stream)
    streamed = streamer_of(model) is not None
    requested_calib = config.calib
    config = replace(config, calib=resolve_calib(config.calib, tok, can_generate=not streamed))
    if plan is None or plan.streaming != streamed:
        plan = compress_plan(args.model, config, device, next(model.parameters()).dtype, streamed, args.streams,
                             model_config=model.config, **eval_kw)
        _print_plan(plan, args)
    args.streams = plan.streams_on
    prepare_out_dir(out, source, args.overwrite)   # fail before the long work, not after
    data_dir = resolve_data_dir(args.data_dir)
    extra = {}
    if not args.no_eval:
        extra["ppl_dense"], extra["ppl_dense_by_data"] = _ppl(model, tok, args, data_dir, progress)
    dense_params = unique_params(model)
    work_dir = out.parent / f".{out.name}.work"
    with collect_fallbacks() as fallbacks:
        config, result, calib_desc, search = _compress_or_search(args, model, tok, config, candidates, data_dir,
                                                                 work_dir, progress)
    out_dtype = out_dtype or save_dtype(model, source)
    report = compression_report(config, result, source, dense_params, unique_params(model), calib_desc)
    report.update(extra, fallbacks=fallbacks, dtype=str(out_dtype).removeprefix("torch."))
    report["calibration"]["requested"] = requested_calib
    if search:
        report["recipe_search"] = search.report()
    report.update(memory_plan=plan.to_dict(), streamed=streamed, streams_on=result.streams_on,
                  peak_device_bytes=result.peak_device_bytes,
                  resume={"bytes_per_block": result.bytes_written, "bytes_total": sum(result.bytes_written)})
    if not args.no_eval and not streamed:   # the model as it is written: weights rounded to the checkpoint's dtype
        _round_weights(model, out_dtype)
        report["ppl"], report["ppl_by_data"] = _ppl(model, tok, args, data_dir, progress)
        for e in report["ppl_by_data"].values():
            e["weights"] = f"stored in {report['dtype']}, computed in {next(model.parameters()).dtype}"
    spec = CheckpointSpec.of_compression(config, result.ranks, **({"recipe_search": {
        "chosen": search.best.label, "criterion": search.criterion}} if search else {}))
    if streamed:   # written tensor by tensor; perplexity then reads the checkpoint back block by block
        from lrinfer.runtime.streaming import checkpoint_streamer, save_streamed_checkpoint
        save_streamed_checkpoint(model, tok, out, spec, base_model=source, factor_dir=result.work_dir,
                                 overwrite=args.overwrite, dtype=out_dtype)
        if not args.no_eval:
            report["ppl"], report["ppl_by_data"] = _ppl(model, tok, args, data_dir, progress,
                                                        checkpoint_streamer(model, out))
            for e in report["ppl_by_data"].values():
                e["weights"] = f"stored in {report['dtype']}, computed in {plan.dtype}"
    else:
        save_checkpoint(model, tok, out, spec, base_model=source, overwrite=args.overwrite, dtype=out_dtype)
    report["peak_host_bytes"] = peak_rss()
    report["out"] = str(out)
    report["bytes_on_disk"] = dir_bytes(out)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    from lrinfer.offline.resume import WorkDir
    WorkDir(work_dir, "").remove()
    if not args.json:
        print(format_summary(report))
    return report


def _dir_has_chat_template(spec: str | None) -> bool:
    """A local model directory whose tokenizer has a chat template (read before any weight)."""
    if not spec or not Path(spec).expanduser().is_dir():
        return False
    from transformers import AutoTokenizer

    from lrinfer.evaluation.generate import has_chat_template
    try:
        return has_chat_template(AutoTokenizer.from_pretrained(str(Path(spec).expanduser())))
    except (OSError, ValueError):
        return False


def _round_weights(model, dtype) -> None:
    """Round every floating parameter to `dtype` and back, in place (what saving in `dtype` does)."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))


def _screening(screen):
    """--screen SAMPLES KEEP -> the search's `Screening` (None: the default; 0 0: no screening round)."""
    from lrinfer.offline.recipe import Screening
    if screen is None:
        return Screening()
    samples, keep = screen
    if (samples, keep) == (0, 0):
        return None
    if samples < 1 or keep < 1:
        raise LrinferError(f"--screen {samples} {keep}: SAMPLES and KEEP must be >= 1 (or both 0: no screening "
                           "round, every candidate compressed in full)")
    return Screening(samples, keep)


def _compress_or_search(args, model, tok, config, candidates, data_dir, work_dir, progress):
    """Compress `model` in place with `config`, or with the recipe a search chooses (--method auto).
    Returns (config used, CompressionResult, calibration description, SearchResult or None)."""
    from lrinfer.offline.compress import compress
    from lrinfer.offline.calibration_data import calibration_batch
    search = None
    if args.method == "auto":
        from lrinfer.offline.calibration_data import calibration_split
        from lrinfer.offline.recipe import apply_result
        from lrinfer.offline.recipe import search as search_recipes
        calib, heldout, calib_desc = calibration_split(tok, config.calib, config.n_samples, config.seq_len,
                                                       args.heldout, config.seed, data_dir, model, progress)
        search = search_recipes(model, config, calib, heldout, candidates, work_dir=work_dir,
                                resume=args.resume, progress=progress, screening=_screening(args.screen))
        config, result = search.best.config(config), search.result
        apply_result(model, result)
        calib_desc += " (plain text: first 90%; recipes scored on the last 10%)"
    else:
        calib, calib_desc = calibration_batch(tok, config.calib, config.n_samples, config.seq_len, config.seed,
                                              data_dir, model, progress)
        result = compress(model, config, calib, progress, work_dir=work_dir, resume=args.resume,
                          streams=getattr(args, "streams", "auto"))
    return config, result, calib_desc, search


def cmd_eval(args) -> dict:
    from lrinfer.runtime.checkpoint import is_checkpoint, read_manifest
    from .data import eval_sources, resolve_data_dir
    from lrinfer.runtime.models import load_model

    device, dtype = _setup(args)
    if not args.no_ppl:
        eval_sources(args.data)   # a bad --data fails before the model loads
    model, tok, source = load_model(args.model, _compute_dtype(dtype, device), device)
    data_dir = resolve_data_dir(args.data_dir)
    report = {"model": source}
    if is_checkpoint(Path(args.model)):
        m = read_manifest(Path(args.model))
        report.update(method=m.get("method"), ratio=m.get("ratio"), ranks=m.get("ranks"))
    else:
        report.update(method="dense", ratio=0.0, ranks={})
    if not args.no_ppl:
        report["ppl"], report["ppl_by_data"] = _ppl(model, tok, args, data_dir, not args.no_progress)
    if args.tasks:
        from lrinfer.evaluation.zeroshot import evaluate_tasks
        report["tasks"] = evaluate_tasks(model, tok, [t.strip() for t in args.tasks.split(",") if t.strip()],
                                         data_dir, limit=args.limit, batch_size=args.batch_size, device=device,
                                         progress=not args.no_progress, chat_records=args.chat_records)
    if not args.json:
        for e in report.get("ppl_by_data", {}).values():
            print(f"perplexity {e['ppl']:.3f}  [{e['data']}, seq_len {e['seq_len']}, {e['windows']} windows]")
        for task, r in report.get("tasks", {}).items():
            if "empty" in r:   # the chat task
                print(f"{task}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f} ({r['correct']}/{r['n']} correct), "
                      f"empty {r['empty']}  [greedy, {r['max_new_tokens']} new tokens, {r['seconds']:.0f} s]")
                continue
            print(f"{task}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} "
                  f"± {r['acc_norm_stderr']:.4f}  (n={r['n']})")
    return report


def cmd_methods(args) -> dict:
    from lrinfer.offline.recipe import methods_catalog
    catalog = methods_catalog()
    if not args.json:
        heads = {"solver": "solvers (--method NAME --opt KEY=VALUE; recipe 'NAME:KEY=VALUE')",
                 "allocation": "rank allocations (--allocation NAME; recipe '+NAME:KEY=VALUE')",
                 "selection": "layer selections (--selection NAME; recipe '@NAME:KEY=VALUE')",
                 "refinement": "refinements (--refinement NAME; recipe '~NAME:KEY=VALUE')"}
        for stage, methods in catalog.items():
            print(heads[stage])
            for name, m in methods.items():
                print(f"  {name:<9} {m['summary']}")
                extra = []
                if m.get("needs"):
                    extra.append("calibration statistics: " + ", ".join(m["needs"]))
                if stage == "solver" and m["selection"] != "all":
                    extra.append(f"default selection: {m['selection']}")
                for k, o in m["options"].items():
                    extra.append(f"{k}={o['default']!r} ({o['type']})")
                for line in extra:
                    print(f"  {'':<9}   {line}")
        print("recipe spec: solver[:k=v,..][+allocation[:k=v,..]][@selection[:k=v,..]][~refinement[:k=v,..]]"
              "[%samples], e.g. saes:beta_max=0.9+drank@last:cap=0.3~blockfit%128")
    return catalog


def cmd_info(args) -> dict:
    from lrinfer.runtime.checkpoint import read_manifest, verify_files
    path = Path(args.dir)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    ranks = manifest.get("ranks", {})
    report = {k: manifest.get(k) for k in ("base_model", "method", "ratio", "format_version")}
    report["ranks"] = ranks
    report["compressed_linears"] = len(ranks)
    report["bytes_on_disk"] = sum(f["bytes"] for f in manifest.get("files", {}).values())
    report["files"] = manifest.get("files")
    if (path / "report.json").is_file():
        saved = json.loads((path / "report.json").read_text())
        report.update({k: saved[k] for k in ("params", "achieved_ratio", "ppl", "ppl_dense") if k in saved})
    if not args.json:
        print(f"{path}: {report['method']} at ratio {report['ratio']} of {report['base_model']}")
        print(f"{len(ranks)} low-rank linears, {report['bytes_on_disk'] / 2**20:.1f} MiB; checksums OK")
        if "ppl" in report:
            print(f"perplexity {report['ppl']['ppl']:.3f} (dense {report.get('ppl_dense', {}).get('ppl', float('nan')):.3f})")
    return report


def cmd_plot(args) -> dict:
    from .evaluation import plot
    _setup(args)
    report = plot.run(args)
    if not args.json:
        for f in report["files"]:
            print(f"wrote {f}")
        for name, why in report["skipped"].items():
            print(f"skipped {name}: {why}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "plot": cmd_plot, "methods": cmd_methods,
               "generate": cmd_generate, "bench": cmd_bench, "plan": cmd_plan, "serve": cmd_serve,
               "kernels": cli_kernels.cmd_kernels}[args.command]
    try:
        report = handler(args)
    except (LrinferError, ImportError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
