"""Perplexity over non-overlapping windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean NLL) over every predicted token of `windows` [w, T] (T−1 predictions per window).

    Returns {"ppl", "nll", "tokens", "windows", "seq_len"}.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for ids in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        ids = ids.to(device)
        nll, n = next_token_nll(model(input_ids=ids, use_cache=False).logits, ids)
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    return perplexity_result(total_nll, total_tokens, windows)


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
