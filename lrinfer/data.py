"""Calibration and evaluation text: WikiText-2 (local or Hugging Face), any .txt/.jsonl, `self`, or chat
conversations of the model itself (`chat`, `mix`; lrinfer/evaluation/chat.py); and evaluation-only
texts shipped in the package (`timemachine`; lrinfer/texts/README.md)."""
from __future__ import annotations

import hashlib
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

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
# Evaluation-only texts shipped in the package, with the sha256 of each file (lrinfer/texts/README.md):
# never calibration text, never the recipe search's held-apart text (`load_text` refuses them for that).
EVAL_TEXTS = {
    "timemachine": {"file": "time_machine.txt",
                    "sha256": "124084573ad7c355a60f71ed1a9e306746f46c454bd0c448df605095454265d8",
                    "title": "H. G. Wells, The Time Machine (1895; public domain, Project Gutenberg eBook #35)"},
}
EVAL_SOURCES = ("wikitext2", *EVAL_TEXTS, "FILE.txt", "FILE.jsonl")   # what `--data` takes, comma-separated


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


def eval_only_error(source: str) -> LrinferError:
    """The error for naming an evaluation-only text as calibration (or held-apart search) text."""
    return LrinferError(f"'{source}' is an evaluation-only text (lrinfer/texts/README.md): it is never calibrated "
                        "on nor used by the recipe search; calibrate on wikitext2, chat, mix, self or your own "
                        ".txt/.jsonl file, and pass it to --data to measure perplexity on it")


def is_eval_text(source: str) -> bool:
    """`source` names a packaged evaluation-only text, by name or by the path of its file."""
    if source in EVAL_TEXTS:
        return True
    try:
        path = Path(source).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(path == (TEXTS_DIR / t["file"]).resolve() for t in EVAL_TEXTS.values())


def packaged_text(name: str) -> tuple[str, str]:
    """(text, description) of the packaged evaluation text `name`, its sha256 checked against EVAL_TEXTS."""
    entry = EVAL_TEXTS[name]
    path = TEXTS_DIR / entry["file"]
    if not path.is_file():
        raise LrinferError(f"the packaged evaluation text {path} is missing: reinstall lrinfer")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise LrinferError(f"{path} does not match its sha256 in lrinfer/texts/README.md: it was modified; reinstall")
    return raw.decode("utf-8"), f"{name}: {entry['title']}"


TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".raw")


def names_text_file(source: str) -> bool:
    """`source` is a path to a text file (by its suffix, or because it exists), not a named source."""
    path = Path(source).expanduser()
    return path.suffix in TEXT_FILE_SUFFIXES or path.exists()


def load_text(source: str, purpose: str, data_dir: Path | None = None) -> tuple[str, str]:
    """(text, description) for `source` in ("wikitext2", a packaged text of EVAL_TEXTS, a .txt/.jsonl path);
    purpose "calib" or "eval". The packaged texts are evaluation only: any other purpose is an error."""
    if is_eval_text(source) and purpose != "eval":
        raise eval_only_error(source)
    if source == "wikitext2":
        return _wikitext(purpose, data_dir)
    if source in EVAL_TEXTS:
        return packaged_text(source)
    if names_text_file(source):
        path = Path(source).expanduser()
        return _file_text(path), str(path)
    raise LrinferError(f"unknown data source '{source}'; use wikitext2, {', '.join(EVAL_TEXTS)} (evaluation only), "
                       "self, or a .txt/.jsonl file")


def eval_sources(spec: str) -> list[str]:
    """`--data` -> the evaluation texts it names, in order, each once: "wikitext2,timemachine" -> both."""
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise LrinferError(f"--data names no evaluation text; use {', '.join(EVAL_SOURCES[:-2])} or a .txt/.jsonl "
                           "file, comma-separated")
    for name in names:
        if name not in ("wikitext2", *EVAL_TEXTS) and not names_text_file(name):
            raise LrinferError(f"unknown evaluation text '{name}'; use {', '.join(EVAL_SOURCES[:-2])} or a "
                               ".txt/.jsonl file (comma-separated for several)")
    return names


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
