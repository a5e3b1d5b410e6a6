"""Calibration text: WikiText-2 or any file (`lrinfer.data`), text the model samples (`self`),
or conversations the dense model writes through its chat template (`chat`, `mix`)."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lrinfer.data import CHAT_SOURCES, SOURCES, eval_only_error, is_eval_text, load_text, names_text_file, tokenize
from lrinfer.errors import LrinferError
from lrinfer.evaluation.chat import TASK_DIR, chat_prompt_ids, generate_batch, has_template


log = logging.getLogger(__name__)

NEEDS_MODEL = ("self",) + CHAT_SOURCES   # calibration text the model itself makes: it must be loaded whole

# what `auto` calibrates a model with a chat template on (measured: docs/results.md, "Chat")
CHAT_MODEL_CALIB = "mix"

MIX_CHAT_FRACTION = 0.5           # `mix`: this share of the samples are chat, the rest plain text

SEARCH_FIT_SHARE = 0.9            # the search calibrates on this first share of the text (and of the chat
                                  # prompts) and scores recipes on the rest


def check_calib_source(source: str) -> None:
    """A calibration source is a known name or a file path (checked for existence when it is read);
    never a packaged evaluation-only text (`lrinfer.data.EVAL_TEXTS`), by name or by path."""
    if is_eval_text(source):
        raise eval_only_error(source)
    named = [x for x in SOURCES if not x.startswith("FILE")]
    if source in named or names_text_file(source):
        return
    raise LrinferError(f"unknown calibration source '{source}'; use {', '.join(named)}, or a .txt/.jsonl file")


def resolve_calib(source: str, tokenizer, can_generate: bool = True) -> str:
    """`auto` -> CHAT_MODEL_CALIB for a tokenizer with a chat template (when the model can generate,
    i.e. is loaded whole), else wikitext2; any other source unchanged."""
    if source != "auto":
        return source
    from lrinfer.evaluation.generate import has_chat_template
    if has_chat_template(tokenizer):
        if can_generate:
            return CHAT_MODEL_CALIB
        log.warning("calibrating on wikitext2: chat calibration needs the whole model to write its conversations "
                    "(pass --no-stream, or --calib %s)", CHAT_MODEL_CALIB)
    return "wikitext2"


def _chat_part(model, tokenizer, source: str, n_samples: int, seq_len: int, seed: int, plain: torch.Tensor | None,
               plain_desc: str, progress: bool = True, prompts: list[str] | None = None) -> tuple[torch.Tensor, str]:
    """`chat`: n_samples conversations; `mix`: chat rows alternating with the `plain` rows."""
    if model is None:
        raise LrinferError(f"calibration source '{source}' needs the model (it writes the conversations)")
    n_chat = n_samples if plain is None else n_samples - plain.shape[0]
    chat = chat_calibration(model, tokenizer, n_chat, seq_len, seed, prompts=prompts, progress=progress)
    desc = "chat: the model's own answers to lrinfer/evaluation/tasks/chat_calib_prompts.txt through its chat template"
    if plain is None or plain.shape[0] == 0:
        return chat, desc
    rows = []
    for i in range(max(n_chat, plain.shape[0])):   # alternating: any first k rows hold both kinds
        rows += [t[i] for t in (chat, plain) if i < t.shape[0]]
    return torch.stack(rows), f"mix: {n_chat} samples of {desc}, alternating with {plain.shape[0]} of {plain_desc}"


def _n_plain(source: str, n_samples: int) -> int:
    return n_samples - round(n_samples * MIX_CHAT_FRACTION) if source == "mix" else n_samples


def calibration_batch(tokenizer, source: str, n_samples: int, seq_len: int, seed: int = 0,
                      data_dir: Path | None = None, model=None, progress: bool = True) -> tuple[torch.Tensor, str]:
    """`n_samples` random windows of `seq_len` tokens, [n_samples, seq_len], and a description.

    "self" samples text from `model` itself (data-free; the report says so). "chat": conversations
    `model` writes through its chat template; "mix": those alternating with WikiText-2 windows;
    "auto": `resolve_calib`.
    """
    if n_samples < 1 or seq_len < 2:
        raise LrinferError(f"calibration needs n_samples >= 1 and seq_len >= 2; got {n_samples}, {seq_len}")
    check_calib_source(source)
    source = resolve_calib(source, tokenizer, can_generate=model is not None)
    gen = torch.Generator().manual_seed(seed)
    if source == "self":
        if model is None:
            raise LrinferError("calibration source 'self' needs the model")
        return self_generated(model, tokenizer, n_samples, seq_len, seed), "self-generated (data-free fallback)"
    if source == "chat":
        return _chat_part(model, tokenizer, source, n_samples, seq_len, seed, None, "", progress)
    text, desc = load_text("wikitext2" if source == "mix" else source, "calib", data_dir)
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise LrinferError(f"{desc} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len, (_n_plain(source, n_samples),), generator=gen)
    plain = torch.stack([ids[s:s + seq_len] for s in starts.tolist()]) if starts.numel() else ids[:0].view(0, seq_len)
    if source == "mix":
        return _chat_part(model, tokenizer, source, n_samples, seq_len, seed, plain, desc, progress)
    return plain, desc


def calibration_split(tokenizer, source: str, n_samples: int, seq_len: int, heldout: int, seed: int = 0,
                      data_dir: Path | None = None, model=None, progress: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Calibration windows [n_samples, seq_len] drawn at random from the first 90% of the text, and
    `heldout` non-overlapping windows [heldout, seq_len] from the last 10%, for choosing between
    recipes without touching any evaluation split. "chat"/"mix": the chat rows as in
    `calibration_batch`, the plain rows from WikiText-2, and the held-apart windows both kinds in the
    same shares (for "mix": WikiText-2 windows, then the model's conversations on the last 10% of the
    chat prompts, which the calibration rows never answer), so the search's score sees chat too."""
    check_calib_source(source)
    source = resolve_calib(source, tokenizer, can_generate=model is not None)
    if source == "self":
        raise LrinferError("the recipe search needs held-apart text; --calib self gives none (use another --calib)")
    text, desc = load_text("wikitext2" if source in CHAT_SOURCES else source, "calib", data_dir)
    ids = tokenize(tokenizer, text)
    cut = int(ids.numel() * SEARCH_FIT_SHARE)
    if cut < seq_len + 1 or (ids.numel() - cut) // seq_len < heldout:
        raise LrinferError(f"{desc} has {ids.numel()} tokens: too few for {heldout} held-apart windows of "
                           f"{seq_len} tokens in its last 10%; lower --heldout or --calib-seq-len")
    gen = torch.Generator().manual_seed(seed)
    n_plain = 0 if source == "chat" else _n_plain(source, n_samples)
    starts = torch.randint(0, cut - seq_len, (n_plain,), generator=gen)
    calib = torch.stack([ids[s:s + seq_len] for s in starts.tolist()]) if n_plain else ids[:0].view(0, seq_len)
    if source not in CHAT_SOURCES:
        return calib, ids[cut: cut + heldout * seq_len].view(heldout, seq_len), desc
    prompts = load_calibration_prompts()
    split = int(len(prompts) * SEARCH_FIT_SHARE)
    if split < 1 or split == len(prompts):
        raise LrinferError(f"{CALIB_PROMPTS_FILE} holds {len(prompts)} prompts: too few to hold 10% apart")
    calib, chat_desc = _chat_part(model, tokenizer, source, n_samples, seq_len, seed,
                                  calib if source == "mix" else None, desc, progress, prompts=prompts[:split])
    n_held_chat = heldout - (_n_plain(source, heldout) if source == "mix" else 0)
    held = torch.cat([ids[cut: cut + (heldout - n_held_chat) * seq_len].view(-1, seq_len),
                      chat_calibration(model, tokenizer, n_held_chat, seq_len, seed + 1, prompts=prompts[split:],
                                       progress=progress) if n_held_chat else ids[:0].view(0, seq_len)])
    return calib, held, (f"{chat_desc} (the first {split} prompts); held apart: {heldout - n_held_chat} windows of "
                         f"{desc}, {n_held_chat} of the conversations on the last {len(prompts) - split} prompts")


@torch.no_grad()
def self_generated(model, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_samples, seq_len] tokens sampled from the model (temperature 1), starting from BOS/EOS."""
    log.warning("calibrating on text sampled from the model itself (data-free fallback)")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.full((n_samples, 1), start, dtype=torch.long, device=device)
    out = model.generate(prompt, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=seq_len, min_new_tokens=seq_len,
                         pad_token_id=tokenizer.eos_token_id, attention_mask=torch.ones_like(prompt))
    return out[:, 1:seq_len + 1].cpu()


CALIB_PROMPTS_FILE = TASK_DIR / "chat_calib_prompts.txt"


@dataclass(frozen=True)
class ChatCalibration:
    """How chat calibration text is made: the dense model answers each prompt (sampled at
    `temperature`, nucleus `top_p`, at most `max_new_tokens`), `batch_size` prompts at a time."""
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16


def load_calibration_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts the dense model answers for chat calibration, one a line."""
    path = Path(path) if path is not None else CALIB_PROMPTS_FILE
    if not path.is_file():
        raise LrinferError(f"chat calibration prompts not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise LrinferError(f"{path} holds no prompts")
    return prompts


@torch.no_grad()
def chat_calibration(model, tok, n_samples: int, seq_len: int, seed: int = 0, prompts: list[str] | None = None,
                     settings: ChatCalibration = ChatCalibration(), progress: bool = True) -> torch.Tensor:
    """[n_samples, seq_len] token ids: conversations of the dense `model` answering `prompts` (default
    `tasks/chat_calib_prompts.txt`, in a seeded order, reused with new samples when they run out)
    through its chat template, packed one after another; each sample starts at a conversation."""
    if not has_template(tok):
        raise LrinferError("chat calibration needs a tokenizer with a chat template; use --calib wikitext2")
    prompts = load_calibration_prompts() if prompts is None else list(prompts)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):   # the caller's RNG untouched
        torch.manual_seed(seed)
        return _conversations(model, tok, n_samples, seq_len, prompts, random.Random(seed), settings, progress)


def _conversations(model, tok, n_samples, seq_len, prompts, rng, settings, progress) -> torch.Tensor:
    was_training = model.training
    model.eval()
    samples: list[list[int]] = []
    current: list[int] = []
    queue: list[str] = []
    bar = tqdm(total=n_samples, desc="chat calibration", unit="sample", disable=not progress)
    while len(samples) < n_samples:
        if not queue:
            queue = prompts[:]
            rng.shuffle(queue)
        batch, queue = queue[:settings.batch_size], queue[settings.batch_size:]
        heads = [chat_prompt_ids(tok, p) for p in batch]
        news = generate_batch(model, tok, heads, settings.max_new_tokens, sample=True,
                              temperature=settings.temperature, top_p=settings.top_p)
        for head, new in zip(heads, news):
            current += head + new + tok("\n", add_special_tokens=False)["input_ids"]
            if len(current) >= seq_len:
                samples.append(current[:seq_len])
                current = []
                bar.update(1)
                if len(samples) == n_samples:
                    break
    bar.close()
    model.train(was_training)
    return torch.tensor(samples, dtype=torch.long)
