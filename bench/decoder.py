"""A minimal Llama-shaped decoder with a static KV cache, for end-to-end decode timing.

Why not transformers' LlamaForCausalLM here: one decode step of this module is a fixed sequence
of device ops (token and position live in device buffers; the causal mask and the RoPE rows are
gathered from the position on the device; the cache is written with index_copy_), so it is
captured in a CUDA graph as is and replayed once per token, for the dense and the compressed
model alike: launch overhead cannot hide the difference. The weights are random (shapes are all
that matters for speed); every decoder linear is an `nn.Linear` (dense) or an
`lrinfer.LowRankLinear` of rank floor((1 - r)·in·out/(in + out)) rounded down to a multiple of 8;
the embedding and the LM head stay dense.

    cfg = DecoderConfig.llama2_7b(layers=32)
    model = build(cfg, reduction=0.4, dtype=torch.bfloat16, device="cuda")
    rate = decode_benchmark(model, batch=1, prompt_len=128, new_tokens=128)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NO_CUDA = "skipped: no CUDA device"


@dataclass
class DecoderConfig:
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @classmethod
    def llama2_7b(cls, layers: int = 32) -> "DecoderConfig":
        return cls(layers=layers)

    @classmethod
    def tiny(cls) -> "DecoderConfig":
        return cls(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256)


def rank_for(in_f: int, out_f: int, reduction: float) -> int:
    """The rank `compress` emits for this ratio (uniform allocation, the default rank multiple)."""
    from lrinfer import CompressConfig, rank_for_ratio

    return rank_for_ratio(in_f, out_f, reduction, CompressConfig.rank_multiple)


def make_linear(in_f: int, out_f: int, reduction: float, dtype, device) -> nn.Module:
    """Dense nn.Linear (reduction 0) or LowRankLinear with random factors; outputs are O(1)."""
    if reduction <= 0:
        lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.normal_(0.0, in_f**-0.5)
        return lin
    from lrinfer import LowRankLinear

    k = rank_for(in_f, out_f, reduction)
    lin = LowRankLinear(in_f, out_f, k, device=device, dtype=dtype)
    with torch.no_grad():
        lin.V.normal_(0.0, in_f**-0.5)
        lin.U.normal_(0.0, k**-0.5)
    return lin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x, cos, sin):
    """x [B, H, T, D]; cos, sin [T, D/2] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, reduction: float, dtype, device):
        super().__init__()
        h, d = cfg.hidden, cfg.hidden // cfg.heads
        self.cfg, self.head_dim = cfg, d
        lin = lambda i, o: make_linear(i, o, reduction, dtype, device)  # noqa: E731
        self.q_proj, self.k_proj = lin(h, cfg.heads * d), lin(h, cfg.kv_heads * d)
        self.v_proj, self.o_proj = lin(h, cfg.kv_heads * d), lin(cfg.heads * d, h)
        self.gate_proj, self.up_proj = lin(h, cfg.intermediate), lin(h, cfg.intermediate)
        self.down_proj = lin(cfg.intermediate, h)
        self.ln1 = RMSNorm(h, cfg.eps, dtype, device)
        self.ln2 = RMSNorm(h, cfg.eps, dtype, device)

    def forward(self, x, cos, sin, pos, mask, k_cache, v_cache):
        """x [B, T, h]; pos [T]; mask [T, S] bool; k_cache, v_cache [B, kv_heads, S, D] (updated)."""
        cfg, d = self.cfg, self.head_dim
        B, T, _ = x.shape
        a = self.ln1(x)
        q = self.q_proj(a).view(B, T, cfg.heads, d).transpose(1, 2)
        k = self.k_proj(a).view(B, T, cfg.kv_heads, d).transpose(1, 2)
        v = self.v_proj(a).view(B, T, cfg.kv_heads, d).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[None, None],
                                           enable_gqa=cfg.kv_heads != cfg.heads)
        x = x + self.o_proj(o.transpose(1, 2).reshape(B, T, cfg.heads * d))
        m = self.ln2(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, reduction: float, dtype, device):
        super().__init__()
        self.cfg, self.reduction = cfg, reduction
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, reduction, dtype, device) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.normal_(0.0, cfg.hidden**-0.5)
        self.caches: list = []

    def setup_cache(self, batch: int, max_seq: int):
        """Static KV cache [B, kv_heads, max_seq, D] per layer, and the RoPE tables [max_seq, D/2]."""
        cfg, p = self.cfg, next(self.parameters())
        d = cfg.hidden // cfg.heads
        self.caches = [(torch.zeros(batch, cfg.kv_heads, max_seq, d, dtype=p.dtype, device=p.device),
                        torch.zeros(batch, cfg.kv_heads, max_seq, d, dtype=p.dtype, device=p.device))
                       for _ in range(cfg.layers)]
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=p.device, dtype=torch.float32) / d)
        ang = torch.arange(max_seq, device=p.device, dtype=torch.float32)[:, None] * inv[None]
        self.cos, self.sin = ang.cos().to(p.dtype), ang.sin().to(p.dtype)
        self.max_seq = max_seq

    def forward(self, ids, pos):
        """ids [B, T] token ids at positions pos [T] -> logits [B, T, vocab]."""
        x = self.embed(ids)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = torch.arange(self.max_seq, device=ids.device)[None, :] <= pos[:, None]  # shape [T, S]
        for layer, (kc, vc) in zip(self.layers, self.caches):
            x = layer(x, cos, sin, pos, mask, kc, vc)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def build(cfg: DecoderConfig, reduction: float, dtype=torch.bfloat16, device="cuda", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(cfg, reduction, dtype, torch.device(device)).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_benchmark(model: Decoder, batch: int, prompt_len: int = 128, new_tokens: int = 128,
                     graph: bool = True, eager_steps: int = 16, reps: int = 3) -> dict:
    """Prefill `prompt_len` random tokens, then greedy decode `new_tokens` steps, timed.

    graph=True (CUDA): one decode step (forward, argmax, token and position advanced on the device)
    is captured in a CUDA graph and replayed per token; tokens/s = batch × steps / time (median of
    `reps` runs from the same position). The eager rate (no graph) is measured on `eager_steps`
    steps too. Also: the graph's logits against an eager step from the same state, peak memory.
    """
    p = next(model.parameters())
    dev = p.device
    cuda = dev.type == "cuda"
    max_seq = prompt_len + new_tokens + 1
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    model.setup_cache(batch, max_seq)
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab, (batch, prompt_len), generator=g).to(dev)
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}

    # prefill (eager)
    _sync(dev)
    t = time.perf_counter()
    logits = model(prompt, torch.arange(prompt_len, device=dev))
    _sync(dev)
    out["prefill_s"] = time.perf_counter() - t
    out["prefill_tokens_per_s"] = batch * prompt_len / out["prefill_s"]

    tok = logits[:, -1:].argmax(-1)  # shape [B, 1]; static input of the step
    pos = torch.tensor([prompt_len], device=dev)  # shape [1]
    step_logits = torch.empty(batch, model.cfg.vocab, dtype=logits.dtype, device=dev)
    del logits

    def step():
        lg = model(tok, pos)[:, -1]
        step_logits.copy_(lg)
        tok.copy_(lg.argmax(-1, keepdim=True))
        pos.add_(1)

    def run(fn, n):
        pos.fill_(prompt_len)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        return time.perf_counter() - t0

    n_eager = min(eager_steps, new_tokens)
    run(step, 2)  # warm-up (kernel compiles, workspaces)
    out["eager_tokens_per_s"] = batch * n_eager / statistics.median(run(step, n_eager) for _ in range(reps))
    if not (graph and cuda):
        out["graph_tokens_per_s"] = None
        out["graph"] = NO_CUDA if not cuda else "off"
    else:
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            pos.fill_(prompt_len)
            for _ in range(3):
                step()
        torch.cuda.current_stream(dev).wait_stream(s)
        cg = torch.cuda.CUDAGraph()
        pos.fill_(prompt_len)
        with torch.cuda.graph(cg, stream=s):  # the warm-up stream: its cached kernel workspaces are reused
            step()
        # graph vs eager from the same state (same token, same position, same cache contents)
        tok0 = tok.clone()
        pos.fill_(prompt_len)
        step()
        eager_logits = step_logits.float().clone()
        tok.copy_(tok0)
        pos.fill_(prompt_len)
        cg.replay()
        _sync(dev)
        ref = eager_logits
        out["graph_vs_eager_rel_err"] = float((step_logits.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        out["graph_tokens_per_s"] = batch * new_tokens / statistics.median(
            run(cg.replay, new_tokens) for _ in range(reps))
        out["graph"] = "manual CUDA graph of one decode step, replayed per token"
        del cg
    out["finite_logits"] = bool(torch.isfinite(step_logits).all())
    if cuda:
        out["peak_GiB"] = torch.cuda.max_memory_allocated(dev) / 2**30
    out["weights_GiB"] = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30
    out["kv_cache_GiB"] = sum(2 * c[0].numel() * c[0].element_size() for c in model.caches) / 2**30
    model.caches = []
    return out


@torch.no_grad()
def check_lowrank_layers(model: Decoder, rows: int = 4) -> dict:
    """Relative error of every distinct LowRankLinear shape against float64 math on random x."""
    from lrinfer import LowRankLinear

    out, seen = {}, set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LowRankLinear):
            continue
        key = f"{mod.in_features}x{mod.out_features}x{mod.rank}"
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(rows, mod.in_features, dtype=mod.V.dtype, device=mod.V.device)
        ref = (x.double() @ mod.V.double()) @ mod.U.double().t()
        y = mod(x).double()
        out[key] = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    return out


def config_dict(cfg: DecoderConfig) -> dict:
    return asdict(cfg)
