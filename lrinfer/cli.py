"""`lrinfer compress | eval | info | ...`: a thin CLI over the Python API. `compress` maps its flags onto
`lrinfer.pipeline.CompressJob` and runs `lrinfer.pipeline.run`; every default is read from the dataclasses."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from . import cli_kernels
from .errors import LrinferError


def field_defaults(cls) -> dict:
    """{field: default} of a dataclass, as declared (a default_factory called), before __post_init__."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING}


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


def _eval_args(p: argparse.ArgumentParser) -> None:
    from lrinfer.evaluation.perplexity import PerplexityConfig
    d = PerplexityConfig()
    p.add_argument("--data", default=d.data,
                   help=f"evaluation texts, comma-separated (default {d.data}): wikitext2 (raw test split), "
                        "timemachine (a public-domain novel shipped with lrinfer; evaluation only), a .txt/.jsonl file")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per perplexity window (default {d.seq_len})")
    p.add_argument("--windows", type=int, default=d.windows,
                   help=f"number of non-overlapping windows; 0 = all (default {d.windows})")
    p.add_argument("--eval-batch-size", type=int, default=d.batch_size,
                   help=f"windows per forward (default {d.batch_size})")


def _perplexity_config(args):
    """--data, --seq-len, --windows, --eval-batch-size -> `PerplexityConfig`."""
    from lrinfer.evaluation.perplexity import PerplexityConfig
    return PerplexityConfig(args.data, args.seq_len, args.windows, args.eval_batch_size)


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
    parser = argparse.ArgumentParser(prog="lrinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)

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


def _add_compress(sub) -> None:
    """`lrinfer compress`: each flag sets a field of `pipeline.CompressJob` (`compress_job`), and its default
    is that field's (tests/test_cli.py holds them equal)."""
    from lrinfer.offline.allocation.base import ALLOCATORS
    from lrinfer.offline.calibration_data import CHAT_MODEL_CALIB
    from lrinfer.offline.config import CompressConfig
    from lrinfer.offline.refinement.base import REFINERS
    from lrinfer.offline.selection.base import SELECTIONS
    from lrinfer.offline.solvers.base import SOLVERS
    from lrinfer.offline.plan import STREAMS
    from lrinfer.pipeline import CompressJob, SearchOptions

    d, job, search = field_defaults(CompressConfig), CompressJob(), SearchOptions()
    c = sub.add_parser("compress", help="compress a model and write a checkpoint directory")
    c.add_argument("--model", default=job.model, help="HF directory, .gguf file, hub id, or 'smollm2' (default)")
    c.add_argument("--method", default=d["method"], choices=sorted(SOLVERS) + ["auto"],
                   help=f"solver (default {d['method']}); auto: search recipes on held-apart calibration text")
    c.add_argument("--candidates", nargs="+", metavar="RECIPE", default=search.candidates,
                   help="--method auto: recipes to try instead of the default set, as "
                        "solver[:k=v,..][+allocation[:k=v,..]][@selection[:k=v,..]][~refinement[:k=v,..]][%%samples], "
                        "e.g. saes@last:cap=0.3 saes:beta_max=0.9+drank svdllm%%16")
    c.add_argument("--heldout", type=int, default=search.heldout,
                   help="--method auto: held-apart calibration windows that score each recipe "
                        f"(default {search.heldout})")
    c.add_argument("--screen", nargs=2, type=int, metavar=("SAMPLES", "KEEP"), default=None,
                   help="--method auto: proxies on SAMPLES calibration samples, exactly the best KEEP compressed in "
                        f"full (default: {search.screening.samples} samples, the best {search.screening.keep} plus "
                        f"up to {search.screening.keep_max} in all when tied with the best within "
                        f"{search.screening.tie_z:g} standard errors of their paired per-window NLL; "
                        "0 0: every candidate in full)")
    c.add_argument("--ratio", type=float, default=d["ratio"],
                   help=f"fraction of the linears' parameters removed, in (0, 1) (default {d['ratio']})")
    c.add_argument("--selection", default=d["selection"], choices=sorted(SELECTIONS),
                   help="which layers are compressed (default: the method's own)")
    c.add_argument("--allocation", default=d["allocation"], choices=sorted(ALLOCATORS),
                   help=f"rank allocation (default {d['allocation']})")
    c.add_argument("--refinement", default=d["refinement"], choices=list(REFINERS),
                   help=f"after each block is solved (default {d['refinement']}; blockfit: AA-SVD-style local refinement)")
    c.add_argument("--rank-multiple", type=int, default=d["rank_multiple"],
                   help=f"round ranks to the nearest multiple of this (default {d['rank_multiple']})")
    c.add_argument("--modules", default=None, help="comma-separated linear names to compress (default: all)")
    c.add_argument("--calib", default=d["calib"],
                   help=f"calibration text (default {d['calib']}: {CHAT_MODEL_CALIB} for a model with a chat template, "
                        "else wikitext2): wikitext2; chat (the model's own answers to shipped prompts through its "
                        "chat template); mix (half chat, half wikitext2); self; or a .txt/.jsonl file")
    c.add_argument("--samples", type=int, default=d["n_samples"], help=f"calibration samples (default {d['n_samples']})")
    c.add_argument("--calib-seq-len", type=int, default=d["seq_len"],
                   help=f"tokens per calibration sample (default {d['seq_len']})")
    c.add_argument("--seed", type=int, default=d["seed"])
    c.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"calibration batch size (default {d['batch_size']})")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE", help="solver option (repeatable)")
    c.add_argument("--selection-opt", action="append", metavar="KEY=VALUE", help="selection option")
    c.add_argument("--allocation-opt", action="append", metavar="KEY=VALUE", help="allocation option")
    c.add_argument("--refinement-opt", action="append", metavar="KEY=VALUE", help="refinement option")
    c.add_argument("--out", default=job.out, help="output directory (default out/<model>-<method>-<ratio>)")
    c.add_argument("--overwrite", action="store_true", help="replace --out even if it holds another model")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same arguments (progress is kept beside --out)")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity of dense and compressed models")
    c.add_argument("--compute-dtype", default=job.compute_dtype, choices=["float32", "float16", "bfloat16"],
                   help="dtype the model is loaded and calibrated in (default: float32 on the CPU, else as loaded)")
    c.add_argument("--streams", default=job.streams, choices=STREAMS,
                   help=f"where the two activation streams live (default {job.streams}: on the device when the "
                        "memory plan fits them there, else on the host)")
    c.add_argument("--no-stream", action="store_true",
                   help="load the whole model even from a safetensors directory (default: one decoder block "
                        "at a time)")
    _eval_args(c)
    _common(c, dtype_help="dtype of the written checkpoint (default: the source's own 16-bit dtype, else bfloat16)")


def compress_job(args):
    """The `pipeline.CompressJob` that `lrinfer compress` flags describe."""
    from lrinfer.offline.config import CompressConfig
    from lrinfer.pipeline import CompressJob, SearchOptions

    auto = args.method == "auto"
    if args.candidates and not auto:
        raise LrinferError("--candidates lists recipes for --method auto; add --method auto or drop it")
    if args.screen is not None and not auto:
        raise LrinferError("--screen sets the search's screening round; add --method auto or drop it")
    config = CompressConfig(
        method=field_defaults(CompressConfig)["method"] if auto else args.method, ratio=args.ratio,
        selection=args.selection, allocation=args.allocation, rank_multiple=args.rank_multiple,
        modules=args.modules.split(",") if args.modules else None, calib=args.calib, n_samples=args.samples,
        seq_len=args.calib_seq_len, seed=args.seed, batch_size=args.batch_size,
        method_options=_options(args.opt, "--opt"), selection_options=_options(args.selection_opt, "--selection-opt"),
        allocation_options=_options(args.allocation_opt, "--allocation-opt"),
        refinement=args.refinement, refinement_options=_options(args.refinement_opt, "--refinement-opt"))
    search = None
    if auto:
        search = SearchOptions(candidates=args.candidates, heldout=args.heldout)
        if args.screen is not None:
            search.screening = _screening(args.screen)
    return CompressJob(model=args.model, out=args.out, config=config, search=search, device=args.device,
                       compute_dtype=args.compute_dtype, dtype=args.dtype, stream=not args.no_stream,
                       streams=args.streams, evaluation=None if args.no_eval else _perplexity_config(args),
                       resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                       data_dir=args.data_dir)


def _screening(screen):
    """--screen SAMPLES KEEP -> the search's `Screening` (0 0: None, no screening round)."""
    from lrinfer.offline.recipe import Screening
    samples, keep = screen
    if (samples, keep) == (0, 0):
        return None
    if samples < 1 or keep < 1:
        raise LrinferError(f"--screen {samples} {keep}: SAMPLES and KEEP must be >= 1 (or both 0: no screening "
                           "round, every candidate compressed in full)")
    return Screening(samples, keep, keep_max=keep)   # exactly KEEP finalists, ties or not


def cmd_compress(args) -> dict:
    from lrinfer.offline.report import format_summary
    from lrinfer.pipeline import run

    _setup(args)
    result = run(compress_job(args), show_plan=lambda plan: _print_plan(plan, args))
    if not args.json:
        print(format_summary(result.report))
    return result.report


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
    """`lrinfer plan`: the memory plan of a compression from a config alone (lrinfer/offline/plan.py);
    the compression's defaults are `compress`'s."""
    from lrinfer.offline.config import CompressConfig
    from lrinfer.offline.plan import STREAMS
    from lrinfer.pipeline import CompressJob

    d, job = field_defaults(CompressConfig), CompressJob()
    p = sub.add_parser("plan", help="peak device/host memory and resume disk of a compression, from a config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config.json (e.g. Llama-2-70B's)")
    src.add_argument("--model", help="a model directory holding config.json")
    p.add_argument("--method", default=d["method"], help=f"solver (default {d['method']})")
    p.add_argument("--ratio", type=float, default=d["ratio"], help=f"fraction removed (default {d['ratio']})")
    p.add_argument("--samples", type=int, default=d["n_samples"],
                   help=f"calibration samples (default {d['n_samples']})")
    p.add_argument("--calib-seq-len", type=int, default=d["seq_len"],
                   help=f"tokens per calibration sample (default {d['seq_len']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"calibration batch size (default {d['batch_size']})")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the config's)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB the device holds (default: what this machine's device has free)")
    p.add_argument("--host-memory", type=float, default=None, help="GiB of host memory (default: available here)")
    p.add_argument("--streams", default=job.streams, choices=STREAMS)
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
    from lrinfer.runtime.models import load_dtype, load_model

    device = _setup(args)
    check_options(args.max_new_tokens, args.sample, args.temperature, args.top_p)   # before the model loads
    model, tok, source = load_model(args.model, load_dtype(args.dtype, device), device)
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
    from lrinfer.runtime.models import load_dtype

    device = _setup(args)
    if args.threads is not None:
        if args.threads < 1:
            raise LrinferError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    dense, compressed, info = load_pair(args.dir, args.base, device, load_dtype(args.dtype, device))
    log = logging.getLogger("lrinfer.bench").info
    report = {**info, **compare(dense, compressed, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                                graphs=False if args.no_graphs else None, cache=args.cache, log=log)}
    if not args.json:
        print(f"{report['checkpoint']}: {report['method']} at ratio {report['ratio']} of {report['base_model']}")
        print(format_table(report))
    return report


def _setup(args) -> str:
    """Logging as --verbose / --debug ask; returns the device (--device, else cuda when available)."""
    from lrinfer.runtime.models import resolve_device
    verbose = getattr(args, "debug", False) or getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lrinfer").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return resolve_device(getattr(args, "device", None))


def cmd_eval(args) -> dict:
    from lrinfer.evaluation.perplexity import text_perplexities
    from lrinfer.runtime.checkpoint import is_checkpoint, read_manifest
    from lrinfer.runtime.models import load_dtype, load_model

    from .data import resolve_data_dir

    device = _setup(args)
    evaluation = None if args.no_ppl else _perplexity_config(args)   # a bad --data fails before the model loads
    model, tok, source = load_model(args.model, load_dtype(args.dtype, device), device)
    data_dir = resolve_data_dir(args.data_dir)
    report = {"model": source}
    if is_checkpoint(Path(args.model)):
        m = read_manifest(Path(args.model))
        report.update(method=m.get("method"), ratio=m.get("ratio"), ranks=m.get("ranks"))
    else:
        report.update(method="dense", ratio=0.0, ranks={})
    if not args.no_ppl:
        report["ppl_by_data"] = text_perplexities(model, tok, evaluation, data_dir, not args.no_progress)
        report["ppl"] = next(iter(report["ppl_by_data"].values()))   # the first text's
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
