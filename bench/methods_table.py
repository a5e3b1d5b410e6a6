"""WikiText-2 perplexity of every compression method on the packaged SmolLM2-135M (CPU is fine).

    python bench/methods_table.py                       # ratios 0.2 0.4, all methods
    python bench/methods_table.py --ratios 0.2 --methods svdllm saes+drank

A method is `solver[+allocation][@selection]` (e.g. `svdllm+drank`, `svdllm@last` = ResSVD's
partial-layer selection with plain SVD-LLM). Calibration: 32 × 512 WikiText-2 train tokens
(seed 0); evaluation: 16 windows × 512 of WikiText-2 test. Each run starts from a deep copy of
the dense model. Results are written after every run to bench/results/methods_smollm2.json|md
(runs already there are skipped unless --fresh).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import lrinfer
from lrinfer.allocation import achieved_ratio

DEFAULT_METHODS = ["dense", "svd", "fwsvd", "asvd", "svdllm", "ressvd", "saes", "svdllm+drank", "saes+drank"]
OUT = Path(__file__).parent / "results"


def parse_method(spec: str) -> tuple[str, str, str | None]:
    """'saes+drank@last' -> ('saes', 'drank', 'last')."""
    spec, _, selection = spec.partition("@")
    method, _, alloc = spec.partition("+")
    return method, alloc or "uniform", selection or None


def write(results: dict, stem: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2))
    runs = results["runs"]
    lines = [f"# Compression methods on SmolLM2-135M (WikiText-2 PPL, {results['eval']})", "",
             *[f"Command: `{c}`  " for c in dict.fromkeys(r.get("command", results["command"]) for r in runs)],
             f"Calibration: {results['calibration']}; host: {results['host']}",
             "", "| ratio | method | allocation | selection | achieved ratio | params (M) | compress s | PPL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['ratio']:.1f} | {r['method']} | {r['allocation']} | {r['selection']} | "
                     f"{r['achieved_ratio']:.3f} | {r['model_params'] / 1e6:.1f} | {r['seconds']:.0f} | "
                     f"{r['ppl']:.4g} |")
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--stem", default="methods_smollm2")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON")
    ap.add_argument("--compress-threads", type=int, default=1,
                    help="torch threads while compressing (small SVDs/Cholesky scale badly on a shared CPU); "
                         "evaluation uses torch's default")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(command, flush=True)

    data_dir = lrinfer.resolve_data_dir()
    dense, tok, source = lrinfer.load_model()
    dense.eval()
    calib, calib_desc = lrinfer.calibration_batch(tok, "wikitext2", args.n_samples, args.seq_len, seed=0,
                                                  data_dir=data_dir)
    windows, eval_desc = lrinfer.eval_windows(tok, "wikitext2", args.seq_len, args.windows, data_dir)
    path = OUT / f"{args.stem}.json"
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {"runs": []}
    results = {"model": source, "command": command, "calibration": f"{calib_desc}, {tuple(calib.shape)}, seed 0",
               "eval": f"{eval_desc}, {tuple(windows.shape)}", "torch": torch.__version__,
               "host": f"{platform.machine()} CPU (shared), compress {args.compress_threads} thread(s), "
                       f"eval {torch.get_num_threads()}", "runs": old["runs"]}
    done = {(r["spec"], r["ratio"]) for r in results["runs"]}

    for ratio in args.ratios:
        for spec in args.methods:
            if (spec, ratio) in done or (spec == "dense" and any(s == "dense" for s, _ in done)):
                continue
            model = copy.deepcopy(dense)
            method, alloc, selection = parse_method(spec)
            t0 = time.perf_counter()
            if method == "dense":
                achieved, sel, seconds, err = 0.0, "-", 0.0, 0.0
            else:
                cfg = lrinfer.CompressConfig(method=method, ratio=ratio, allocation=alloc, selection=selection,
                                             n_samples=args.n_samples, seq_len=args.seq_len)
                threads = torch.get_num_threads()
                torch.set_num_threads(args.compress_threads)
                try:
                    res = lrinfer.compress(model, cfg, calib, progress=False)
                finally:
                    torch.set_num_threads(threads)
                seconds = time.perf_counter() - t0
                achieved = achieved_ratio(res.linears, {n: sum(k) for n, k in res.ranks.items()})
                sel, err = cfg.selection, res.hidden_error[-1]
            ppl = lrinfer.perplexity(model, windows, progress=False)["ppl"]
            run = {"spec": spec, "ratio": 0.0 if method == "dense" else ratio, "method": method,
                   "allocation": alloc if method != "dense" else "-", "selection": sel,
                   "achieved_ratio": achieved, "seconds": seconds, "ppl": ppl,
                   "last_block_hidden_error": err, "model_params": sum(p.numel() for p in model.parameters()),
                   "eval_seconds": time.perf_counter() - t0 - seconds, "command": command}
            results["runs"].append(run)
            done.add((spec, run["ratio"]))
            print(json.dumps(run), flush=True)
            write(results, args.stem)
            del model
    order = DEFAULT_METHODS + [m for m in args.methods if m not in DEFAULT_METHODS]
    results["runs"].sort(key=lambda r: (r["ratio"], order.index(r["spec"]) if r["spec"] in order else len(order)))
    write(results, args.stem)


if __name__ == "__main__":
    main()
