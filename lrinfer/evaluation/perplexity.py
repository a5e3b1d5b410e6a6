"""Perplexity over non-overlapping windows, of a model in memory or read block by block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrinfer.data import eval_windows
from lrinfer.runtime.blocks import capture_inputs, run_block
from lrinfer.runtime.streaming import BlockStreamer, streamer_of


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               streamer: BlockStreamer | None = None) -> dict:
    """exp(mean NLL) over every predicted token of `windows` [w, T] (T−1 predictions per window).

    A model loaded block by block (`load_model(..., stream=True)`) is evaluated block by block;
    `streamer` overrides where its blocks are read from (a written checkpoint's files, for the
    compressed model). Returns {"ppl", "nll", "tokens", "windows", "seq_len"}.
    """
    streamer = streamer or streamer_of(model)
    if streamer is not None:
        return _streamed(model, windows, batch_size, progress, streamer)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for ids in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        ids = ids.to(device)
        nll, n = next_token_nll(model(input_ids=ids, use_cache=False).logits, ids)
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    return perplexity_result(total_nll, total_tokens, windows)


def perplexities(model, tokenizer, sources: list[str], seq_len: int = 512, windows: int | None = None,
                 batch_size: int = 4, data_dir=None, progress: bool = True,
                 streamer: BlockStreamer | None = None) -> dict[str, dict]:
    """Perplexity on each evaluation text of `sources` (names or files, `lrinfer.data.eval_sources`), in
    order: {source: `perplexity` result + "data" (the text's description)}. `windows` None: all of each."""
    out = {}
    for source in sources:
        ids, desc = eval_windows(tokenizer, source, seq_len, windows, data_dir)
        out[source] = {**perplexity(model, ids, batch_size, progress, streamer), "data": desc}
    return out


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ids[:, 1:] under logits [b, T, vocab] (float32), and how many tokens that is."""
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def perplexity_result(total_nll: float, total_tokens: int, windows: torch.Tensor) -> dict:
    """{"ppl", "nll", "tokens", "windows", "seq_len"} from summed NLL over `windows` [n, T]."""
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": total_tokens,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def _streamed(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool,
              streamer: BlockStreamer) -> dict:
    """Perplexity one decoder block at a time: the hidden states of every window go through block 0,
    then block 1, ... (each block loaded once), and the head runs last."""
    blocks = streamer.blocks
    streams = capture_inputs(model, blocks, windows, batch_size, streamer.device)
    hidden = streams.dense
    for i in tqdm(range(len(blocks)), desc="perplexity (streamed)", unit="block", disable=not progress):
        block = streamer.load_block(i)
        hidden = run_block(block, hidden, streams.calls[i])
        streamer.release_block(i)
    total_nll, total_tokens = 0.0, 0
    for ids, h in zip(windows.split(batch_size), hidden):
        ids = ids.to(streamer.device)
        nll, n = next_token_nll(_head_logits(model, blocks, ids, h), ids)
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    return perplexity_result(total_nll, total_tokens, windows)


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
