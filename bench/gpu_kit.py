"""Staged GPU kit (issue 14): one command per stage, resumable, JSON + a Markdown summary in one folder.

    python bench/gpu_kit.py --stage 1 --out bench/results/gpu-h200 --export "$OUT"   # on the GPU machine
    python bench/gpu_kit.py --all --out bench/results/gpu-h200                       # every stage not done
    python bench/gpu_kit.py --all                                                    # here: CPU dry run
    python bench/gpu_kit.py --prepare            # here, once: data (+ student) to carry for stage 5

Stages (each fits one 10-minute command on an H200; the whole kit well under 30 minutes):
  1 tests     pytest -m gpu tests/kernels: bf16/fp16/fp32, CUDA graphs, torch.compile, the fused kernel
              from two streams at once (1000×), cooperative launch and PDL
  2 sweep     the six Llama-2-7B/Llama-3-8B shapes × 20/40/60% × M ∈ {1, 4, 16, 64, 512, 8192}: dense
              cuBLAS, unfused, ours, and the decode variants (fused / two_launch / two_launch_pdl, M ≤ 64);
              torch.compile baseline on a subset; copy bandwidth and GEMM rate measured first
  3 tune      tuner on the six shapes at 40% (tuned-<gpu>.json in the folder), then stage 2's sweep
              again with the tuned table
  4 e2e       decode tokens/s and peak memory, Llama-2-7B-shaped random model (bench/decoder.py),
              batch 1/8/32, dense vs 40%, one CUDA graph per decode step on both sides
  5 compress  the trained student's perplexity on the GPU vs the CPU (dense and svdllm 20%, ±1%), and
              a Llama-2-7B-shaped random model compressed by svdllm at 20% on 32×2048 random tokens:
              wall time and peak device memory

Resumable: a stage whose JSON says "done" is kept unless --force; "incomplete" (the --budget-s
deadline came first), "failed" and dry-run results are run again, continuing from their rows.
Each command writes <out>/stage<N>_<name>.json, summary.md (every target and whether it was met)
and summary.json. The GPU machine returns only $OUT: `--export "$OUT"` packs the folder into
$OUT/gpu-kit.tgz (+ summary.md); unpack it into the same --out folder here before the next call.

Without CUDA every stage runs a tiny version (tiny shapes, the torch path, a tiny student) to prove
the plumbing and records "skipped: no CUDA device" for the GPU-only measurements (`--dry-run`
forces the tiny version on a GPU too). Stage 5 needs WikiText-2 and, ideally, the trained student;
neither is in the repository: `--prepare` copies them into out/gpu-kit-carry/ (ignored by git, about
25 MB), to pass to the device tool as carry=["out/gpu-kit-carry"]. Without a carried student,
stage 5 trains one on the GPU (bench/train_student.py's recipe, seconds there).

Files: this one (stages 1-4, the runner, the command line), kit_core.py (the Kit: folder, deadline,
a stage record's start/resume/finish), kit_compress.py (stage 5 and --prepare), kit_report.py
(targets, summary, export).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:   # the kit's modules beside it (kit_core adds the root)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from kit_core import ROOT, Kit, _finish, _log, _start, env_meta, gpu_slug  # noqa: E402
from kit_compress import prepare, stage_compress  # noqa: E402
from kit_report import NO_CUDA, STAGES, evaluate_targets, export, write_json, write_summary  # noqa: E402,F401

HEADLINE_MS = (1, 4, 16, 64, 512, 8192)
REDUCTIONS = (0.2, 0.4, 0.6)
COMPILE_SUBSET = {"shapes": [(4096, 4096), (4096, 11008)], "reduction": 0.4, "M": (1, 16, 8192)}


# ----------------------------------------------------------------------------- stage 1: tests


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    counts = Counter()
    failures, skips = [], Counter()
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}"
        kids = {k.tag: k for k in c}
        if "failure" in kids or "error" in kids:
            k = kids.get("failure", kids.get("error"))
            counts["failed"] += 1
            failures.append({"test": name, "message": (k.get("message") or k.text or "")[:800]})
        elif "skipped" in kids:
            counts["skipped"] += 1
            skips[(kids["skipped"].get("message") or "")[:200]] += 1
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "failures": failures, "skip_reasons": dict(skips)}


def stage_tests(kit: Kit, prev) -> dict:
    t0 = time.perf_counter()
    rec = _start(kit, 1, None)  # always the whole suite again
    junit = kit.out / "stage1_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/kernels", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    import importlib.util

    if importlib.util.find_spec("pytest_timeout") is not None:  # on the GPU machine: a hung test fails alone
        cmd += ["--timeout", "300"]
    if kit.dry:
        # a dry run proves the plumbing: one fast test module is enough (on a CPU all of them skip)
        cmd[5] = "tests/kernels/test_gpu.py"
        cmd += ["-k", "test_decode_kernels and M1-in200"]
    rec["command"] = " ".join(cmd[1:])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, kit.left()))
    except subprocess.TimeoutExpired as e:
        rec["log_tail"] = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                           else (e.stdout or ""))[-3000:]
        return _finish(kit, rec, False, t0, "pytest did not finish before the --budget-s deadline (a hang?)")
    rec["returncode"] = proc.returncode
    rec["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
    if not junit.is_file():
        rec["status"] = "failed"
        rec["reason"] = f"pytest wrote no report (exit {proc.returncode})"
        return _finish(kit, rec, True, t0)
    rec.update(parse_junit(junit))
    c = rec["counts"]
    if c.get("failed"):
        rec["status"] = "failed"
        rec["reason"] = f"{c['failed']} test(s) failed"
    elif not c.get("passed") and c.get("skipped"):
        reason = max(rec["skip_reasons"], key=rec["skip_reasons"].get)
        rec["status"] = "dry-run" if kit.dry else "skipped"
        rec["reason"] = f"all {c['skipped']} GPU tests skipped: {reason}"
    elif not c:
        rec["status"] = "failed"
        rec["reason"] = "pytest collected no test"
    return _finish(kit, rec, True, t0)


# ----------------------------------------------------------------------------- stages 2-3: kernels


def _sweep_args(kit: Kit):
    return argparse.Namespace(warmup=1 if kit.dry else 10, iters=3 if kit.dry else 100, timing="graph",
                              compile_mode="max-autotune-no-cudagraphs")


def _sweep_plan(kit: Kit, tag: str = "", compile_subset: bool = True) -> list[tuple[dict, list]]:
    """[(case, methods)] in run order."""
    import bench_kernels as bk

    if kit.dry:
        main = bk.plan(["tiny"], [0.4], [1, 4], bk.TINY_SHAPES, tag)
        subset = bk.plan(["tiny"], [0.4], [1], {"tiny": bk.TINY_SHAPES["tiny"][:1]}, "compile")
    else:
        main = bk.plan(list(bk.SHAPES), REDUCTIONS, HEADLINE_MS, bk.SHAPES, tag)
        subset = bk.plan(["llama2-7b"], [COMPILE_SUBSET["reduction"]], COMPILE_SUBSET["M"],
                         {"llama2-7b": COMPILE_SUBSET["shapes"]}, "compile")
    if tag:  # the tuned re-sweep: the table's choice against the baselines
        return [(c, ["dense", "unfused", "ours"]) for c in main]
    plan = [(c, ["dense", "unfused", "ours", *bk.DECODE_VARIANTS]) for c in main]
    if compile_subset:
        plan += [(c, ["unfused", "compiled", "ours"]) for c in subset]
    return plan


def _run_sweep(kit: Kit, rec: dict, plan, key: str = "rows") -> bool:
    """Measure the cases of `plan` not yet in rec[key]; save after each. False if the deadline came."""
    import bench_kernels as bk

    if "roofline" not in rec:
        rec["roofline"] = bk.measure_roofline(torch.bfloat16, kit.device)
        if rec["roofline"].get("copy_GBps"):
            kit.log(f"copy {rec['roofline']['copy_GBps']:.0f} GB/s, GEMM {rec['roofline']['gemm_TFLOPs']:.0f} TFLOP/s")
    rows = rec.setdefault(key, [])
    done = {bk.case_key(r) for r in rows}
    args = _sweep_args(kit)
    dtype = torch.bfloat16 if kit.cuda else torch.float32
    for case, methods in plan:
        if bk.case_key(case) in done:
            continue
        if kit.expired():
            return False
        try:
            row = bk.run_case(case, dtype, methods, rec["roofline"], args, kit.device)
        except Exception as e:  # one broken case must not lose the others
            row = {**case, "error": f"{type(e).__name__}: {str(e)[:500]}", "results": {}}
        rows.append(row)
        kit.log(bk.format_row(row, methods) if "error" not in row else f"{bk.case_key(case)}: {row['error']}")
        kit.save(rec, "incomplete", "in progress")
    return True


def stage_sweep(kit: Kit, prev) -> dict:
    t0 = time.perf_counter()
    rec = _start(kit, 2, prev)
    rec["dtype"] = "bf16" if kit.cuda else "fp32 (CPU plumbing)"
    rec["timing"] = "CUDA graph of 100 calls, rotating operands, median of 7 replays" if kit.cuda else \
        "host clock, torch path (CPU plumbing check, not a measurement)"
    rec["config_table"] = os.environ.get("LRINFER_KERNEL_CONFIG") or "built-in defaults / lrinfer/runtime/kernels/configs"
    complete = _run_sweep(kit, rec, _sweep_plan(kit))
    return _finish(kit, rec, complete, t0)


@contextlib.contextmanager
def kernel_table(table: Path | None):
    """Make the op read its kernel configs from `table` (None: as it is) inside the block."""
    from lrinfer.runtime.kernels import configs
    old = os.environ.get("LRINFER_KERNEL_CONFIG")
    if table is not None:
        os.environ["LRINFER_KERNEL_CONFIG"] = str(table)
    configs.load_gpu_table.cache_clear()
    configs.get_config.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LRINFER_KERNEL_CONFIG", None)
        else:
            os.environ["LRINFER_KERNEL_CONFIG"] = old
        configs.load_gpu_table.cache_clear()
        configs.get_config.cache_clear()


def stage_tune(kit: Kit, prev) -> dict:
    import bench_kernels as bk
    import tune_kernels as tk

    t0 = time.perf_counter()
    rec = _start(kit, 3, prev)
    if kit.dry:
        shapes = [(i, o, bk.rank_for(i, o, 0.4)) for i, o in bk.TINY_SHAPES["tiny"]]
        ms, iters = [1, 4], 3
    else:
        shapes = [(i, o, bk.rank_for(i, o, 0.4)) for m in bk.SHAPES for i, o in bk.SHAPES[m]]
        ms, iters = HEADLINE_MS, 30
    rec["tune_shapes"], rec["tune_M"] = shapes, list(ms)
    table = kit.tuned_table()
    gpu = torch.cuda.get_device_name(0) if kit.cuda else "cpu"

    def save_partial(res):
        rec["tune"] = res
        write_json(table, tk.table_json(res, gpu))
        kit.save(rec, "incomplete", "in progress")

    res = tk.tune(shapes, ms, iters, torch.bfloat16 if kit.cuda else torch.float32, kit.device,
                  done=rec.get("tune"), deadline=kit.deadline, on_bucket=save_partial)
    rec["tune"] = res
    write_json(table, tk.table_json(res, gpu))
    rec["tuned_table"] = table.name
    if not res.get("complete"):
        return _finish(kit, rec, False, t0)
    with kernel_table(table):
        complete = _run_sweep(kit, rec, _sweep_plan(kit, tag="tuned"))
    rec["install"] = (f"mkdir -p lrinfer/runtime/kernels/configs && cp {os.path.relpath(table, ROOT)} "
                      f"lrinfer/runtime/kernels/configs/{gpu_slug()}.json  # the op reads it from there on this GPU")
    return _finish(kit, rec, complete, t0)


# ----------------------------------------------------------------------------- stage 4: e2e


def stage_e2e(kit: Kit, prev) -> dict:
    import decoder

    t0 = time.perf_counter()
    rec = _start(kit, 4, prev)
    if kit.dry:
        cfg, dtype, batches, prompt, new, reds = decoder.DecoderConfig.tiny(), torch.float32, [1, 2], 8, 4, [0.0, 0.4]
        if kit.cuda:
            dtype = torch.bfloat16
    else:
        cfg, dtype, batches, prompt, new, reds = decoder.DecoderConfig.llama2_7b(32), torch.bfloat16, [1, 8, 32], \
            128, 128, [0.0, 0.4]
    rec["config"] = decoder.config_dict(cfg)
    rec.update(prompt_len=prompt, new_tokens=new, batches=batches, dtype=str(dtype))
    table = kit.tuned_table() if kit.cuda else None
    use = table is not None and table.is_file()
    rec["config_table"] = table.name if use else ("built-in defaults (stage 3 not done)" if kit.cuda
                                                  else "CPU: torch path")
    rows = rec.setdefault("rows", [])
    complete = True
    with kernel_table(table if use else None):
        for red in reds:
            if any(r["reduction"] == red for r in rows):
                continue
            if kit.expired():
                complete = False
                break
            model = decoder.build(cfg, red, dtype, kit.device)
            check = decoder.check_lowrank_layers(model) if red > 0 else {}
            new_rows = []
            for b in batches:
                r = decoder.decode_benchmark(model, b, prompt, new, graph=kit.cuda)
                r.update(reduction=red, layer_rel_err=check)
                new_rows.append(r)
                g = r["graph_tokens_per_s"]
                kit.log(f"{'dense' if red == 0 else f'lowrank {red:.0%}':>13} batch {b:>3}: graph "
                        f"{g if g is None else round(g, 1)} tok/s, eager {r['eager_tokens_per_s']:.1f} tok/s, "
                        f"peak {r.get('peak_GiB', float('nan')):.2f} GiB")
            rows.extend(new_rows)
            del model
            if kit.cuda:
                torch.cuda.empty_cache()
            kit.save(rec, "incomplete", "in progress")
    dense = {r["batch"]: r for r in rows if r["reduction"] == 0}
    for r in rows:
        d = dense.get(r["batch"])
        if d is None:
            continue
        for kind in ("graph", "eager"):
            a, b = r.get(f"{kind}_tokens_per_s"), d.get(f"{kind}_tokens_per_s")
            r[f"{kind}_speedup_vs_dense"] = a / b if a and b else None
    if not kit.cuda:
        rec["graph"] = NO_CUDA
    return _finish(kit, rec, complete, t0)


RUNNERS = {1: stage_tests, 2: stage_sweep, 3: stage_tune, 4: stage_e2e, 5: stage_compress}


# ----------------------------------------------------------------------------- main


def run(stages, out: Path, dry: bool, budget_s: float, force: bool = False, llama_layers: int = 4,
        student: str | None = None, log=_log, export_dir: str | None = None) -> dict:
    kit = Kit(out, dry, budget_s, force, llama_layers, student, log, export_dir)
    results = {}
    for n in stages:
        prev = kit.load(n)
        finished = "dry-run" if dry else "done"
        if prev and prev.get("status") == finished and bool(prev.get("dry_run")) == dry and not force:
            log(f"stage {n} ({STAGES[n][0]}): {finished} earlier, kept (--force to run again)")
            results[n] = prev
            continue
        if kit.expired():
            log(f"stage {n} ({STAGES[n][0]}): not started, the --budget-s deadline has passed")
            break
        log(f"== stage {n} ({STAGES[n][0]}): {STAGES[n][1]}" + (" [dry run]" if dry else ""))
        try:
            results[n] = RUNNERS[n](kit, prev if not force else None)
        except Exception as e:
            import traceback

            rec = {**(kit.load(n) or {}), "stage": n, "name": STAGES[n][0], "title": STAGES[n][1], "status": "failed",
                   "dry_run": dry, "device": kit.device, "env": env_meta(),
                   "reason": f"{type(e).__name__}: {str(e)[:800]}", "traceback": traceback.format_exc()[-4000:]}
            kit.save(rec)
            results[n] = rec
        log(f"stage {n}: {results[n]['status']}" + (f" — {results[n]['reason']}" if results[n].get("reason") else ""))
        write_summary(kit.out)
        if kit.export_dir is not None:
            export(kit.out, kit.export_dir)
    write_summary(kit.out)
    if kit.export_dir is not None:
        export(kit.out, kit.export_dir)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", type=int, choices=list(STAGES), help="stage(s) to run")
    ap.add_argument("--all", action="store_true", help="every stage not done yet, in order")
    ap.add_argument("--out", default=None, help="result folder (default bench/results/gpu-<gpu-slug>; "
                                                 "without CUDA out/gpu-kit-dryrun)")
    ap.add_argument("--force", action="store_true", help="run stages again even when done")
    ap.add_argument("--dry-run", action="store_true", help="tiny version of every stage (automatic without CUDA)")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="stop starting new work after this many seconds (the device tool kills a command at 600)")
    ap.add_argument("--llama-layers", type=int, default=4,
                    help="stage 5: layers of the Llama-2-7B-shaped model to compress (time is extrapolated to 32)")
    ap.add_argument("--student", default=None, help="stage 5 / --prepare: the trained student directory")
    ap.add_argument("--export", default=None, help="also pack the folder into EXPORT/gpu-kit.tgz (+ summary.md)")
    ap.add_argument("--summary", action="store_true", help="only rewrite summary.md / summary.json")
    ap.add_argument("--prepare", action="store_true", help="CPU side: fill out/gpu-kit-carry for stage 5")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.student)
        return 0
    dry = args.dry_run or not torch.cuda.is_available()
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" / f"gpu-{gpu_slug()}" if not dry
                                           else ROOT / "out" / "gpu-kit-dryrun")
    if args.summary:
        print(write_summary(out))
    else:
        stages = sorted(set(args.stage or [])) or (list(STAGES) if args.all else None)
        if not stages:
            ap.error("give --stage N [N ...] or --all (or --summary / --prepare)")
        run(stages, out, dry, args.budget_s, args.force, args.llama_layers, args.student, export_dir=args.export)
        print(write_summary(out))
    if args.export:
        print(f"exported {export(out, Path(args.export))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
