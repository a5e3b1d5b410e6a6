"""Perplexity over non-overlapping windows, of a model in memory or read block by block."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import lrinfer.data as text_data
from lrinfer.errors import LrinferError
from lrinfer.runtime.blocks import capture_inputs, run_block
from lrinfer.runtime.streaming import BlockStreamer, streamer_of


@dataclass(frozen=True)
class PerplexityConfig:
    """What perplexity is measured on: `data`, one or more comma-separated texts (wikitext2: its raw test
    split; timemachine: a public-domain novel shipped with lrinfer; or a .txt/.jsonl file), `windows`
    non-overlapping windows of `seq_len` tokens from the start of each (0: every window), run `batch_size`
    windows at a time. The defaults are `lrinfer eval`'s and `lrinfer compress`'s."""
    data: str = "wikitext2"
    seq_len: int = 512
    windows: int = 16
    batch_size: int = 4

    def __post_init__(self):
        for name, least in (("seq_len", 2), ("windows", 0), ("batch_size", 1)):
            if int(getattr(self, name)) < least:
                raise LrinferError(f"perplexity {name} must be >= {least}; got {getattr(self, name)}")
        text_data.eval_sources(self.data)   # a bad text name fails before any model loads

    def token_windows(self, tokenizer, data_dir=None) -> dict[str, tuple[torch.Tensor, str]]:
        """{text: (windows [w, seq_len] of token ids, a description of the text)} for each text of `data`,
        in order (read from `data_dir`, see `lrinfer.data.resolve_data_dir`)."""
        return {source: text_data.eval_windows(tokenizer, source, self.seq_len, self.windows or None, data_dir)
                for source in text_data.eval_sources(self.data)}


def text_perplexities(model, tokenizer, config: PerplexityConfig = PerplexityConfig(), data_dir=None,
                      progress: bool = True, streamer: BlockStreamer | None = None,
                      windows: dict[str, tuple[torch.Tensor, str]] | None = None) -> dict[str, dict]:
    """`perplexity` of `model` on each text `config` names (or on `windows`, from `config.token_windows`):
    {text: {"ppl", "nll", "tokens", "windows", "seq_len", "data"}}, in `config.data`'s order."""
    windows = windows or config.token_windows(tokenizer, data_dir)
    return {source: {**perplexity(model, ids, config.batch_size, progress, streamer), "data": desc}
            for source, (ids, desc) in windows.items()}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = PerplexityConfig.batch_size, progress: bool = True,
               streamer: BlockStreamer | None = None, per_window: bool = False) -> dict:
    """exp(mean NLL) over every predicted token of `windows` [w, T] (T−1 predictions per window).

    A model loaded block by block (`load_model(..., stream=True)`) is evaluated block by block;
    `streamer` overrides where its blocks are read from (a written checkpoint's files, for the
    compressed model). Returns {"ppl", "nll", "tokens", "windows", "seq_len"}, and with `per_window`
    "window_nll": each window's summed NLL (for paired comparisons of two models on the same text).
    """
    streamer = streamer or streamer_of(model)
    if streamer is not None:
        nll = _streamed(model, windows, batch_size, progress, streamer)
    else:
        device = next(model.parameters()).device
        nll = torch.cat([window_nll(model(input_ids=ids.to(device), use_cache=False).logits, ids.to(device))
                         for ids in tqdm(windows.split(batch_size), desc="perplexity", unit="batch",
                                         disable=not progress)])
    return perplexity_result(nll, windows, per_window)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[:, 1:] under logits [b, T, vocab] (computed in float32), per window: [b] float64."""
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).double().sum(1).cpu()


def perplexity_result(nll: torch.Tensor, windows: torch.Tensor, per_window: bool = False) -> dict:
    """{"ppl", "nll", "tokens", "windows", "seq_len"[, "window_nll"]} from per-window summed NLL [n]."""
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = float(nll.sum()) / tokens
    out = {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": tokens,
           "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}
    if per_window:
        out["window_nll"] = nll.tolist()
    return out


def _streamed(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool,
              streamer: BlockStreamer) -> torch.Tensor:
    """Per-window NLL [w] one decoder block at a time: the hidden states of every window go through block 0,
    then block 1, ... (each block loaded once), and the head runs last."""
    blocks = streamer.blocks
    streams = capture_inputs(model, blocks, windows, batch_size, streamer.device)
    hidden = streams.dense
    for i in tqdm(range(len(blocks)), desc="perplexity (streamed)", unit="block", disable=not progress):
        block = streamer.load_block(i)
        hidden = run_block(block, hidden, streams.calls[i])
        streamer.release_block(i)
    return torch.cat([window_nll(_head_logits(model, blocks, ids.to(streamer.device), h), ids.to(streamer.device))
                      for ids, h in zip(windows.split(batch_size), hidden)])


def _head_logits(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The model's logits when its decoder blocks output `final`: the model's own forward, with the first
    block returning `final` and every other block passing its input through (so the final norm, the head
    and any logit soft-capping are the model's own code)."""
    saved = [b.forward for b in blocks]

    def first(hidden_states, *args, **kwargs):
        return final

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    for j, b in enumerate(blocks):
        b.forward = first if j == 0 else passthrough
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for b, fwd in zip(blocks, saved):
            b.forward = fwd
