"""Chat: does the model still answer when spoken to through its chat template?

Evaluation (`evaluate_chat`, `lrinfer eval --tasks chat`): short factual questions
(`tasks/chat_qa.jsonl`) asked one user turn each through the chat template, answered greedily
(at most `ChatEval.max_new_tokens` new tokens, batched with left padding and the KV cache). An
answer is correct when it contains one of the question's accepted answers as whole words
(case-insensitive); an answer that is empty after decoding (the model ended its turn at once) is
counted apart as empty.

Calibration (`chat_calibration`, `--calib chat|mix`): the dense model answers prompts from
`tasks/chat_calib_prompts.txt` (none of them an evaluation question) through its own template;
the whole conversations (system, user, assistant turns with their special tokens) are packed into
the calibration sequences, so the compressed model is fitted on the text it will see in chat.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lrinfer.data import jsonl_rows
from lrinfer.errors import LrinferError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "tasks"
QUESTIONS_FILE = TASK_DIR / "chat_qa.jsonl"
# a model without a chat template is asked in this plain format
RAW_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ChatEval:
    """How the chat evaluation asks: greedy, at most `max_new_tokens` new tokens, `batch_size` questions
    at a time."""
    max_new_tokens: int = 48
    batch_size: int = 16


# ---------------------------------------------------------------------------- data

def load_questions(path: str | Path | None = None) -> list[dict]:
    """The evaluation questions: [{"id", "category", "question", "answers": [alias, ...]}]."""
    path = Path(path) if path is not None else QUESTIONS_FILE
    if not path.is_file():
        raise LrinferError(f"chat questions not found: {path}")
    rows = []
    for i, row in jsonl_rows(path):
        answers = row.get("answers") if isinstance(row, dict) else None
        if not answers or not isinstance(row.get("question"), str) or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise LrinferError(f"{path}:{i}: each line needs a string 'question' and a non-empty list "
                               "'answers' of strings")
        rows.append(row)
    if not rows:
        raise LrinferError(f"{path} holds no questions")
    return rows


# ---------------------------------------------------------------------------- scoring

def _alias_pattern(alias: str) -> re.Pattern:
    # whole words and whole numbers: "4" matches neither "14" nor "4.5", "0" not "-18.0", "Rome" not "Romeo"
    return re.compile(r"(?<![\w.])" + re.escape(alias.strip()) + r"(?!\w|\.\d)", re.IGNORECASE)


def score_answer(answer: str, aliases: list[str]) -> str:
    """"empty" (nothing but whitespace), "correct" (contains an alias as whole words, any case) or "wrong"."""
    if not answer.strip():
        return "empty"
    return "correct" if any(_alias_pattern(a).search(answer) for a in aliases) else "wrong"


# ---------------------------------------------------------------------------- generation

def chat_prompt_ids(tok, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn of the chat template plus the assistant header
    (the template holds any BOS); without a template, `RAW_FORMAT` with the tokenizer's specials."""
    from .generate import prompt_text
    if has_template(tok):
        text, _ = prompt_text(tok, prompt)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(RAW_FORMAT.format(question=prompt))["input_ids"]


def has_template(tok) -> bool:
    from .generate import has_chat_template
    return has_chat_template(tok)


def _eos_pad(model, tok) -> tuple[list[int], int]:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return eos, pad


@torch.no_grad()
def generate_batch(model, tok, prompts: list[list[int]], max_new_tokens: int, *, sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """New token ids for each prompt (token ids), generated together: left padding, the KV cache,
    stopping at the end-of-turn/EOS token (kept in the output) or after `max_new_tokens`."""
    from transformers import GenerationConfig
    eos, pad = _eos_pad(model, tok)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad,
                           use_cache=True)
    if sample:
        cfg.temperature, cfg.top_p, cfg.top_k = temperature, top_p, 0
    out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=cfg)[:, width:].cpu()
    news = []
    for row in out.tolist():
        new = []
        for t in row:
            new.append(t)
            if t in eos:
                break
        news.append(new)
    return news


# ---------------------------------------------------------------------------- evaluation

def evaluate_chat(model, tok, questions: list[dict] | None = None, *, limit: int | None = None,
                  settings: ChatEval = ChatEval(), records: bool = False, progress: bool = True) -> dict:
    """Greedy answers to the chat questions, scored. Returns {"acc", "acc_stderr", "correct", "empty", "wrong", "n",
    "source", "chat_template", "max_new_tokens", "seconds", "by_category"} and, with `records`,
    "records": [{"id", "question", "answer", "result"}]."""
    if tok is None:
        raise LrinferError("the chat evaluation needs a tokenizer beside the weights")
    source = str(QUESTIONS_FILE) if questions is None else "given"
    questions = load_questions() if questions is None else questions
    if limit is not None:
        if limit < 1:
            raise LrinferError(f"--limit must be at least 1; got {limit}")
        questions = questions[:limit]
    was_training = model.training
    model.eval()
    # longest first: batches of similar length pad less
    order = sorted(range(len(questions)), key=lambda i: -len(chat_prompt_ids(tok, questions[i]["question"])))
    answers: list[str] = [""] * len(questions)
    t0 = time.perf_counter()
    starts = range(0, len(order), settings.batch_size)
    for s in tqdm(starts, desc="chat", unit="batch", disable=not progress):
        idx = order[s:s + settings.batch_size]
        news = generate_batch(model, tok, [chat_prompt_ids(tok, questions[i]["question"]) for i in idx],
                              settings.max_new_tokens)
        for i, new in zip(idx, news):
            answers[i] = tok.decode(new, skip_special_tokens=True)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    results = [score_answer(a, q["answers"]) for a, q in zip(answers, questions)]
    by_cat: dict[str, dict] = {}
    for q, r in zip(questions, results):
        c = by_cat.setdefault(q.get("category", "-"), {"n": 0, "correct": 0, "empty": 0})
        c["n"] += 1
        if r != "wrong":
            c[r] += 1
    n = len(questions)
    acc = results.count("correct") / n
    out = {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else math.nan,
           "correct": results.count("correct"), "empty": results.count("empty"),
           "wrong": results.count("wrong"), "n": n, "source": source, "chat_template": has_template(tok),
           "max_new_tokens": settings.max_new_tokens, "seconds": round(seconds, 2), "by_category": by_cat}
    if records:
        out["records"] = [{"id": q.get("id"), "question": q["question"], "answer": a, "result": r}
                          for q, a, r in zip(questions, answers, results)]
    return out


# ---------------------------------------------------------------------------- calibration


