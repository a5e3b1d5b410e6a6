"""`lrinfer kernels inspect`: the launcher's kernels compiled for sm_80/sm_90 on the CPU (no GPU),
their SASS facts and a static ESTIMATE of time beside dense (`lrinfer.runtime.kernels.inspect`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import LrinferError


def add_parser(sub) -> None:
    kp = sub.add_parser("kernels", help="the Triton kernels without a GPU: compiled code and a static estimate")
    ksub = kp.add_subparsers(dest="kernels_command", required=True)
    ki = ksub.add_parser("inspect", help="compile the launcher's exact kernels for sm_80/sm_90 on the CPU and "
                                         "report registers, spills, shared memory, SASS load widths, atomics, "
                                         "fences, occupancy and an ESTIMATE of time beside dense")
    ki.add_argument("--in", dest="in_features", type=int, required=True, help="input features of the linear")
    ki.add_argument("--out", dest="out_features", type=int, required=True, help="output features of the linear")
    ki.add_argument("--ratio", type=float, default=None,
                    help="parameters removed; the rank is the one `compress` emits (uniform allocation)")
    ki.add_argument("--rank", type=int, default=None, help="the total rank itself, instead of --ratio")
    ki.add_argument("--k2", type=int, default=0, help="rank of a residual pair (ResSVD) within the total, default 0")
    ki.add_argument("--rank-multiple", type=int, default=None,
                    help="with --ratio: round ranks to this multiple (default: compress's default)")
    ki.add_argument("--m", type=int, default=1, help="rows of x (tokens), default 1")
    ki.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ki.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_90"])
    ki.add_argument("--method", default="auto",
                    help="fused, two_launch, two_launch_pdl, triton (prefill), grouped (with --outs), a comma "
                         "list, or auto: the configured method for --m (prefill when that is cuBLAS)")
    ki.add_argument("--outs", default=None,
                    help="grouped: the shards' output features, e.g. 4096,1024,1024 (qkv); each shard's rank "
                         "is --ratio's (or --rank) for its own in x out_i; --out is ignored")
    ki.add_argument("--config", default=None, help='JSON object of config overrides, e.g. \'{"BLOCK_R": 64}\'')
    ki.add_argument("--bias", action="store_true", help="the layer has a bias")
    ki.add_argument("--dump", default=None, metavar="DIR",
                    help="write each kernel's cubin, PTX and SASS under DIR/<method>/")
    ki.add_argument("--json", action="store_true", help="print the report as JSON")
    ki.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _rank(args) -> int:
    from lrinfer.offline.config import CompressConfig
    from .factors import rank_for_ratio

    if (args.ratio is None) == (args.rank is None):
        raise LrinferError("kernels inspect: give exactly one of --ratio (the rank compress emits) or --rank")
    if args.rank is not None:
        return args.rank
    multiple = args.rank_multiple or CompressConfig.__dataclass_fields__["rank_multiple"].default
    try:
        return rank_for_ratio(args.in_features, args.out_features, args.ratio, multiple)
    except ValueError as e:
        raise LrinferError(f"kernels inspect: {e}") from None


def cmd_kernels(args) -> dict:
    from lrinfer.runtime.kernels import configs
    from lrinfer.runtime.kernels.inspect import compile_only

    rank = _rank(args)
    try:
        overrides = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as e:
        raise LrinferError(f"kernels inspect: --config is not JSON ({e.msg}); pass an object like "
                           '\'{"BLOCK_R": 64}\'') from None
    if not isinstance(overrides, dict):
        raise LrinferError("kernels inspect: --config must be a JSON object of config keys")
    r1 = rank - args.k2
    if r1 < 1 or args.k2 < 0:
        raise LrinferError(f"kernels inspect: --k2 {args.k2} must be in [0, rank - 1] = [0, {rank - 1}]")
    # what the kernels receive: ranks padded at load to RANK_ALIGN (lrinfer.runtime.nn.LowRankLinear)
    k1, k2 = configs.aligned_rank(r1), configs.aligned_rank(args.k2)
    if args.method == "auto":
        m = configs.get_config(args.m, args.in_features, args.out_features, k1 + k2)["method"]
        methods = ["triton" if m == "torch" else m]
    else:
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
    arch = int(args.arch.removeprefix("sm_"))
    results, written = [], []
    groups = None
    if "grouped" in methods:
        try:
            outs = [int(o) for o in (args.outs or "").split(",") if o.strip()]
        except ValueError:
            outs = []
        if not outs:
            raise LrinferError("kernels inspect: --method grouped needs --outs, e.g. --outs 4096,1024,1024")
        groups = [(o, configs.aligned_rank(_rank(argparse.Namespace(**{**vars(args), "out_features": o}))))
                  for o in outs]
    for method in methods:
        insp = compile_only(method, args.dtype, args.in_features, args.out_features, k1, k2, args.m,
                            overrides, arch, bias=args.bias, groups=groups if method == "grouped" else None)
        results.append(insp)
        if args.dump:
            written += [str(f) for f in insp.dump(Path(args.dump) / method)]
    report = {"in": args.in_features, "out": args.out_features, "rank": rank, "k2": args.k2,
              "kernel_ranks": [k1, k2], "m": args.m, "dtype": args.dtype, "arch": args.arch,
              "inspections": [r.summary() for r in results], "dumped": written}
    if not args.json:
        print_report(report)
    return report


def print_report(report: dict) -> None:
    k1, k2 = report["kernel_ranks"]
    print(f"{report['in']} -> {report['out']}: rank {report['rank']}"
          + (f" (residual {report['k2']})" if report["k2"] else "")
          + f"; the kernels get k = {k1}" + (f" + {k2}" if k2 else "")
          + f"; M={report['m']} {report['dtype']} {report['arch']}")
    for insp in report["inspections"]:
        c = insp["config"]
        keys = ("BLOCK_M", "BLOCK_IN", "BLOCK_K", "BLOCK_N", "BLOCK_R", "num_warps", "num_stages", "PREFETCH_U")
        if insp["method"] == "triton":
            keys = ("PM", "PN", "PK", "GROUP_M", "p_warps", "p_stages")
        print(f"\n[{insp['method']}] " + " ".join(f"{k}={c[k]}" for k in keys if k in c))
        for k in insp["kernels"]:
            s = k["sass"]
            print(f"  {k['name']}: grid {k['grid']}, {k['num_warps']} warps, {k['regs']} registers, "
                  f"spills {k['spill_bytes']} B, shared {k['shared']} B, {k['occupancy']} programs/SM")
            print(f"    SASS: LDG.128 {s['ldg_128']}, LDG.64 {s['ldg_64']}, 1-2 byte LDG {s['ldg_scalar']}, "
                  f"LDG all {s['ldg_all']}, cp.async {s['cp_async_all']} (16-byte {s['cp_async_128']}), "
                  f"TMA {s['tma']}, ATOM {s['atom']}, RED {s['red']}, MEMBAR {s['membar']}, CCTL {s['cctl']}, "
                  f"local {s['local']}, MMA {s['mma']}")
        est = insp["estimate"]
        if est and insp["method"] == "grouped":
            print(f"  {est['label']}:")
            for g in ("h100", "h200"):
                e = est[g]
                print(f"    {g.upper()}: {e['us']:.1f} µs vs {e['separate_us']:.1f} µs for {len(insp['shape']['groups'])} "
                      f"separate calls + cat: {e['speedup_vs_separate']:.2f}x")
        elif est:
            print(f"  {est['label']}:")
            for g in ("h100", "h200"):
                e = est[g]
                fl = e["in_flight_per_sm"]
                fl_s = (f"; in flight per SM {fl['shrink'] / 1024:.0f} / {fl['expand'] / 1024:.0f} KB "
                        f"(shrink / expand), {e['needed_in_flight_per_sm'] / 1024:.1f} KB needed" if fl else "")
                print(f"    {g.upper()}: {e['us']:.1f} µs, {e['bytes_moved'] / 1e6:.1f} MB{fl_s}; dense "
                      f"{e['dense_us']:.1f} µs, {e['dense_bytes'] / 1e6:.1f} MB: {e['speedup_vs_dense']:.2f}x dense")
    for f in report.get("dumped", []):
        print(f"wrote {f}")
