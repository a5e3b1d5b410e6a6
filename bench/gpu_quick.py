"""First GPU contact in one call (issue 23 item 7): phases in priority order, each in a child
process with its own timeout, under one global deadline (--budget-s, default 480 s). Every
measurement is appended and fsynced to one JSONL file as it is taken, so a command killed at the
device tool's limit still returns what it measured.

    PYTHONPATH=. python3 bench/gpu_quick.py --out $OUT --budget-s 480      # on the GPU machine
    PYTHONPATH=. python bench/gpu_quick.py --dry                           # here: CPU dry run
    python bench/gpu_quick.py --summarize path/to/gpu_quick.jsonl          # the table again

Phases (bench/quick_phases.py):
  env      GPU, SMs, clocks, versions; copy bandwidth (1 GiB device-to-device) and bf16 GEMM rate
  correct  every kernel variant in bf16/fp16 vs float64, barrier-free ones first (two_launch,
           two_launch_pdl, prefill), then fused; bias and residual-pair (V2, U2) cases
  stress   the fused kernel from two CUDA streams at once, 300 iterations (45 s cap), every output checked
  graphs   CUDA graph captured on one stream, replayed on another, compared with eager calls
  decode   M=1 and M=16, the four largest key shapes (+ 4096→4096, a target's shape) at 40%:
           dense F.linear, unfused, each kernel variant; CUDA-graph timing; bytes moved, GB/s, % of copy BW
  prefill  M=8192, the same shapes: dense, unfused, Triton prefill, ours
  e2e      Llama-2-7B-shaped decoder (bench/decoder.py, random weights), batch 1, dense vs 40%, graphed
  shared   a graph replayed on another stream while eager calls run on its capture stream (the
           counters they may share, issue 23 item 5); last, since the fused kernel may hang there

Ranks are what `compress` emits for the ratio (the allocator and CompressConfig's rank_multiple,
read at run time). Files in --out: gpu_quick.jsonl (the records), gpu_quick.log (the children's
output), summary.md (rewritten after every phase). With --dry every phase runs on the CPU with
tiny shapes (Triton's interpreter for the kernels, host-clock stand-ins for CUDA timing); each
record says "dry": true and the targets ignore them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from quick_report import STALL_ENV, append_record, make_record, read_records, summarize  # noqa: E402

JSONL, LOG, SUMMARY = "gpu_quick.jsonl", "gpu_quick.log", "summary.md"
RESERVE_S = 5.0          # kept back from the deadline for the summary


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    need_s: float        # start only with at least this much time left
    timeout_s: float     # the child is killed after this (or at the deadline, if sooner)
    dry_need_s: float = 2.0
    dry_timeout_s: float = 120.0


PHASES = [
    Phase("env", "environment, copy bandwidth, GEMM rate", 20, 90),
    Phase("correct", "every kernel variant vs float64 (bf16, fp16)", 45, 150),
    Phase("stress", "fused kernel from two streams, 300 iterations", 40, 100),
    Phase("graphs", "CUDA graph captured on one stream, replayed on another", 30, 90),
    Phase("decode", "M=1 and M=16 timings, four largest shapes + 4096x4096", 60, 200),
    Phase("prefill", "M=8192 timings", 45, 120),
    Phase("e2e", "Llama-2-7B-shaped decoder, batch 1, dense vs 40%, graphed", 60, 180),
    Phase("shared", "graph replay concurrent with eager calls on the capture stream", 20, 45),
]
PHASE_BY_NAME = {p.name: p for p in PHASES}
E2E_FULL_LAYERS, E2E_SHORT_LAYERS, E2E_SHORT_BELOW_S = 32, 8, 150


def phase_timeout(phase: Phase, left_s: float, dry: bool, override: float | None = None) -> float | None:
    """Seconds the phase may run with `left_s` left before the deadline; None when it cannot fit."""
    need = phase.dry_need_s if dry else phase.need_s
    cap = override if override is not None else (phase.dry_timeout_s if dry else phase.timeout_s)
    avail = left_s - RESERVE_S
    if avail < min(need, cap):
        return None
    return min(cap, avail)


def _die_with_parent(parent_pid: int) -> None:
    """Child side: be killed when the runner dies (the device tool stops a command at its limit, but a
    child in its own session would outlive it and hold the GPU)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:   # the runner died before prctl took effect
        os._exit(3)


def _pump(stream, log_file, echo):
    for line in iter(stream.readline, ""):
        log_file.write(line)
        log_file.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_child(phase: Phase, out: Path, run_id: str, t0: float, dry: bool, timeout_s: float,
              extra_args: list[str], stall: str | None, echo: bool) -> tuple[str, int | None]:
    """Run one phase in a child process (its own session, so a timeout kills it and whatever it
    started, nothing else). Returns (status, returncode): done, failed or timeout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase.name, "--out", str(out),
           "--run", run_id, "--t0", repr(t0), "--parent-pid", str(os.getpid()), *extra_args] + \
        (["--dry"] if dry else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if dry:  # CPU only, the kernels through Triton's interpreter
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    if stall:
        env[STALL_ENV] = stall
    with open(out / LOG, "a") as log_file:
        log_file.write(f"== {phase.name}: {phase.title} (timeout {timeout_s:.0f} s)\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_file, echo), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "done" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the child's own process group only
            proc.wait()
            rc, status = None, "timeout"
        pump.join(timeout=5)
    return status, rc


def _log_tail(out: Path, n: int = 1500) -> str:
    try:
        return (out / LOG).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run(out: Path, budget_s: float = 480.0, dry: bool = False, phases: list[str] | None = None,
        timeouts: dict[str, float] | None = None, stall: str | None = None, e2e_layers: int | None = None,
        echo: bool = True) -> Path:
    """The parent: every phase in order, skipped when it cannot fit; returns the JSONL path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSONL
    t0 = time.time()
    start = time.monotonic()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t0)) + f"-{os.getpid()}"
    timeouts = timeouts or {}
    chosen = [p for p in PHASES if phases is None or p.name in phases]

    def rec(phase, name, value=None, unit=None, **kw):
        append_record(path, make_record(run_id, phase, name, value, unit, dry=dry, t0=t0,
                                        env={"host": os.uname().nodename, "python": sys.version.split()[0]}, **kw))

    rec("run", "run_start", budget_s, "s", phases=[p.name for p in chosen], argv=sys.argv[1:])
    for phase in chosen:
        left = budget_s - (time.monotonic() - start)
        timeout = phase_timeout(phase, left, dry, timeouts.get(phase.name))
        if timeout is None:
            need = phase.dry_need_s if dry else phase.need_s
            rec(phase.name, "skipped", reason=f"{left:.0f} s left before the deadline, the phase needs {need:.0f} s")
            print(f"gpu_quick: {phase.name} skipped ({left:.0f} s left)", flush=True)
            continue
        extra = []
        if phase.name == "e2e":
            layers = e2e_layers or (E2E_SHORT_LAYERS if left < E2E_SHORT_BELOW_S else E2E_FULL_LAYERS)
            extra = ["--e2e-layers", str(layers)]
        rec(phase.name, "phase_start", round(timeout, 1), "s", title=phase.title)
        print(f"gpu_quick: == {phase.name}: {phase.title} (timeout {timeout:.0f} s)", flush=True)
        t = time.monotonic()
        status, rc = run_child(phase, out, run_id, t0, dry, timeout, extra, stall, echo)
        secs = round(time.monotonic() - t, 1)
        if status == "done":
            rec(phase.name, "phase_done", secs, "s", seconds=secs)
        elif status == "timeout":
            rec(phase.name, "timeout", round(timeout, 1), "s", seconds=secs,
                reason=f"killed after its {timeout:.0f} s timeout", log_tail=_log_tail(out))
        else:
            rec(phase.name, "failed", rc, "returncode", seconds=secs, reason=f"exit {rc}", log_tail=_log_tail(out))
        print(f"gpu_quick: {phase.name} {status} in {secs} s", flush=True)
        (out / SUMMARY).write_text(summarize(read_records(path, run_id)))
    rec("run", "run_end", round(time.monotonic() - start, 1), "s")
    (out / SUMMARY).write_text(summarize(read_records(path, run_id)))
    return path


def _default_out(dry: bool) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return ROOT / "out" / "gpu_quick_dry" / stamp if dry else ROOT / "bench" / "results" / "gpu_quick" / stamp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for gpu_quick.jsonl, gpu_quick.log, summary.md "
                                                "(default bench/results/gpu_quick/<time>; --dry: out/gpu_quick_dry/<time>)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="global deadline in seconds (default 480)")
    ap.add_argument("--dry", action="store_true", help="CPU dry run: tiny shapes, stand-ins, records marked dry")
    ap.add_argument("--phases", nargs="+", choices=list(PHASE_BY_NAME), help="run only these (in the usual order)")
    ap.add_argument("--timeout", nargs="+", default=[], metavar="PHASE=S", help="override a phase's timeout")
    ap.add_argument("--e2e-layers", type=int, default=None,
                    help=f"decoder layers for e2e (default {E2E_FULL_LAYERS}, {E2E_SHORT_LAYERS} when under "
                         f"{E2E_SHORT_BELOW_S} s are left)")
    ap.add_argument("--summarize", metavar="FILE.jsonl", help="print the summary of a JSONL file and exit")
    ap.add_argument("--quiet", action="store_true", help="children's output only to gpu_quick.log")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(read_records(args.summarize)))
        return 0
    if args.child:
        if args.parent_pid:
            _die_with_parent(args.parent_pid)
        import quick_phases

        return quick_phases.child_main(args.child, Path(args.out) / JSONL, args.run, args.t0, args.dry,
                                       e2e_layers=args.e2e_layers or E2E_FULL_LAYERS)
    timeouts = {}
    for item in args.timeout:
        name, _, secs = item.partition("=")
        if name not in PHASE_BY_NAME or not secs:
            ap.error(f"--timeout takes PHASE=SECONDS with PHASE in {list(PHASE_BY_NAME)}; got {item!r}")
        timeouts[name] = float(secs)
    out = Path(args.out) if args.out else _default_out(args.dry)
    path = run(out, args.budget_s, args.dry, args.phases, timeouts, os.environ.get(STALL_ENV), args.e2e_layers,
               echo=not args.quiet)
    print(summarize(read_records(path)))
    print(f"gpu_quick: records in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
