"""Block-by-block calibration with two activation streams.

The dense model's block inputs X and the compressed-so-far model's X̂ are carried side by side,
one decoder block at a time (GPTQ / SVD-LLM style), so only one block needs to sit on the
compute device. Forward hooks accumulate float64 per-linear statistics (`LinearStats`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lrinfer.errors import LrinferError
from lrinfer.runtime.blocks import BlockCall, TwoStreams, first_tensor, run_block, to_device
from lrinfer.runtime.nn import replace_module

log = logging.getLogger(__name__)


@dataclass
class LinearStats:
    """Second-order statistics of one linear's inputs over N calibration tokens (row convention,
    X [N, in]). All sums, float64 (the Fisher float32); solvers are invariant to their common scale.
    Read-only for solvers: linears that read the same input share the same tensors."""
    name: str
    n: int = 0                              # tokens seen
    gram: torch.Tensor | None = None        # Σ Xᵀ X        [in, in]  dense-model inputs
    gram_hat: torch.Tensor | None = None    # Σ X̂ᵀ X̂      [in, in]  compressed-model inputs
    cross: torch.Tensor | None = None       # Σ Xᵀ X̂       [in, in]
    abs_sum: torch.Tensor | None = None     # Σ |X|         [in]
    fisher: torch.Tensor | None = None      # Σ (∂L/∂W)²    [out, in]  float32
    grad_gram: torch.Tensor | None = None   # Σ Gᵀ G        [out, out] float32, G = ∂L/∂Y [N, out] (K-FAC)

    def add(self, attr: str, value: torch.Tensor) -> None:
        cur = getattr(self, attr)
        setattr(self, attr, value if cur is None else cur.add_(value))


@contextlib.contextmanager
def swapped_in(block: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily put `modules` (names relative to `block`) back into the block."""
    saved = {n: replace_module(block, n, m) for n, m in modules.items()}
    try:
        yield
    finally:
        for n, m in saved.items():
            replace_module(block, n, m)


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn):
    """Call fn(name, x [tokens, in]) with each module's input while the context is open."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0].reshape(-1, args[0].shape[-1])))
               for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def linear_stages(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor,
                  call: BlockCall) -> list[list[str]]:
    """Group the block's linears into stages that read the same input tensor (q/k/v; o; gate/up; down),
    in forward order, from one probing forward on the first sample."""
    order: list[tuple[str, torch.Tensor]] = []
    with input_hooks(linears, lambda n, x: order.append((n, x))):
        run_block(block, [hidden[:1]], [BlockCall(call.args, _slice_kwargs(call.kwargs))])
    stages: list[list[str]] = []
    last = None
    for name, x in order:
        if name in (s for st in stages for s in st):
            continue
        if last is not None and x.data_ptr() == last.data_ptr() and x.shape == last.shape:
            stages[-1].append(name)
        else:
            stages.append([name])
        last = x
    missing = [n for n in linears if n not in {s for st in stages for s in st}]
    return stages + ([missing] if missing else [])


def _slice_kwargs(kwargs: dict) -> dict:
    """Block kwargs for the first sample of a batch (masks and per-sample tensors sliced)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


class _InputsSeen(Exception):
    """Raised by a hook to stop a block's forward once every wanted input has been seen."""


def run_for_inputs(block: nn.Module, hidden: torch.Tensor, call: BlockCall, modules: dict[str, nn.Module],
                   fn, full: bool) -> torch.Tensor | None:
    """Run the block on one batch, calling fn(name, x [tokens, in]) with each module's input.
    Unless `full`, the forward stops as soon as every module has been reached (returns None)."""
    seen: set[str] = set()

    def hook(n, x):
        fn(n, x)
        seen.add(n)
        if not full and len(seen) == len(modules):
            raise _InputsSeen

    with input_hooks(modules, hook):
        try:
            return first_tensor(block(hidden, *call.args, **call.kwargs))
        except _InputsSeen:
            return None


_CHUNK_BYTES = 1 << 28   # float64 bytes of activations converted at once for the statistics


def _dsyrk():
    try:
        from scipy.linalg.blas import dsyrk
    except ImportError:
        return None
    return dsyrk


def accumulate_gram(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """acc [in, in] += aᵀ b in float64 (b=None: aᵀ a), a, b [tokens, in] in any float dtype, converted
    in chunks of tokens so no float64 copy of the whole batch is made.

    b=None on the CPU (with scipy): BLAS dsyrk adds to the lower triangle only, for half the flops of
    a GEMM (1.6x faster measured); returns True then, and `symmetrize` completes acc once the sums
    are done. Otherwise returns False (acc is whole)."""
    rows = max(256, _CHUNK_BYTES // (8 * a.shape[1]))
    syrk = _dsyrk() if (b is None and acc.device.type == "cpu" and acc.is_contiguous()) else None
    for s in range(0, a.shape[0], rows):
        ad = a[s:s + rows].double()
        if syrk is not None:
            c = acc.numpy()
            # Fortran view: A = adᵀ [in, tokens], C = accᵀ; C's upper triangle is acc's lower one
            out = syrk(1.0, ad.contiguous().numpy().T, beta=1.0, c=c.T, trans=0, lower=0, overwrite_c=1)
            if not (out.ctypes.data == c.ctypes.data):
                c.T[...] = out
        else:
            acc.addmm_(ad.t(), ad if b is None else b[s:s + rows].double())
    return syrk is not None


def symmetrize(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle `lower` holds."""
    return torch.tril(lower) + torch.tril(lower, -1).t()


@torch.no_grad()
def collect_stats(block: nn.Module, stage: list[str], needs: frozenset, streams: TwoStreams,
                  calls: list[BlockCall], dense_modules: dict[str, nn.Module],
                  names: dict[str, str], dense_outputs: bool = True, device: torch.device | None = None
                  ) -> tuple[dict[str, LinearStats], list[torch.Tensor] | None]:
    """Statistics of the linears in `stage` (names relative to `block`) over all batches.

    `dense_modules` are this block's already-compressed linears in dense form, swapped in for the
    dense stream. `names` maps relative to qualified names. Returns the stats and, when
    `dense_outputs` and a dense forward ran, the dense stream's block outputs (kept where the streams
    are); otherwise each forward stops once the stage's inputs are seen. With `device`, batches run
    there (streams may live on the host). Statistics accumulate in float64 on the block's device.

    Linears that read the same input tensor (q/k/v, gate/up) share one accumulator: their
    `LinearStats` hold the same tensors, so solvers must treat statistics as read-only.
    """
    stats = {n: LinearStats(names[n]) for n in stage}
    modules = {n: block.get_submodule(n) for n in stage}
    want_dense = bool(needs & {"gram", "abs_sum", "cross"}) or not needs
    want_hat = bool(needs & {"gram_hat", "cross"})
    leader: dict[str, str] = {}                      # linear -> first linear of the stage reading its input
    acc: dict[tuple[str, str], torch.Tensor] = {}    # (leader, field) -> float64 sum
    tokens: dict[str, int] = {}
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # input key -> (leader, input) in this pass of this batch
    dense_x: dict[str, torch.Tensor] = {}            # leader -> its dense input, for the cross term

    def leads(n: str, x: torch.Tensor) -> bool:
        """Group n with the linears that read the same tensor; True when n accumulates for the group."""
        key = (x.data_ptr(), tuple(x.shape), x.stride())   # holding x in `seen` keeps its address unique
        first = seen.setdefault(key, (n, x))[0]
        if leader.setdefault(n, first) != first:
            raise RuntimeError(f"collect_stats: {names[n]} shares its input with {names[first]} in one batch "
                               f"and with {names[leader[n]]} in another")
        return first == n

    lower_only: set[tuple[str, str]] = set()        # accumulated by dsyrk: the lower triangle alone

    def acc_of(n: str, field: str, x: torch.Tensor, shape: tuple) -> torch.Tensor:
        if (n, field) not in acc:
            acc[(n, field)] = torch.zeros(shape, dtype=torch.float64, device=x.device)
        return acc[(n, field)]

    def on_dense(n, x):
        if not leads(n, x):
            return
        d = x.shape[-1]
        tokens[n] = tokens.get(n, 0) + x.shape[0]
        if "gram" in needs and accumulate_gram(acc_of(n, "gram", x, (d, d)), x):
            lower_only.add((n, "gram"))
        if "abs_sum" in needs:
            a = acc_of(n, "abs_sum", x, (d,))
            rows = max(256, _CHUNK_BYTES // (8 * d))
            for s in range(0, x.shape[0], rows):
                a.add_(x[s:s + rows].double().abs().sum(0))
        if "cross" in needs:
            dense_x[n] = x

    def on_hat(n, x):
        if not leads(n, x):
            return
        d = x.shape[-1]
        if not want_dense:
            tokens[n] = tokens.get(n, 0) + x.shape[0]
        if "gram_hat" in needs and accumulate_gram(acc_of(n, "gram_hat", x, (d, d)), x):
            lower_only.add((n, "gram_hat"))
        if "cross" in needs:
            accumulate_gram(acc_of(n, "cross", x, (d, d)), dense_x[n], x)

    dense_out = [] if (want_dense and dense_outputs) else None
    for b in range(len(calls)):
        if want_dense:
            seen.clear()
            with swapped_in(block, dense_modules):
                h = streams.dense[b]
                out = run_for_inputs(block, to_device(h, device), calls[b], modules, on_dense, dense_out is not None)
            if dense_out is not None:
                dense_out.append(to_device(out, h.device))
        if want_hat:
            seen.clear()
            run_for_inputs(block, to_device(streams.compressed[b], device), calls[b], modules, on_hat, full=False)
        seen.clear()
        dense_x.clear()
    for key in lower_only:
        acc[key] = symmetrize(acc[key])
    for n, s in stats.items():
        lead = leader.get(n)
        s.n = tokens.get(lead, 0)
        for field in ("gram", "gram_hat", "cross", "abs_sum"):
            setattr(s, field, acc.get((lead, field)))
    return stats, dense_out


@contextlib.contextmanager
def _in_float32(model: nn.Module):
    """Half-precision models are back-propagated in float32 and cast back (exactly: float16/bfloat16
    values are float32 values): float16 gradients overflow on large activations."""
    dtype = next(model.parameters()).dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        model.float()
    try:
        yield
    finally:
        if half:
            model.to(dtype)


def fisher_information(model: nn.Module, names: list[str], input_ids: torch.Tensor,
                       batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Σ over batches of (∂L/∂W)² [out, in] for each named linear (FWSVD), with L the LM loss.

    The sums stay on the model's device in float32 (squares of gradients are non-negative: a float32
    sum over a few dozen batches loses nothing a solver can see, and it halves the memory of the
    float64 host copy it replaces). Half-precision models are back-propagated in float32 (and cast
    back, exactly): float16 gradients overflow on large activations."""
    with _in_float32(model):
        return _fisher_information(model, names, input_ids, batch_size)


def _fisher_information(model, names, input_ids, batch_size):
    device = next(model.parameters()).device
    params = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    try:
        for ids in input_ids.split(batch_size):
            ids = ids.to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for n, p in params.items():
                if not torch.isfinite(p.grad).all():
                    raise LrinferError(f"Fisher information: the gradient of {n} is not finite; "
                                       "check the model and calibration text")
                fisher[n].addcmul_(p.grad, p.grad)
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            p.requires_grad_(f)
    return fisher


def output_gradient_grams(model: nn.Module, names: list[str], input_ids: torch.Tensor,
                          batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Σ over calibration tokens of g gᵀ [out, out] for each named linear (KFAC-SVD's output-side
    Kronecker factor), g = ∂L/∂y the gradient of the summed next-token NLL L of the dense model with
    respect to the linear's output y at that token. Needs a backward pass through the whole model.

    Sums in float32 on the model's device (fisher_information's reasoning: PSD sums of a few dozen
    batches; half the memory of float64); half-precision models are back-propagated in float32. Only
    activations carry gradients (the embeddings' output is the leaf): no weight gradient is formed."""
    with _in_float32(model):
        return _output_gradients(model, names, input_ids, batch_size, gram=True)


def output_gradient_energy(model: nn.Module, names: list[str], input_ids: torch.Tensor,
                           batch_size: int = 1, grams: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Mean over calibration tokens and output units of g² for each named linear: tr(Σ g gᵀ) / (N·out),
    the trace of `output_gradient_grams` per output unit and token. It weighs a linear's output error in
    a second-order model of the loss (allocation `loss`). With `grams` (those Grams, already taken on
    `input_ids`) it reads their traces; otherwise one backward pass sums g² without forming them."""
    if grams is None:
        with _in_float32(model):
            sums = _output_gradients(model, names, input_ids, batch_size, gram=False)
    else:
        sums = {n: grams[n].double().trace() for n in names}
    tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    return {n: float(v) / (tokens * model.get_submodule(n).out_features) for n, v in sums.items()}


def _output_gradients(model, names, input_ids, batch_size, gram: bool):
    device = next(model.parameters()).device
    modules = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros((m.out_features, m.out_features) if gram else (), dtype=torch.float32 if gram
                          else torch.float64, device=device) for n, m in modules.items()}

    def keep(name):
        def hook(mod, args, out):
            def on_grad(g):
                if not torch.isfinite(g).all():
                    raise LrinferError(f"output gradients: the gradient of {name}'s output is not finite; "
                                       "check the model and calibration text")
                g = g.reshape(-1, g.shape[-1]).float()
                if gram:
                    acc[name].addmm_(g.t(), g)
                else:
                    acc[name] += g.double().pow(2).sum()
            out.register_hook(on_grad)
        return hook

    leaf = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: out.detach().requires_grad_(True))
    handles = [leaf] + [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for ids in input_ids.split(batch_size):
                ids = ids.to(device)
                out = model(input_ids=ids, labels=ids, use_cache=False)
                # the mean NLL times its token count: the summed NLL (per-token gradients, batch-size free)
                (out.loss * (ids.shape[0] * (ids.shape[1] - 1))).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return acc
