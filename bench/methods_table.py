"""WikiText-2 perplexity of every compression method on the packaged SmolLM2-135M (CPU is fine).

    python bench/methods_table.py --windows 64 --ratios 0.2 0.4 0.6       # all methods
    python bench/methods_table.py --ratios 0.2 --methods svdllm saes+drank
    python bench/methods_table.py --ratios 0.2 0.4 --tasks piqa --task-methods dense svdllm saes

A method is a recipe spec, `solver[:opts][+allocation[:opts]][@selection[:opts]][%samples]` with opts
`key=value,...` (`lrinfer.Recipe.parse`; e.g. `svdllm+drank`, `saes@last:cap=0.45` = SAES on ResSVD's
last-layer selection with a per-layer cap of 45%, `saes:beta_max=0.9` = SAES with β ≤ 0.9). Calibration: 32 × 512 tokens of WikiText-2
valid.txt (seed 0); evaluation: WikiText-2 raw test, `--windows` × 512 tokens, and optionally
lm-eval zero-shot tasks (`--tasks piqa`, full split) for the `--task-methods`. Each run starts
from a deep copy of the dense model. Results are written after every run to
bench/results/<stem>.json|md; runs already there are skipped unless --fresh.

Several copies of the same command may run at once (one per core): each claims the next
(method, ratio) not yet done or claimed, and results are merged under a file lock.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import lrinfer
from lrinfer.offline.allocation.base import achieved_ratio
from lrinfer.offline.recipe import Recipe
from lrinfer.evaluation.perplexity import PerplexityConfig
from lrinfer.evaluation.zeroshot import evaluate_tasks

DEFAULT_METHODS = ["dense", "svd", "fwsvd", "asvd", "svdllm", "ressvd", "saes", "svdllm+drank", "saes+drank"]
OUT = Path(__file__).parent / "results"


def model_name(source: str) -> str:
    return "SmolLM2-135M" if "smollm2" in source.lower() else Path(source).name


def write(results: dict, stem: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2))
    runs = results["runs"]
    lines = [f"# Compression methods on {model_name(results.get('model', ''))} (WikiText-2 PPL, {results['eval']})", "",
             *[f"Command: `{c}`  " for c in dict.fromkeys(r.get("command", results["command"]) for r in runs)],
             f"Calibration: {results['calibration']}; host: {results['host']}",
             "", "| ratio | method | allocation | selection | achieved ratio | params (M) | compress s | PPL "
                 "| PIQA acc | PIQA acc_norm |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def acc(r, key):
        t = r.get("tasks", {}).get("piqa")
        return f"{t[key]:.4f} ± {t[key + '_stderr']:.4f}" if t else ""

    for r in runs:
        lines.append(f"| {r['ratio']:.1f} | {r['method']} | {r['allocation']} | {r['selection']} | "
                     f"{r['achieved_ratio']:.3f} | {r['model_params'] / 1e6:.1f} | {r['seconds']:.0f} | "
                     f"{r['ppl']:.4g} | {acc(r, 'acc')} | {acc(r, 'acc_norm')} |")
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")


ORDER_KEY = lambda r: (r["ratio"], DEFAULT_METHODS.index(r["spec"]) if r["spec"] in DEFAULT_METHODS  # noqa: E731
                       else len(DEFAULT_METHODS), r["spec"])


@contextlib.contextmanager
def locked(stem: str):
    """Hold an exclusive lock on <stem>'s results while reading and rewriting them."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f".{stem}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_runs(stem: str) -> list[dict]:
    path = OUT / f"{stem}.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def claim(stem: str, spec: str, ratio: float) -> bool:
    """True if this process gets (spec, ratio): not done, and no live process holds its claim file."""
    claims = OUT / f".{stem}.claims"
    claims.mkdir(exist_ok=True)
    with locked(stem):
        if any(r["spec"] == spec and r["ratio"] == ratio for r in load_runs(stem)):
            return False
        f = claims / f"{spec}@{ratio}"
        if f.exists():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(f.read_text()), 0)     # the holder is alive
                return False
        f.write_text(str(os.getpid()))
        return True


def record(stem: str, header: dict, run: dict) -> None:
    with locked(stem):
        runs = [r for r in load_runs(stem) if (r["spec"], r["ratio"]) != (run["spec"], run["ratio"])] + [run]
        write({**header, "runs": sorted(runs, key=ORDER_KEY)}, stem)
        (OUT / f".{stem}.claims" / f"{run['spec']}@{run['ratio']}").unlink(missing_ok=True)


def start(argv, model: str | None = None) -> tuple:
    """Echo the command line, then load the data directory and the dense model (default SmolLM2; eval
    mode). Returns (command, data_dir, dense, tokenizer, source)."""
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(command, flush=True)
    data_dir = lrinfer.resolve_data_dir()
    dense, tok, source = lrinfer.load_model(model)
    return command, data_dir, dense.eval(), tok, source


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--n-samples", type=int, default=lrinfer.CompressConfig.n_samples)
    ap.add_argument("--seq-len", type=int, default=lrinfer.CompressConfig.seq_len)
    ap.add_argument("--windows", type=int, default=PerplexityConfig.windows)
    ap.add_argument("--tasks", nargs="*", default=[], help="lm-eval zero-shot tasks (e.g. piqa), full split")
    ap.add_argument("--task-methods", nargs="+", default=None,
                    help="methods that also get --tasks (default: all)")
    ap.add_argument("--task-batch-size", type=int, default=8)
    ap.add_argument("--task-limit", type=int, default=None, help="first N questions only (a quick check)")
    ap.add_argument("--model", default=None, help="any model lrinfer.load_model takes (default: SmolLM2-135M)")
    ap.add_argument("--stem", default="methods_smollm2")
    ap.add_argument("--fresh", action="store_true",
                    help="start over: drop the runs already in the JSON (give it to the first copy only)")
    ap.add_argument("--compress-threads", type=int, default=1,
                    help="torch threads while compressing (small SVDs/Cholesky scale badly on a shared CPU); "
                         "evaluation uses torch's default")
    args = ap.parse_args(argv)
    command, data_dir, dense, tok, source = start(argv, args.model)
    calib, calib_desc = lrinfer.calibration_batch(tok, "wikitext2", args.n_samples, args.seq_len, seed=0,
                                                  data_dir=data_dir)
    windows, eval_desc = lrinfer.eval_windows(tok, "wikitext2", args.seq_len, args.windows, data_dir)
    if args.fresh:
        with locked(args.stem):
            (OUT / f"{args.stem}.json").unlink(missing_ok=True)
    header = {"model": source, "command": command, "calibration": f"{calib_desc}, {tuple(calib.shape)}, seed 0",
              "eval": f"{eval_desc}, {tuple(windows.shape)}", "torch": torch.__version__,
              "host": f"{platform.machine()} CPU (shared), compress {args.compress_threads} thread(s), "
                      f"eval {torch.get_num_threads()}"}
    task_methods = set(args.task_methods or args.methods)

    for ratio in args.ratios:
        for spec in args.methods:
            recipe = None if spec == "dense" else Recipe.parse(spec)
            method, alloc = (recipe.method, recipe.allocation) if recipe else ("dense", "-")
            run_ratio = 0.0 if method == "dense" else ratio
            if not claim(args.stem, spec, run_ratio):
                continue
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if method == "dense":
                achieved, sel, seconds, err = 0.0, "-", 0.0, 0.0
            else:
                cfg = recipe.config(lrinfer.CompressConfig(ratio=ratio, n_samples=args.n_samples,
                                                           seq_len=args.seq_len))
                threads = torch.get_num_threads()
                torch.set_num_threads(args.compress_threads)
                try:
                    res = lrinfer.compress(model, cfg, calib[:cfg.n_samples], progress=False)
                finally:
                    torch.set_num_threads(threads)
                seconds = time.perf_counter() - t0
                achieved = achieved_ratio(res.linears, {n: sum(k) for n, k in res.ranks.items()})
                sel, err = cfg.selection, res.hidden_error[-1]
            ppl = lrinfer.perplexity(model, windows, progress=False)["ppl"]
            run = {"spec": spec, "ratio": run_ratio, "method": method,
                   "allocation": alloc, "selection": sel,
                   "achieved_ratio": achieved, "seconds": seconds, "ppl": ppl,
                   "last_block_hidden_error": err, "model_params": sum(p.numel() for p in model.parameters()),
                   "eval_seconds": time.perf_counter() - t0 - seconds, "command": command}
            if args.tasks and spec in task_methods:
                t1 = time.perf_counter()
                run["tasks"] = evaluate_tasks(model, tok, args.tasks, data_dir, limit=args.task_limit,
                                              batch_size=args.task_batch_size, progress=False)
                run["task_seconds"] = time.perf_counter() - t1
            print(json.dumps(run), flush=True)
            record(args.stem, header, run)
            del model


if __name__ == "__main__":
    main()
