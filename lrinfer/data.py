"""Calibration and evaluation text: WikiText-2 (local or Hugging Face), any .txt/.jsonl, `self`, or chat
conversations of the model itself (`chat`, `mix`; lrinfer/evaluation/chat.py)."""
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


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
