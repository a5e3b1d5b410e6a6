"""Which layout of the shrink factor V decodes faster on the CPU: V [in, k] (the format's) or V
stored [k, in] (an nn.Linear weight, computed as F.linear(F.linear(x, Vt), U)). One thread, float32,
batch 1, CPU time (process_time) so that other load on a shared machine does not count.

    OMP_NUM_THREADS=1 python bench/layout_cpu.py --linears                  # SmolLM2's 210 linears only
    OMP_NUM_THREADS=1 python bench/layout_cpu.py out/s20 out/s40 --repeats 15   # whole decode steps
    OMP_NUM_THREADS=1 python bench/layout_cpu.py out/s40 --parts              # where a step's time goes

--linears: all 210 linears of SmolLM2-135M (30 layers of q, k, v, o 576→576/192, gate, up 576→1536,
down 1536→576), distinct random weights at the ranks `lrinfer compress` emits for --ratios, one token
through all of them per step (weights stream from memory, as in decode). Checkpoints: dense SmolLM2
and every checkpoint twice, V as loaded and V copied to [k, in], one `lrinfer bench` run (128-token
prompt, 64 decode steps, static cache) of each in turn, the order reversed every repeat. --parts:
dense, each checkpoint as loaded, and dense with every decoder linear replaced by a stub that returns a
preallocated output (the rest of the step: attention, norms, embeddings, the head); prints the
linears' share of the step and the step speed-up the checkpoint would reach if its linears ran at
the bytes' ratio. Prints only.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def shrink_first(x, V, U, bias=None, V2=None, U2=None):
    """(x V) Uᵀ for V [in, k] stored either way: F.linear over Vᵀ when V is a view of a [k, in] tensor."""
    if V.stride(0) == 1 and V.shape[1] > 1:
        y = F.linear(F.linear(x, V.t()), U, bias)
        return y if V2 is None else y + F.linear(F.linear(x, V2.t()), U2)
    y = (x @ V) @ U.t()
    y = y if V2 is None else y + (x @ V2) @ U2.t()
    return y if bias is None else y + bias


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
        sets[f"{r:g} V[in,k]"] = pairs
        sets[f"{r:g} V[k,in]"] = [(V.t().contiguous().t(), U, i) for V, U, i in pairs]

    def step(ws, n=10):
        t0 = time.process_time()
        for _ in range(n):
            for *w, i in ws:
                F.linear(xs[i], w[0]) if len(w) == 1 else shrink_first(xs[i], *w)
        return (time.process_time() - t0) / n * 1e3

    with torch.no_grad():
        return _alternate({k: (lambda ws=ws: step(ws)) for k, ws in sets.items()}, repeats)


def checkpoints(dirs, repeats: int) -> dict:
    import lrinfer.runtime.kernels.ops as ops
    from lrinfer.evaluation.benchmark import Runner
    from lrinfer.runtime.models import load_model
    from lrinfer.runtime.nn import lowrank_modules
    ops.lowrank_linear_reference = shrink_first      # both layouts through one function

    models = {"dense": load_model("smollm2", torch.float32, "cpu")[0]}
    for d in dirs:
        models[f"{d} V[in,k]"] = load_model(d, torch.float32, "cpu")[0]
        kin = load_model(d, torch.float32, "cpu")[0]
        for m in lowrank_modules(kin).values():
            for n in ("V", "V2"):
                if m._parameters.get(n) is not None:
                    m._parameters[n] = torch.nn.Parameter(m._parameters[n].data.t().contiguous().t(),
                                                          requires_grad=False)
        models[f"{d} V[k,in]"] = kin
    runners = {k: Runner(m, 1, 128, 64) for k, m in models.items()}
    for r in runners.values():
        r.warm_up()
    return _alternate({k: (lambda r=r: r.run()[3] / r.new_tokens * 1e3) for k, r in runners.items()}, repeats)


class _Stub(torch.nn.Module):
    """A linear that costs nothing: returns a preallocated zero output of the right shape."""
    def __init__(self, out_features: int):
        super().__init__()
        self.out_features, self.outs = out_features, {}

    def forward(self, x):
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.outs:
            self.outs[shape] = x.new_zeros(shape)
        return self.outs[shape]


def parts(dirs, repeats: int) -> None:
    from lrinfer.evaluation.benchmark import Runner
    from lrinfer.runtime.models import load_model
    from lrinfer.runtime.nn import LowRankLinear

    def linear_bytes(model):
        return sum(p.numel() * p.element_size() for m in model.model.layers.modules()
                   if isinstance(m, (torch.nn.Linear, LowRankLinear)) for p in m.parameters())

    models = {"dense": load_model("smollm2", torch.float32, "cpu")[0]}
    stub = load_model("smollm2", torch.float32, "cpu")[0]
    for name, m in list(stub.model.layers.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(stub.model.layers.get_submodule(parent), child, _Stub(m.out_features))
    models["without linears"] = stub
    models.update({d: load_model(d, torch.float32, "cpu")[0] for d in dirs})
    runners = {k: Runner(m, 1, 128, 64) for k, m in models.items()}
    for r in runners.values():
        r.warm_up()
    times = _alternate({k: (lambda r=r: r.run()[3] / r.new_tokens * 1e3) for k, r in runners.items()}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    rest, dense = med["without linears"], med["dense"]
    print(f"{'dense':28s} {dense:7.2f} CPU ms per step; linears {dense - rest:.2f}, the rest {rest:.2f}")
    for d in dirs:
        lin, ideal = med[d] - rest, linear_bytes(models["dense"]) / linear_bytes(models[d])
        print(f"{d:28s} {med[d]:7.2f} CPU ms per step ({dense / med[d]:.3f}x); linears {lin:.2f} "
              f"({(dense - rest) / lin:.3f}x dense's, bytes allow {ideal:.3f}x); at the bytes' ratio the step "
              f"would be {dense / (rest + (dense - rest) / ideal):.3f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", help="SmolLM2 checkpoints to decode (with dense SmolLM2)")
    ap.add_argument("--linears", action="store_true", help="the 210 linears alone, random weights")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--parts", action="store_true", help="the step without its decoder linears, beside each checkpoint")
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
