"""Which layout of the factors decodes faster on the CPU: row-major (the file's: V [in, k] and U
[out, k] contiguous) or k-major (each the transpose of a contiguous [k, rows], what `LowRankLinear`
keeps on the CPU, `lrinfer.runtime.nn.k_major`). One thread, float32, batch 1, CPU time
(process_time) so that other load on a shared machine does not count.

    OMP_NUM_THREADS=1 python bench/layout_cpu.py --linears                  # SmolLM2's 210 linears only
    OMP_NUM_THREADS=1 python bench/layout_cpu.py out/s20 out/s40 --repeats 15   # whole decode steps
    OMP_NUM_THREADS=1 python bench/layout_cpu.py out/s40 --parts              # where a step's time goes

--linears: all 210 linears of SmolLM2-135M (30 layers of q, k, v, o 576→576/192, gate, up 576→1536,
down 1536→576), distinct random weights at the ranks `lrinfer compress` emits for --ratios, one token
through all of them per step (weights stream from memory, as in decode), each factor of each pair
row-major or k-major, all four combinations through the library's math (`lowrank_linear_reference`,
so only the strides differ). Checkpoints: dense SmolLM2 and every checkpoint twice, as loaded
(k-major) and with its factors made row-major, one `lrinfer bench` run (128-token prompt, 64 decode
steps, static cache) of each in turn, the order reversed every repeat. --parts: dense and each
checkpoint as loaded, the time spent inside each decoder linear's forward measured in the step itself
(wall clock around each call, decode rows only), so the rest of the step (attention, norms, embeddings,
the 49152-row head) is what remains; prints the linears' speed-up and the step speed-up the checkpoint
would reach if its linears ran at the bytes' ratio. (Replacing the linears by stubs instead undercounts
the rest: without the linears' 400 MB streaming through the cache each step, the head stays cached.)
Prints only.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lrinfer.runtime.kernels import lowrank_linear_reference
from lrinfer.runtime.nn import k_major

SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LAYOUTS = {"row-major": lambda t: t.contiguous(), "k-major": k_major}


def _alternate(runs: dict, repeats: int) -> dict:
    """{name: [ms per step]} of `runs` {name: () -> ms}, in turn, the order reversed every repeat."""
    times, keys = {k: [] for k in runs}, list(runs)
    for i in range(repeats):
        for k in keys if i % 2 == 0 else keys[::-1]:
            times[k].append(runs[k]())
    return times


def linears(ratios, repeats: int) -> dict:
    from lrinfer.factors import rank_for_ratio
    torch.manual_seed(0)
    xs = {n: torch.randn(1, 1, n) for n in (576, 1536)}
    sets = {"dense": [(torch.randn(o, i), i) for _ in range(30) for i, o in SMOLLM2_LAYER]}
    for r in ratios:
        pairs = [(torch.randn(i, rank_for_ratio(i, o, r, 16)), torch.randn(o, rank_for_ratio(i, o, r, 16)), i)
                 for _ in range(30) for i, o in SMOLLM2_LAYER]
        for lv, fv in LAYOUTS.items():
            for lu, fu in LAYOUTS.items():
                sets[f"{r:g} V {lv}, U {lu}"] = [(fv(V), fu(U), i) for V, U, i in pairs]

    def step(ws, n=10):
        t0 = time.process_time()
        for _ in range(n):
            for *w, i in ws:
                F.linear(xs[i], w[0]) if len(w) == 1 else lowrank_linear_reference(xs[i], *w)
        return (time.process_time() - t0) / n * 1e3

    with torch.no_grad():
        return _alternate({k: (lambda ws=ws: step(ws)) for k, ws in sets.items()}, repeats)


def checkpoints(dirs, repeats: int) -> dict:
    from lrinfer.evaluation.benchmark import Runner
    from lrinfer.runtime.models import load_model
    from lrinfer.runtime.nn import lowrank_modules

    models = {"dense": load_model("smollm2", torch.float32, "cpu")[0]}
    for d in dirs:
        models[f"{d} k-major"] = load_model(d, torch.float32, "cpu")[0]
        row = load_model(d, torch.float32, "cpu")[0]
        for m in lowrank_modules(row).values():
            for n in ("V", "U", "V2", "U2"):
                if m._parameters.get(n) is not None:   # assigned parameters are kept as given
                    setattr(m, n, torch.nn.Parameter(m._parameters[n].data.contiguous(), requires_grad=False))
        models[f"{d} row-major"] = row
    runners = {k: Runner(m, 1, 128, 64) for k, m in models.items()}
    for r in runners.values():
        r.warm_up()
    return _alternate({k: (lambda r=r: r.run()[3] / r.new_tokens * 1e3) for k, r in runners.items()}, repeats)


def parts(dirs, repeats: int) -> None:
    from lrinfer.evaluation.benchmark import Runner
    from lrinfer.runtime.models import load_model
    from lrinfer.runtime.nn import LowRankLinear

    def decoder_linears(model):   # {qualified name: module}
        return {n: m for n, m in model.model.layers.named_modules()
                if isinstance(m, (torch.nn.Linear, LowRankLinear))}

    spent = {}   # {(model, projection): wall seconds inside those forwards at decode (one row)}

    def timed(module, key):
        forward = module.forward

        def timed_forward(x):
            t = time.perf_counter()
            y = forward(x)
            if x.shape[-2] == 1:   # decode steps only, not the prompt
                spent[key] += time.perf_counter() - t
            return y
        module.forward = timed_forward

    models = {"dense": load_model("smollm2", torch.float32, "cpu")[0]}
    models.update({d: load_model(d, torch.float32, "cpu")[0] for d in dirs})
    nbytes = {}   # {(model, projection): bytes of those linears' parameters}
    for k, model in models.items():
        for name, m in decoder_linears(model).items():
            key = (k, name.rpartition(".")[2])
            spent[key] = 0.0
            nbytes[key] = nbytes.get(key, 0) + sum(p.numel() * p.element_size() for p in m.parameters())
            timed(m, key)
    runners = {k: Runner(m, 1, 128, 64) for k, m in models.items()}
    for r in runners.values():
        r.warm_up()
    by_kind = {key: [] for key in spent}

    def step(k):
        for key in spent:
            spent[key] = 0.0
        r = runners[k]
        cpu = r.run()[3] / r.new_tokens * 1e3
        for key in spent:
            if key[0] == k:
                by_kind[key].append(spent[key] / r.new_tokens)
        return cpu, sum(v for key, v in spent.items() if key[0] == k) / r.new_tokens * 1e3

    times = _alternate({k: (lambda k=k: step(k)) for k in runners}, repeats)
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    (dense, dense_lin), total_bytes = med["dense"], {k: sum(v for key, v in nbytes.items() if key[0] == k)
                                                     for k in models}
    print(f"{'dense':28s} {dense:7.2f} CPU ms per step; decoder linears {dense_lin:.2f}, "
          f"the rest {dense - dense_lin:.2f}")
    for d in dirs:
        total, lin = med[d]
        ideal = total_bytes["dense"] / total_bytes[d]
        print(f"{d:28s} {total:7.2f} CPU ms per step ({dense / total:.3f}x); decoder linears {lin:.2f} "
              f"({dense_lin / lin:.3f}x dense's, bytes allow {ideal:.3f}x), the rest {total - lin:.2f}; at the "
              f"bytes' ratio the step would be {dense / (dense - dense_lin + dense_lin / ideal):.3f}x")
    print("streaming rate per projection, GB/s (its parameters' bytes over the median time inside its forwards):")
    for k in models:
        print(f"  {k:26s} " + "  ".join(f"{key[1]} {nbytes[key] / statistics.median(v) / 1e9:.1f}"
                                         for key, v in by_kind.items() if key[0] == k))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", help="SmolLM2 checkpoints to decode (with dense SmolLM2)")
    ap.add_argument("--linears", action="store_true", help="the 210 linears alone, random weights")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--parts", action="store_true",
                    help="the time inside the decoder linears, beside the rest of each step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.parts:
        return parts(args.dirs, args.repeats)
    times = linears(args.ratios, args.repeats) if args.linears or not args.dirs else checkpoints(args.dirs, args.repeats)
    dense = statistics.median(times["dense"])
    for k, v in times.items():
        print(f"{k:28s} {statistics.median(v):7.2f} CPU ms per step  {dense / statistics.median(v):.3f}x dense")


if __name__ == "__main__":
    main()
