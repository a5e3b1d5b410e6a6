"""Text generation from a compressed checkpoint or a dense model (`lrinfer generate`).

    model, tok, _ = lrinfer.load_model("out/s20")
    out = lrinfer.evaluation.generate.generate(model, tok, "What is the capital of France?", max_new_tokens=64)
    out["completion"], out["tokens"], out["seconds"]

The prompt goes through the tokenizer's chat template as one user turn when the tokenizer has one
(`raw=True` feeds the text as is). Greedy by default; `sample=True` draws with `temperature` and
`top_p`. Generation is `model.generate` (Hugging Face), so a compressed model generates exactly
as its `LowRankLinear` forward dictates, with nothing lrinfer-specific in the loop.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from lrinfer.errors import LrinferError


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_text(tok, prompt: str, raw: bool = False) -> tuple[str, bool]:
    """The text the model sees: `prompt` as a user turn of the chat template (plus the assistant
    header), or `prompt` itself when `raw` or the tokenizer has no template. Returns (text, templated)."""
    if raw or not has_chat_template(tok):
        return prompt, False
    try:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:  # a template that does not render (jinja errors, missing roles)
        raise LrinferError(f"the tokenizer's chat template failed to render ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); pass --raw to skip it") from None
    return text, True


def _streamer(tok, write: Callable[[str], None]):
    """A `TextStreamer` that hands decoded pieces (whole words / characters) of the completion to `write`."""
    from transformers import TextStreamer

    class _Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                write(text)

    return _Stream(tok, skip_prompt=True, skip_special_tokens=True)


def _generation_config(model, tok, max_new_tokens: int, sample: bool, temperature: float, top_p: float):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    pad = getattr(base, "pad_token_id", None)
    if pad is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad,
                           bos_token_id=getattr(base, "bos_token_id", None))
    if sample:
        cfg.temperature, cfg.top_p, cfg.top_k = temperature, top_p, 0   # top_k off: only top_p truncates
    return cfg


def check_options(max_new_tokens: int, sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise LrinferError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if sample and not temperature > 0:
        raise LrinferError(f"--temperature must be > 0; got {temperature} (greedy decoding: drop --sample)")
    if sample and not 0 < top_p <= 1:
        raise LrinferError(f"--top-p must be in (0, 1]; got {top_p}")


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 128, *, raw: bool = False, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | None = None) -> dict:
    """Complete `prompt` with `model`. Returns {prompt, completion, tokens (new tokens generated),
    prompt_tokens, seconds (wall time of generation), tokens_per_s, chat_template (bool),
    finish_reason ("eos" or "length"), sample}. `stream(text)` receives the completion as it grows."""
    if tok is None:
        raise LrinferError("this model has no tokenizer files; generate needs one beside the weights")
    check_options(max_new_tokens, sample, temperature, top_p)
    text, templated = prompt_text(tok, prompt, raw)
    # the template already holds the BOS token when the model wants one; a raw prompt gets the tokenizer's default
    enc = tok(text, return_tensors="pt", add_special_tokens=not templated)
    ids = enc["input_ids"]
    if ids.shape[1] == 0:
        raise LrinferError("the prompt is empty after tokenization; give some text (or drop --raw)")
    device = next(model.parameters()).device
    ids = ids.to(device)
    attention = torch.ones_like(ids)
    cfg = _generation_config(model, tok, max_new_tokens, sample, temperature, top_p)
    if sample and seed is not None:
        torch.manual_seed(seed)
    streamer = _streamer(tok, stream) if stream is not None else None
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=attention, generation_config=cfg, streamer=streamer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    finished = len(new) > 0 and int(new[-1]) in eos
    return {
        "prompt": prompt,
        "completion": tok.decode(new, skip_special_tokens=True),
        "tokens": int(new.numel()),
        "prompt_tokens": int(ids.shape[1]),
        "seconds": round(seconds, 4),
        "tokens_per_s": round(new.numel() / seconds, 2) if seconds > 0 else None,
        "chat_template": templated,
        "finish_reason": "eos" if finished else "length",
        "sample": {"temperature": temperature, "top_p": top_p, "seed": seed} if sample else None,
    }
