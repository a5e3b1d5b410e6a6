"""The phases of bench/gpu_quick.py. Each runs in its own child process (`child_main`) and appends
one fsynced JSONL record per measurement as it is taken.

On the GPU: bf16/fp16, CUDA-graph timing (bench_kernels.time_graph), the Llama shapes.
Dry (--dry, the parent sets TRITON_INTERPRET=1 and hides CUDA): tiny shapes on the CPU, the kernels
through Triton's interpreter (its bf16 dot is broken, so fp16/fp32), host-clock stand-ins for CUDA
timing, sequential stand-ins for streams and graphs. Every record then says "dry": true.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
import traceback

import torch
import torch.nn.functional as F

import bench_kernels as bk
from quick_report import STALL_ENV, append_record, make_record, read_records

RATIO = 0.4
DECODE_VARIANTS = ("two_launch", "two_launch_pdl", "fused")
CORRECT_VARIANTS = ("two_launch", "two_launch_pdl", "prefill", "fused")   # barrier-free ones first
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}    # ‖y − ref‖ / ‖ref‖


class Ctx:
    """One phase's device, dry flag, ceilings from phase env, and its record writer."""

    def __init__(self, phase: str, jsonl, run: str, t0: float, dry: bool):
        self.phase, self.jsonl, self.run, self.t0, self.dry = phase, jsonl, run, t0, dry
        if not dry and not torch.cuda.is_available():
            raise SystemExit("gpu_quick: no CUDA device (use --dry for the CPU dry run)")
        self.dev = torch.device("cpu" if dry else "cuda")
        self.cuda = self.dev.type == "cuda"
        self.dtypes = (torch.float16, torch.float32) if dry else (torch.bfloat16, torch.float16)
        self.dtype = torch.float32 if dry else torch.bfloat16     # timings
        self.env = compact_env(self.dev)
        self.stall = os.environ.get(STALL_ENV) == phase
        self.ceilings = {r["name"]: r["value"] for r in read_records(jsonl, run)
                         if r["phase"] == "env" and r["name"] in ("copy_bandwidth", "gemm_rate")}

    def rec(self, name, value=None, unit=None, **kw) -> None:
        env = kw.pop("env", self.env)
        for key in ("dtype",):
            if isinstance(kw.get(key), torch.dtype):
                kw[key] = str(kw[key]).replace("torch.", "")
        append_record(self.jsonl, make_record(self.run, self.phase, name, value, unit, dry=self.dry, t0=self.t0,
                                              env=env, **kw))
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {self.phase}/{name} {kw.get('variant') or ''} {kw.get('dtype') or ''} {kw.get('shape') or ''}: "
              f"{shown} {unit or ''}", flush=True)
        if self.stall:   # tests: behave like a hung kernel after the first record
            time.sleep(3600)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def error(self, e: Exception, **kw):
        self.rec("error", None, None, error=f"{type(e).__name__}: {str(e)[:400]}",
                 traceback=traceback.format_exc()[-1500:], **{"pass": False, **kw})


def compact_env(dev) -> dict:
    env = {"host": platform.node(), "pid": os.getpid(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["gpu"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    return env


# ----------------------------------------------------------------------------- ranks and operands


def compress_rank(in_f: int, out_f: int, ratio: float = RATIO) -> int:
    """The rank `compress` emits for one linear at `ratio`: CompressConfig's allocator and rank_multiple,
    read at run time (the uniform split where the default allocator needs a model's spectra)."""
    from lrinfer.offline.allocation.base import get_allocator
    from lrinfer.offline.compress import CompressConfig
    from lrinfer.runtime.architecture import LinearInfo

    cfg = CompressConfig(ratio=ratio)
    alloc = get_allocator(cfg.allocation)
    if alloc.needs_spectra:
        alloc = get_allocator("uniform")
    return alloc([LinearInfo("w", 0, "w", in_f, out_f)], ratio, cfg.rank_multiple, None)["w"]


def ressvd_split(in_f: int, out_f: int, k: int) -> tuple[int, int]:
    """(k1, k2): the ResSVD solver's main/residual split of rank k with its default beta."""
    from lrinfer.offline.solvers.base import get_solver
    from lrinfer.offline.solvers.ressvd import residual_rank

    k2 = residual_rank(out_f, in_f, k, get_solver("ressvd").options()["beta"])
    return k - k2, k2


def rank_multiple() -> int:
    from lrinfer.offline.compress import CompressConfig

    return CompressConfig().rank_multiple


def timed_shapes(dry: bool) -> list[tuple[int, int]]:
    """The four largest key shapes by parameters, then 4096→4096 (a target's shape) if not among them."""
    if dry:
        return list(bk.TINY_SHAPES["tiny"][:1])
    shapes = [s for m in bk.SHAPES for s in bk.SHAPES[m]]
    top = sorted(shapes, key=lambda s: -s[0] * s[1])[:4]
    return top + [s for s in [(4096, 4096)] if s not in top]


def operands(M, in_f, out_f, k, k2=0, bias=False, dtype=torch.bfloat16, dev="cuda"):
    """Fresh random x [M, in], V [in, k], U [out, k], bias [out], V2 [in, k2], U2 [out, k2]; y is O(1)."""
    kt = k + k2

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    x, V, U = r(M, in_f), r(in_f, k, scale=in_f**-0.5), r(out_f, k, scale=kt**-0.5)
    b = r(out_f) if bias else None
    V2, U2 = (r(in_f, k2, scale=in_f**-0.5), r(out_f, k2, scale=kt**-0.5)) if k2 else (None, None)
    return x, V, U, b, V2, U2


def ref64(x, V, U, b=None, V2=None, U2=None):
    from lrinfer.runtime.kernels import lowrank_linear_reference

    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lowrank_linear_reference(d(x), d(V), d(U), d(b), d(V2), d(U2))


def rel_err(y, ref) -> float:
    e = float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    return e if math.isfinite(e) else float("inf")


def kernel_fn(variant: str, M: int, in_f: int, out_f: int, k_total: int, dev):
    """fn(x, V, U, b=None, V2=None, U2=None[, out=None]) running one kernel variant with the config
    table's tiles: two_launch / two_launch_pdl / fused (decode), prefill (Triton GEMMs), or ours
    (`lowrank_linear`, the table's own choice; on the CPU its torch path)."""
    from lrinfer.runtime.kernels import configs, fused_decode, lowrank_linear, prefill

    cuda = dev.type == "cuda"
    idx = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else 0
    cfg = configs.get_config(max(M, 1), in_f, out_f, k_total, configs.device_slug(idx) if cuda else "")
    if variant == "ours":
        return lambda x, V, U, b=None, V2=None, U2=None: lowrank_linear(x, V, U, b, V2, U2)
    if variant == "prefill":
        pcfg = {**cfg, "method": "triton"}
        return lambda x, V, U, b=None, V2=None, U2=None: prefill.lowrank_prefill(x, V, U, b, V2, U2, cfg=pcfg)
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}")
    dcfg = {**cfg, "method": variant}
    fused = variant == "fused"
    mp = configs.num_sms(idx) if cuda else (1 if fused else 8)   # interpreted fused: a grid of one program

    def fn(x, V, U, b=None, V2=None, U2=None, out=None):
        return fused_decode.lowrank_decode(x, V, U, b, V2, U2, cfg=dcfg, fused=fused,
                                           pdl=variant == "two_launch_pdl", max_programs=mp, out=out)
    return fn


def _shape(M, i, o, k, k2=0, bias=None):
    s = {"M": M, "in": i, "out": o, "k": k}
    if k2:
        s["k2"] = k2
    if bias is not None:
        s["bias"] = bias
    return s


# ----------------------------------------------------------------------------- 1 env


def _nvidia_smi() -> dict:
    fields = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,utilization.gpu,persistence_mode")
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=15)
        vals = [v.strip() for v in p.stdout.strip().splitlines()[0].split(",")] if p.returncode == 0 else []
        return dict(zip(fields.split(","), vals)) if vals else {"error": (p.stderr or "no output")[:200]}
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def phase_env(ctx: Ctx) -> None:
    from lrinfer.runtime.kernels import configs, fused_decode

    env = dict(ctx.env)
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
                   memory_GiB=round(p.total_memory / 2**30, 1), l2_MB=getattr(p, "L2_cache_size", 0) / 1e6,
                   nvidia_smi=_nvidia_smi(), gpu_slug=configs.device_slug(0),
                   gpu_config_table=(configs.CONFIG_DIR / f"{configs.device_slug(0)}.json").is_file())
    env.update(launch=fused_decode.launch_features(), rank_multiple=rank_multiple(),
               decode_default=configs.DEFAULTS[1], cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx.rec("environment", env=env)
    if ctx.cuda:   # bench_kernels' ceilings: 1 GiB device-to-device copy, 8192³ bf16 GEMM on random data
        roof = bk.measure_roofline(torch.bfloat16, "cuda")
        how = {"copy": "1 GiB device-to-device copy, bytes read + written, CUDA events, median of 20",
               "gemm": "8192^3 bf16 matmul, random data, CUDA events, median of 20"}
    else:          # stand-ins on the CPU, so the later phases' fractions have something to divide by
        a = torch.randn(8 * 2**20)
        b = torch.empty_like(a)
        us = bk.time_host(lambda: b.copy_(a), [()], 1, 5)
        x = torch.randn(256, 256)
        us_mm = bk.time_host(lambda: x @ x, [()], 1, 5)
        roof = {"copy_GBps": 2 * a.numel() * 4 / (us * 1e-6) / 1e9, "gemm_TFLOPs": 2 * 256**3 / (us_mm * 1e-6) / 1e12}
        how = {"copy": "dry stand-in: 32 MB host copy, host clock", "gemm": "dry stand-in: 256^3 fp32 CPU matmul"}
    ctx.rec("copy_bandwidth", roof["copy_GBps"], "GB/s", method=how["copy"])
    ctx.rec("gemm_rate", roof["gemm_TFLOPs"], "TFLOP/s", method=how["gemm"])
    if ctx.cuda:
        ctx.rec("clocks_after_gemm", None, None, nvidia_smi=_nvidia_smi())


# ----------------------------------------------------------------------------- 2 correctness


def correctness_cases(dry: bool) -> list[tuple]:
    """(M, in, out, k1, k2, bias): key shapes with compress's ranks, a ResSVD pair, and odd tails."""
    if dry:
        (i1, o1), (i2, o2) = bk.TINY_SHAPES["tiny"]
        k1, k2 = compress_rank(i1, o1), compress_rank(i2, o2)
        return [(1, i1, o1, k1, 0, False), (4, i2, o2, k2, 0, True), (3, i1, o1, *ressvd_split(i1, o1, k1), True)]
    ka, kb, kc = compress_rank(4096, 4096), compress_rank(4096, 11008), compress_rank(11008, 4096)
    return [(1, 4096, 4096, ka, 0, False), (16, 4096, 11008, kb, 0, True),
            (5, 11008, 4096, *ressvd_split(11008, 4096, kc), True), (3, 1000, 700, 77, 13, True)]


def phase_correct(ctx: Ctx) -> None:
    prefill_m = 33 if ctx.dry else 257
    for variant in CORRECT_VARIANTS:
        for dtype in ctx.dtypes:
            for M, i, o, k1, k2, bias in correctness_cases(ctx.dry):
                M = prefill_m if variant == "prefill" else M
                shape = _shape(M, i, o, k1, k2, bias)
                try:
                    x, V, U, b, V2, U2 = operands(M, i, o, k1, k2, bias, dtype, ctx.dev)
                    fn = kernel_fn(variant, M, i, o, k1 + k2, ctx.dev)
                    if variant == "prefill":
                        y = fn(x, V, U, b, V2, U2)
                    else:   # poisoned output: every element must be written
                        y = torch.full((M, o), float("nan"), dtype=dtype, device=ctx.dev)
                        fn(x, V, U, b, V2, U2, out=y)
                    ctx.sync()
                    written = bool(torch.isfinite(y).all())
                    err = rel_err(y, ref64(x, V, U, b, V2, U2))
                    ctx.rec("rel_err", err, "rel_l2", variant=variant, dtype=dtype, shape=shape, tol=TOL[dtype],
                            all_written=written, **{"pass": written and err <= TOL[dtype]})
                except Exception as e:   # one broken case must not hide the others
                    ctx.error(e, variant=variant, dtype=dtype, shape=shape)


# ----------------------------------------------------------------------------- 3 two-stream stress


def _streams(ctx: Ctx, n: int):
    return [torch.cuda.Stream() for _ in range(n)] if ctx.cuda else [None] * n


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def phase_stress(ctx: Ctx, iters: int = 300, cap_s: float = 45.0) -> None:
    """The fused kernel launched from two streams at once; every 50 iterations both streams are held
    by a device-side sleep so that launches pile up and then run concurrently. Every output is kept
    and checked against float64 at the end."""
    if ctx.dry:
        iters, cap_s = 4, 30.0
    dtype = ctx.dtype
    shapes = [(4, 64, 96), (2, 96, 48)] if ctx.dry else [(16, 4096, 11008), (4, 4096, 4096)]
    per_stream = []
    for M, i, o in shapes:
        k = compress_rank(i, o)
        _, V, U, _, _, _ = operands(1, i, o, k, dtype=dtype, dev=ctx.dev)
        xs = [operands(M, i, o, 1, dtype=dtype, dev=ctx.dev)[0] for _ in range(4)]
        refs = [ref64(x, V, U) for x in xs]
        per_stream.append((kernel_fn("fused", M, i, o, k, ctx.dev), xs, V, U, refs, _shape(M, i, o, k)))
    streams = _streams(ctx, 2)
    outs: list[list] = [[], []]
    ctx.sync()
    for s, (fn, xs, V, U, _, _) in zip(streams, per_stream):   # compile, workspaces cached per stream
        with _on(s):
            fn(xs[0], V, U)
    ctx.sync()
    t0 = time.perf_counter()
    it = 0
    while it < iters:
        if ctx.cuda and it % 50 == 0:
            for s in streams:
                with _on(s):
                    torch.cuda._sleep(2_000_000)   # ~1 ms: both queues fill
        for j, (s, (fn, xs, V, U, _, _)) in enumerate(zip(streams, per_stream)):
            with _on(s):
                outs[j].append((it % 4, fn(xs[it % 4], V, U)))
        it += 1
        if it % 50 == 0 or it == iters:
            ctx.sync()
            ctx.rec("progress", it, "iterations", seconds=round(time.perf_counter() - t0, 3))
            if time.perf_counter() - t0 > cap_s:
                break
    ctx.sync()
    seconds = time.perf_counter() - t0
    errs, bad = [], 0
    for j, (_, _, _, _, refs, _) in enumerate(per_stream):
        for which, y in outs[j]:
            e = rel_err(y, refs[which])
            errs.append(e)
            bad += not e <= TOL[dtype]
    from lrinfer.runtime.kernels import fused_decode

    ctx.rec("two_streams", max(errs), "rel_l2", variant="fused", dtype=dtype, shapes=[p[5] for p in per_stream],
            iterations=it, seconds=round(seconds, 3), outputs_checked=len(errs), outputs_bad=bad, tol=TOL[dtype],
            capped=it < iters, launch=fused_decode.decode_launch_info(),
            note="" if ctx.cuda else "dry: no CUDA streams, sequential stand-in",
            **{"pass": bad == 0})


# ----------------------------------------------------------------------------- 4 graphs, 8 shared


def _capture(ctx: Ctx, fn, args, stream):
    """(graph, static output) of fn(*args) captured on `stream` after a warm-up there (None off CUDA)."""
    if not ctx.cuda:
        return None, None
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        y = fn(*args)
    torch.cuda.synchronize()
    return g, y


def phase_graphs(ctx: Ctx, replays: int = 5) -> None:
    """Capture on one stream, replay on another with fresh inputs; compare with float64 and eager."""
    replays = 2 if ctx.dry else replays
    i, o = (64, 96) if ctx.dry else (4096, 11008)
    k = compress_rank(i, o)
    dtype = ctx.dtype
    for variant in (*DECODE_VARIANTS, "ours", "prefill"):
        M = (33 if ctx.dry else 257) if variant == "prefill" else (2 if ctx.dry else 4)
        shape = _shape(M, i, o, k, bias=True)
        try:
            x_static, V, U, b, _, _ = operands(M, i, o, k, bias=True, dtype=dtype, dev=ctx.dev)
            fn = kernel_fn(variant, M, i, o, k, ctx.dev)
            s_cap, s_rep = _streams(ctx, 2)
            g, y_static = _capture(ctx, fn, (x_static, V, U, b), s_cap)
            e_ref, e_eager = [], []
            for _ in range(replays):
                x = operands(M, i, o, 1, dtype=dtype, dev=ctx.dev)[0]
                if ctx.cuda:
                    s_rep.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s_rep):
                        x_static.copy_(x)
                        g.replay()
                    torch.cuda.current_stream().wait_stream(s_rep)
                    y_g = y_static.clone()
                else:    # stand-in: an eager call in place of the replay
                    y_g = fn(x, V, U, b)
                y_e = fn(x, V, U, b)
                ctx.sync()
                e_ref.append(rel_err(y_g, ref64(x, V, U, b)))
                e_eager.append(rel_err(y_g, y_e))
            ctx.rec("graph_replay", max(e_ref), "rel_l2", variant=variant, dtype=dtype, shape=shape,
                    vs_eager=max(e_eager), replays=replays, tol=TOL[dtype],
                    note="captured on stream A, replayed on stream B" if ctx.cuda else
                         "dry: no CUDA graph, eager stand-in", **{"pass": max(e_ref) <= TOL[dtype]})
            del g
        except Exception as e:
            ctx.error(e, variant=variant, dtype=dtype, shape=shape)


def phase_shared(ctx: Ctx, rounds: int = 20) -> None:
    """A graph replayed on stream B while eager calls run on its capture stream A, which hold the same
    cached workspace and counters (issue 23 item 5). two_launch can only give wrong results here; the
    fused kernel's barrier may hang, so it goes last and this phase runs last."""
    i, o, M = (64, 96, 2) if ctx.dry else (4096, 14336, 16)
    k = compress_rank(i, o)
    dtype = ctx.dtype
    for variant in ("two_launch", "fused"):
        shape = _shape(M, i, o, k)
        try:
            x_static, V, U, _, _, _ = operands(M, i, o, k, dtype=dtype, dev=ctx.dev)
            fn = kernel_fn(variant, M, i, o, k, ctx.dev)
            s_cap, s_rep = _streams(ctx, 2)
            g, y_static = _capture(ctx, fn, (x_static, V, U), s_cap)
            errs, bad = [], 0
            for r in range(rounds if ctx.cuda else 2):
                xa, xb = (operands(M, i, o, 1, dtype=dtype, dev=ctx.dev)[0] for _ in range(2))
                if ctx.cuda:
                    for s in (s_rep, s_cap):
                        s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s_rep):
                        torch.cuda._sleep(1_000_000)
                        x_static.copy_(xa)
                        g.replay()
                    with torch.cuda.stream(s_cap):
                        torch.cuda._sleep(1_000_000)
                        y_b = fn(xb, V, U)
                    torch.cuda.synchronize()
                    y_a = y_static
                else:
                    y_a, y_b = fn(xa, V, U), fn(xb, V, U)
                for y, x in ((y_a, xa), (y_b, xb)):
                    e = rel_err(y, ref64(x, V, U))
                    errs.append(e)
                    bad += not e <= TOL[dtype]
            ctx.rec("shared_counters", max(errs), "rel_l2", variant=variant, dtype=dtype, shape=shape,
                    rounds=len(errs) // 2, outputs_bad=bad, tol=TOL[dtype],
                    note="graph on stream B concurrent with eager on its capture stream A" if ctx.cuda else
                         "dry: sequential stand-in", **{"pass": bad == 0})
        except Exception as e:
            ctx.error(e, variant=variant, dtype=dtype, shape=shape)


# ----------------------------------------------------------------------------- 5 decode, 6 prefill


def _time_cases(ctx: Ctx, Ms, methods, warmup: int, iters: int, reps: int, max_sets: int) -> None:
    """Time each (M, shape, method) as a CUDA graph of `iters` calls over rotating operand sets,
    median of `reps` replays (dry: host clock), and record µs, bytes moved, GB/s and % of copy BW."""
    dtype = ctx.dtype
    es = torch.tensor([], dtype=dtype).element_size()
    copy = ctx.ceilings.get("copy_bandwidth")
    gemm = ctx.ceilings.get("gemm_rate")
    for M in Ms:
        for i, o in timed_shapes(ctx.dry):
            k = compress_rank(i, o)
            shape = _shape(M, i, o, k)
            dense_b, lr_b, act_b = i * o * es, (i + o) * k * es, M * (i + o) * es
            n_sets = max(2, min(max_sets, math.ceil(bk.ROTATE_BYTES / (dense_b + lr_b + act_b))))
            try:
                sets = [operands(M, i, o, k, dtype=dtype, dev=ctx.dev)[:3] for _ in range(n_sets)]
                W = [(U @ V.t()).contiguous() for _, V, U in sets]    # shape [out, in]
            except Exception as e:
                ctx.error(e, variant="operands", dtype=dtype, shape=shape)
                continue
            ref_rows = min(M, 256)
            ref = ref64(sets[0][0][:ref_rows], sets[0][1], sets[0][2])
            for j, method in enumerate(methods):
                name = "dense_repeat" if method == "dense" and j > 0 else method   # the repeat: timing noise
                try:
                    if method == "dense":
                        fn, args, wb, macs = (lambda x, w: F.linear(x, w)), [(s[0], w) for s, w in zip(sets, W)], \
                            dense_b, i * o
                    elif method == "unfused":
                        fn, args, wb, macs = (lambda x, V, U: (x @ V) @ U.t()), sets, lr_b, (i + o) * k
                    else:
                        kfn = kernel_fn(method, M, i, o, k, ctx.dev)
                        fn, args, wb, macs = (lambda x, V, U, kfn=kfn: kfn(x, V, U)), sets, lr_b, (i + o) * k
                    y = fn(*args[0])
                    ctx.sync()
                    err = rel_err(y[:ref_rows], ref)
                    if ctx.cuda:
                        us = bk.time_graph(fn, args, warmup, iters, reps)
                        timer = f"CUDA graph of {iters} calls over {n_sets} operand sets, median of {reps} replays"
                    else:
                        us = bk.time_host(fn, args, 0, 2)
                        timer = "dry stand-in: host clock on the CPU, median of 2 calls"
                    moved = wb + act_b
                    gbps = moved / (us * 1e-6) / 1e9
                    tflops = 2 * M * macs / (us * 1e-6) / 1e12
                    ctx.rec("time", us, "us", variant=name, dtype=dtype, shape=shape, bytes=moved, weight_bytes=wb,
                            GBps=gbps, copy_frac=gbps / copy if copy else None, TFLOPs=tflops,
                            gemm_frac=tflops / gemm if gemm else None, rel_err=err, timer=timer,
                            bytes_note="weights + x + y; the low-rank intermediate t is not counted")
                except Exception as e:
                    ctx.error(e, variant=name, dtype=dtype, shape=shape)
            del sets, W
            if ctx.cuda:
                torch.cuda.empty_cache()


def phase_decode(ctx: Ctx) -> None:
    _time_cases(ctx, (1,) if ctx.dry else (1, 16),
                ["dense", "unfused", *DECODE_VARIANTS, "ours", "dense"], warmup=10, iters=100, reps=7, max_sets=16)


def phase_prefill(ctx: Ctx) -> None:
    _time_cases(ctx, (64,) if ctx.dry else (8192,), ["dense", "unfused", "prefill", "ours"],
                warmup=3, iters=10, reps=5, max_sets=2)


# ----------------------------------------------------------------------------- 7 end to end


def phase_e2e(ctx: Ctx, layers: int = 32) -> None:
    """bench/decoder.py's Llama-2-7B-shaped decoder (random weights), batch 1, dense vs 40%, one CUDA
    graph per decode step on both sides. Ranks: compress's (decoder.py's own rank_for is replaced)."""
    import decoder

    decoder.rank_for = lambda i, o, r: compress_rank(i, o, r)
    if ctx.dry:
        cfg, prompt, new = decoder.DecoderConfig.tiny(), 8, 4
    else:
        cfg, prompt, new = decoder.DecoderConfig.llama2_7b(layers), 128, 128
    dtype = ctx.dtype
    h, f = cfg.hidden, cfg.intermediate
    ranks = {f"{i}x{o}": compress_rank(i, o) for i, o in {(h, h), (h, f), (f, h)}}
    rates = {}
    for red, name in ((0.0, "dense"), (RATIO, "lowrank_40")):
        try:
            model = decoder.build(cfg, red, dtype, ctx.dev)
            check = decoder.check_lowrank_layers(model) if red else {}
            r = decoder.decode_benchmark(model, 1, prompt, new, graph=ctx.cuda)
            rate = r["graph_tokens_per_s"] if ctx.cuda else r["eager_tokens_per_s"]
            rates[name] = rate
            ctx.rec("tokens_per_s", rate, "tokens/s", variant=name, dtype=dtype, layers=cfg.layers,
                    of_layers=32, batch=1, prompt_len=prompt, new_tokens=new, ranks=ranks if red else None,
                    eager_tokens_per_s=r["eager_tokens_per_s"], graph_vs_eager_rel_err=r.get("graph_vs_eager_rel_err"),
                    finite_logits=r["finite_logits"], peak_GiB=r.get("peak_GiB"), weights_GiB=r["weights_GiB"],
                    layer_rel_err=check,
                    timer=r["graph"] if ctx.cuda else "dry stand-in: eager decode on the CPU, host clock")
            del model
            if ctx.cuda:
                torch.cuda.empty_cache()
        except Exception as e:
            ctx.error(e, variant=name, dtype=dtype, layers=cfg.layers)
    if rates.get("dense") and rates.get("lowrank_40"):
        ctx.rec("speedup", rates["lowrank_40"] / rates["dense"], "x", variant="lowrank_40 vs dense", dtype=dtype,
                layers=cfg.layers, of_layers=32, note="random weights; embedding and LM head dense")


PHASE_FUNCS = {"env": phase_env, "correct": phase_correct, "stress": phase_stress, "graphs": phase_graphs,
               "decode": phase_decode, "prefill": phase_prefill, "e2e": phase_e2e, "shared": phase_shared}


def child_main(phase: str, jsonl, run: str, t0: float, dry: bool, e2e_layers: int = 32) -> int:
    ctx = Ctx(phase, jsonl, run, t0, dry)
    torch.manual_seed(int(t0 * 1000) % 2**31)   # fresh inputs each run
    try:
        if phase == "e2e":
            phase_e2e(ctx, e2e_layers)
        else:
            PHASE_FUNCS[phase](ctx)
    except Exception as e:
        ctx.error(e)
        return 1
    return 0
