"""Calibration and evaluation text: WikiText-2 (local or Hugging Face), any .txt/.jsonl, `self`, or chat
conversations of the model itself (`chat`, `mix`; lrinfer/chat.py)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import LrinferError

log = logging.getLogger(__name__)

DATA_ENV = "LRINFER_DATA_DIR"
SOURCES = ("auto", "wikitext2", "chat", "mix", "self", "FILE.txt", "FILE.jsonl")
CHAT_SOURCES = ("chat", "mix")    # conversations the dense model writes through its chat template
NEEDS_MODEL = ("self",) + CHAT_SOURCES   # calibration text the model itself makes: it must be loaded whole
# what `auto` calibrates a model with a chat template on (measured: docs/results.md, "Chat")
CHAT_MODEL_CALIB = "mix"
MIX_CHAT_FRACTION = 0.5           # `mix`: this share of the samples are chat, the rest plain text
# Files under the data directory (see ../shared/data/README.md).
_WIKITEXT_FILES = {"calib": "wikitext-2/valid.txt", "eval": "wikitext-2-raw/wiki.test.raw"}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: the argument, else $LRINFER_DATA_DIR, else ../shared/data
    beside the working directory or beside this source tree. None when none exists."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise LrinferError(f"data directory not found: {path}")
        return path
    if os.environ.get(DATA_ENV):
        return resolve_data_dir(os.environ[DATA_ENV])
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def _wikitext(purpose: str, data_dir: Path | None) -> tuple[str, str]:
    if data_dir is not None and (data_dir / _WIKITEXT_FILES[purpose]).is_file():
        path = data_dir / _WIKITEXT_FILES[purpose]
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        # The papers' convention: the rows of the split joined by blank lines.
        return "\n\n".join(lines), str(path)
    try:
        import datasets
    except ImportError:
        raise LrinferError(f"no local WikiText-2 (pass --data-dir or set {DATA_ENV} to a directory holding "
                           f"{_WIKITEXT_FILES[purpose]}), and the `datasets` package is not installed") from None
    split = "test" if purpose == "eval" else "train"
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as e:  # network errors come in many types
        raise LrinferError(f"no local WikiText-2 and the Hugging Face download failed ({type(e).__name__}); "
                           f"pass --data-dir or set {DATA_ENV}") from e
    return "\n\n".join(rows), f"hf:wikitext-2-raw-v1/{split}"


def jsonl_rows(path: Path):
    """(line number, parsed object) for each non-blank line of a JSONL file; one-line errors."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise LrinferError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise LrinferError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for i, row in jsonl_rows(path):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LrinferError(f"{path}:{i}: each JSONL line needs a string field 'text'")
            texts.append(text)
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def load_text(source: str, purpose: str, data_dir: Path | None = None) -> tuple[str, str]:
    """(text, description) for `source` in ("wikitext2", a .txt/.jsonl path); purpose "calib" or "eval"."""
    if source == "wikitext2":
        return _wikitext(purpose, data_dir)
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".raw") or path.exists():
        return _file_text(path), str(path)
    raise LrinferError(f"unknown data source '{source}'; use wikitext2, self, or a .txt/.jsonl file")


def check_calib_source(source: str) -> None:
    """A calibration source is a known name or a file path (checked for existence when it is read)."""
    named = [x for x in SOURCES if not x.startswith("FILE")]
    if source in named or Path(source).suffix in (".txt", ".jsonl", ".raw") or Path(source).expanduser().exists():
        return
    raise LrinferError(f"unknown calibration source '{source}'; use {', '.join(named)}, or a .txt/.jsonl file")


def resolve_calib(source: str, tokenizer, can_generate: bool = True) -> str:
    """`auto` -> CHAT_MODEL_CALIB for a tokenizer with a chat template (when the model can generate,
    i.e. is loaded whole), else wikitext2; any other source unchanged."""
    if source != "auto":
        return source
    from .generate import has_chat_template
    if has_chat_template(tokenizer):
        if can_generate:
            return CHAT_MODEL_CALIB
        log.warning("calibrating on wikitext2: chat calibration needs the whole model to write its conversations "
                    "(pass --no-stream, or --calib %s)", CHAT_MODEL_CALIB)
    return "wikitext2"


def _chat_part(model, tokenizer, source: str, n_samples: int, seq_len: int, seed: int, plain: torch.Tensor | None,
               plain_desc: str, progress: bool = True) -> tuple[torch.Tensor, str]:
    """`chat`: n_samples conversations; `mix`: chat rows alternating with the `plain` rows."""
    from .chat import chat_calibration
    if model is None:
        raise LrinferError(f"calibration source '{source}' needs the model (it writes the conversations)")
    n_chat = n_samples if plain is None else n_samples - plain.shape[0]
    chat = chat_calibration(model, tokenizer, n_chat, seq_len, seed, progress=progress)
    desc = "chat: the model's own answers to lrinfer/tasks/chat_calib_prompts.txt through its chat template"
    if plain is None or plain.shape[0] == 0:
        return chat, desc
    rows = []
    for i in range(max(n_chat, plain.shape[0])):   # alternating: any first k rows hold both kinds
        rows += [t[i] for t in (chat, plain) if i < t.shape[0]]
    return torch.stack(rows), f"mix: {n_chat} samples of {desc}, alternating with {plain.shape[0]} of {plain_desc}"


def _n_plain(source: str, n_samples: int) -> int:
    return n_samples - round(n_samples * MIX_CHAT_FRACTION) if source == "mix" else n_samples


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
    `calibration_batch`; the plain rows and the held-apart windows from WikiText-2."""
    check_calib_source(source)
    source = resolve_calib(source, tokenizer, can_generate=model is not None)
    if source == "self":
        raise LrinferError("the recipe search needs held-apart text; --calib self gives none (use another --calib)")
    text, desc = load_text("wikitext2" if source in CHAT_SOURCES else source, "calib", data_dir)
    ids = tokenize(tokenizer, text)
    cut = int(ids.numel() * 0.9)
    if cut < seq_len + 1 or (ids.numel() - cut) // seq_len < heldout:
        raise LrinferError(f"{desc} has {ids.numel()} tokens: too few for {heldout} held-apart windows of "
                           f"{seq_len} tokens in its last 10%; lower --heldout or --calib-seq-len")
    gen = torch.Generator().manual_seed(seed)
    n_plain = 0 if source == "chat" else _n_plain(source, n_samples)
    starts = torch.randint(0, cut - seq_len, (n_plain,), generator=gen)
    calib = torch.stack([ids[s:s + seq_len] for s in starts.tolist()]) if n_plain else ids[:0].view(0, seq_len)
    held = ids[cut: cut + heldout * seq_len].view(heldout, seq_len)
    if source in CHAT_SOURCES:
        calib, chat_desc = _chat_part(model, tokenizer, source, n_samples, seq_len, seed,
                                      calib if source == "mix" else None, desc, progress)
        return calib, held, f"{chat_desc}; held apart: {desc}"
    return calib, held, desc


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


def eval_windows(tokenizer, source: str, seq_len: int, windows: int | None = None,
                 data_dir: Path | None = None) -> tuple[torch.Tensor, str]:
    """Non-overlapping windows [w, seq_len] from the start of the evaluation text; all when `windows` is None."""
    text, desc = load_text(source, "eval", data_dir)
    ids = tokenize(tokenizer, text)
    available = ids.numel() // seq_len
    if available == 0:
        raise LrinferError(f"{desc} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    n = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        log.warning("only %d windows of %d tokens available in %s", available, seq_len, desc)
    return ids[: n * seq_len].view(n, seq_len), desc
