"""The recipe search on SmolLM2-135M (or --model), then every trial measured on the test split afterwards.

    python bench/recipe_search.py --ratio 0.2 --windows 64 --tasks piqa
    python bench/recipe_search.py --ratio 0.4 --candidates saes saes@last:cap=0.45 saes@last:cap=0.6

The search (`lrinfer.search_recipes`, the same code as `lrinfer compress --method auto`) sees only
the calibration text: candidates are compressed with windows from its first 90% and ranked by
perplexity on `--heldout` windows from its last 10%. Only after it has chosen does this script
reload each trial's factors and measure WikiText-2 test perplexity (and `--tasks`, for the chosen
recipe), so the table shows whether the held-out criterion ranks recipes the way the test split
does. Candidates are recipe specs (`lrinfer.Recipe.parse`:
`solver[:opts][+allocation[:opts]][@selection[:opts]][%samples]`, e.g. `saes:beta_max=0.9@last:cap=0.3`);
the default is `lrinfer.default_candidates(ratio)`. A `%samples` candidate needs `--samples` at least that. Work files go to
out/.<stem>_<ratio>_n<samples> (resumable); results to bench/results/<stem>.json|md, one entry per ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lrinfer
from lrinfer.offline.calibration_data import calibration_split
from lrinfer.factors import unflatten_factors
from lrinfer.offline.recipe import Recipe, Screening, apply_result, default_candidates, search
from lrinfer.evaluation.zeroshot import evaluate_tasks
from lrinfer.pipeline import SearchOptions

from methods_table import OUT, locked, model_name, start


def write(results: dict, stem: str) -> None:
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2))
    models = {model_name(r.get("model", "")) for r in results["searches"].values()}
    lines = [f"# Recipe search on {', '.join(sorted(models))}", ""]
    for key, r in sorted(results["searches"].items()):
        if "trials" not in r:   # a reference timing whose search has not finished yet
            continue
        lines += [f"## ratio {key}", "", f"Command: `{r['command']}`  ",
                  f"Calibration: {r['calibration']}; criterion: {r['criterion']}  ",
                  f"Test: {r['eval']}; host: {r['host']}; dense test PPL "
                  f"{r.get('dense_test_ppl', float('nan')):.2f}", "",
                  "| round | recipe | held-out PPL (criterion) | test PPL | s (compress + criterion) | chosen |", "|---|---|---|---|---|---|"]
        for t in r["trials"]:
            chosen = t['label'] == r['chosen_label'] and t.get("round") != "screen"
            test = f"{t['test_ppl']:.2f}" if "test_ppl" in t else ""
            lines.append(f"| {t.get('round', 'full')} | {t['label']} | {t['heldout_ppl']:.2f} | {test} | "
                         f"{t.get('seconds', 0):.0f} | {'**yes**' if chosen else ''} |")
        for run in r.get("earlier_runs", []):   # trials of earlier commands kept beside this one
            t = run["trial"]
            lines.append(f"| {t.get('round', 'full')} | {t['label']} | {t['heldout_ppl']:.2f} | "
                         f"{t.get('test_ppl', float('nan')):.2f} | {t.get('seconds', 0):.0f} | (earlier run: "
                         f"`{run['command']}`) |")
        if "seconds" in r:
            lines.append(f"\nSearch wall time: {r['seconds']:.0f} s")
        if "reference" in r and "cpu_seconds" in r:
            ref = r["reference"]
            lines.append(f"One `{ref['recipe']}` compression on the same rows (`{ref['command']}`): "
                         f"{ref['cpu_seconds']:.0f} CPU s; the search: {r['cpu_seconds']:.0f} CPU s = "
                         f"{r['cpu_seconds'] / ref['cpu_seconds']:.2f} × (process CPU time of each, run with the "
                         "same --compress-threads, as the machine was shared)")
        for task, v in r.get("tasks", {}).items():
            lines.append(f"\nChosen recipe, {task}: acc {v['acc']:.4f} ± {v['acc_stderr']:.4f}, "
                         f"acc_norm {v['acc_norm']:.4f} ± {v['acc_norm_stderr']:.4f} (n = {v['n']})")
        lines.append("")
    (OUT / f"{stem}.md").write_text("\n".join(lines))


def save_entry(stem: str, ratio: float, entry: dict) -> None:
    """Merge `entry` into the results of `ratio` in bench/results/<stem>.json (several runs may share it)."""
    with locked(stem):
        path = OUT / f"{stem}.json"
        results = json.loads(path.read_text()) if path.exists() else {"searches": {}}
        key = f"{ratio:g}"
        results["searches"][key] = {**results["searches"].get(key, {}), **entry}
        write(results, stem)


def time_reference(args, command, dense, tok, data_dir) -> None:
    """One compression with `args.reference` on the search's calibration rows, wall and CPU seconds."""
    base = lrinfer.CompressConfig(ratio=args.ratio, n_samples=args.samples, seq_len=args.seq_len)
    calib, _, _ = calibration_split(tok, "wikitext2", args.samples, args.seq_len, args.heldout, 0, data_dir)
    torch.set_num_threads(args.compress_threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    lrinfer.compress(copy.deepcopy(dense), Recipe.parse(args.reference).config(base), calib, progress=False)
    save_entry(args.stem, args.ratio, {"reference": {
        "recipe": args.reference, "command": command, "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1)}})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=lrinfer.CompressConfig.ratio)
    ap.add_argument("--candidates", nargs="+", default=SearchOptions.candidates)
    ap.add_argument("--samples", type=int, default=lrinfer.CompressConfig.n_samples)
    ap.add_argument("--seq-len", type=int, default=lrinfer.CompressConfig.seq_len)
    ap.add_argument("--heldout", type=int, default=SearchOptions.heldout)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tasks", nargs="*", default=[])
    ap.add_argument("--model", default=None, help="any model lrinfer.load_model takes (default: SmolLM2-135M)")
    ap.add_argument("--stem", default="recipes_smollm2")
    ap.add_argument("--compress-threads", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="compress every candidate in full (no screening round)")
    ap.add_argument("--screen-samples", type=int, default=Screening.samples)
    ap.add_argument("--screen-keep", type=int, default=Screening.keep)
    ap.add_argument("--reference", default=None, metavar="RECIPE",
                    help="instead of searching, time one compression with this recipe (e.g. saes) on the same "
                         "calibration rows, the unit of the search's cost; it may run beside the search, as costs "
                         "are compared in CPU seconds of one thread")
    args = ap.parse_args(argv)
    command, data_dir, dense, tok, source = start(argv, args.model)
    if args.reference:
        return time_reference(args, command, dense, tok, data_dir)
    candidates = [Recipe.parse(s) for s in args.candidates] if args.candidates else default_candidates(args.ratio)
    base = lrinfer.CompressConfig(ratio=args.ratio, n_samples=args.samples, seq_len=args.seq_len)
    calib, heldout, calib_desc = calibration_split(tok, "wikitext2", args.samples, args.seq_len, args.heldout,
                                                   0, data_dir)
    work = Path("out") / f".{args.stem}_{args.ratio:g}_n{args.samples}"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.compress_threads)
    cpu0 = time.process_time()
    try:
        found = search(dense, base, calib, heldout, candidates, work_dir=work, resume=True, progress=False,
                       screening=None if args.full else Screening(args.screen_samples, args.screen_keep))
    finally:
        torch.set_num_threads(threads)
    search_cpu_s = time.process_time() - cpu0

    # Only now, with the choice made, look at the test split.
    windows, eval_desc = lrinfer.eval_windows(tok, "wikitext2", args.seq_len, args.windows, data_dir)
    report = {**found.report(), "cpu_seconds": round(search_cpu_s, 1), "command": command, "model": source,
              "torch": torch.__version__,
              "calibration": f"{calib_desc}, first 90%, {tuple(calib.shape)}, seed 0", "eval": eval_desc +
              f", {tuple(windows.shape)}", "host": f"{platform.machine()} CPU (shared)"}

    def patched(trial: dict):
        model = copy.deepcopy(dense)
        folder = work / "screen" if trial.get("round") == "screen" else work
        factors = unflatten_factors(load_file(str(folder / f"{Recipe(**trial['recipe']).slug}.safetensors")))
        apply_result(model, lrinfer.CompressionResult(factors, {}, [], [], 0.0))
        return model

    def save():
        save_entry(args.stem, args.ratio, report)

    report["dense_test_ppl"] = lrinfer.perplexity(dense, windows, progress=False)["ppl"]
    for trial in report["trials"]:   # proxies of the screening round are not measured on test
        if trial["heldout_ppl"] != float("inf") and trial.get("round") != "screen":
            trial["test_ppl"] = lrinfer.perplexity(patched(trial), windows, progress=False)["ppl"]
            print(json.dumps(trial), flush=True)
    save()
    if args.tasks:      # the chosen recipe only (lm-eval on the full split is the slow part)
        chosen = next(t for t in report["trials"] if t["label"] == found.best.label and t.get("round") != "screen")
        t0 = time.perf_counter()
        report["tasks"] = evaluate_tasks(patched(chosen), tok, args.tasks, data_dir, batch_size=8, progress=False)
        report["task_seconds"] = time.perf_counter() - t0
        save()


if __name__ == "__main__":
    main()
