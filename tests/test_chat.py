"""The chat evaluation (lrinfer/evaluation/chat.py, `lrinfer eval --tasks chat`) and chat-format calibration (`--calib`)."""
import json
import re

import pytest
import torch

from lrinfer.evaluation.chat import (ChatEval, chat_prompt_ids, evaluate_chat, generate_batch, load_questions,
                                     score_answer)
from lrinfer.offline.calibration_data import chat_calibration, load_calibration_prompts
from lrinfer.cli import main
from lrinfer.offline.calibration_data import CHAT_MODEL_CALIB, calibration_batch, calibration_split, resolve_calib
from lrinfer.errors import LrinferError

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. "
        "What is the capital? Paris is. ") * 60


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_hf_dir):
    return tiny_hf_dir(tmp_path_factory.mktemp("chat_dir"), TEXT, chat=True)


@pytest.fixture
def chat_model(chat_dir):
    import lrinfer
    model, tok, _ = lrinfer.load_model(str(chat_dir / "model"))
    return model, tok


@pytest.mark.parametrize("answer,aliases,verdict", [
    ("The capital of France is Paris.", ["Paris"], "correct"),
    ("PARIS", ["paris"], "correct"),
    ("It is new delhi, I think", ["New Delhi", "Delhi"], "correct"),
    ("The answer is four", ["4", "four"], "correct"),
    ("12 divided by 4 equals 3.", ["3", "three"], "correct"),
    ("Water freezes at 0 degrees.", ["0", "zero"], "correct"),
    ("", ["Paris"], "empty"),
    ("  \n ", ["Paris"], "empty"),
    ("Romeo and Juliet", ["Rome"], "wrong"),       # whole words only
    ("It has 14 legs", ["4"], "wrong"),             # whole numbers only
    ("It is -18.0°C", ["0"], "wrong"),
    ("About 4.5 of them", ["4"], "wrong"),
    ("The capital of Spain is Barcelona.", ["Madrid"], "wrong"),
])
def test_score_answer(answer, aliases, verdict):
    assert score_answer(answer, aliases) == verdict


def _words(s: str) -> list[str]:
    return re.findall(r"\w+", s.lower())


def _ngrams(s: str, n: int = 5) -> set:
    w = _words(s)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_questions_load_and_are_well_formed():
    qs = load_questions()
    assert 60 <= len(qs) <= 120
    assert len({q["id"] for q in qs}) == len(qs) and len({q["question"].lower() for q in qs}) == len(qs)
    for q in qs:   # repeating the question never scores
        assert score_answer(q["question"], q["answers"]) == "wrong", q


def test_calibration_prompts_do_not_overlap_the_questions():
    questions = [q["question"] for q in load_questions()]
    prompts = load_calibration_prompts()
    assert len(prompts) >= 100
    assert not {" ".join(_words(q)) for q in questions} & {" ".join(_words(p)) for p in prompts}
    shared = set().union(*map(_ngrams, questions)) & set().union(*map(_ngrams, prompts))
    assert not shared, f"calibration prompts share word 5-grams with the evaluation questions: {shared}"


def test_bad_question_file_is_one_clear_error(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Why?", "answers": []}) + "\n")
    with pytest.raises(LrinferError, match=r"q.jsonl:1: each line needs a string 'question' and a non-empty"):
        load_questions(tmp_path / "q.jsonl")


def test_batched_answers_equal_one_at_a_time(chat_model):
    model, tok = chat_model
    prompts = [chat_prompt_ids(tok, q) for q in ("Why?", "What is the capital of the lazy dog and the fox?", "Hi")]
    assert len({len(p) for p in prompts}) == 3          # left padding is exercised
    together = generate_batch(model, tok, prompts, 12)
    alone = [generate_batch(model, tok, [p], 12)[0] for p in prompts]
    assert together == alone and all(0 < len(a) <= 12 for a in alone)


def test_evaluate_chat_counts_and_scores(chat_model):
    model, tok = chat_model
    qs = [{"question": q, "answers": ["zzz"]} for q in ("Why?", "Who jumps?", "What is in the box?", "Hi")]
    r = evaluate_chat(model, tok, qs, records=True, settings=ChatEval(max_new_tokens=8, batch_size=3),
                      progress=False)
    assert r["n"] == 4 and r["correct"] + r["wrong"] + r["empty"] == 4 and r["chat_template"]
    # each answer's own first word as the accepted answer: every non-empty answer scores
    first = [{"question": q["question"], "answers": [_words(rec["answer"])[0]]}
             for q, rec in zip(qs, r["records"]) if _words(rec["answer"])]
    again = evaluate_chat(model, tok, first, settings=ChatEval(max_new_tokens=8, batch_size=3), progress=False)
    assert first and again["correct"] == len(first) and again["acc"] == 1.0


def test_a_model_that_ends_its_turn_at_once_is_all_empty(chat_model):
    model, tok = chat_model
    with torch.no_grad():
        model.model.norm.weight.zero_()    # every logit 0: greedy picks id 0, <|im_end|>
    r = evaluate_chat(model, tok, load_questions()[:5], settings=ChatEval(max_new_tokens=4), progress=False)
    assert r["empty"] == 5 and r["correct"] == 0 and r["acc"] == 0.0


def test_chat_calibration_is_templated_conversations(chat_model):
    model, tok = chat_model
    rng = torch.get_rng_state()
    ids, desc = calibration_batch(tok, "chat", 3, 160, seed=1, model=model, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)    # sampled under its own seed, the caller's RNG untouched
    again, _ = calibration_batch(tok, "chat", 3, 160, seed=1, model=model)
    assert ids.shape == (3, 160) and ids.dtype == torch.long and torch.equal(ids, again) and "chat template" in desc
    prompts = [tuple(chat_prompt_ids(tok, p)) for p in load_calibration_prompts()]
    assert max(map(len, prompts)) < 160
    for row in ids.tolist():   # each sample starts with a whole templated prompt (its assistant header last)
        assert row[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert any(tuple(row[:len(p)]) == p for p in prompts)


def test_mix_alternates_chat_and_wikitext(chat_model, data_dir):
    model, tok = chat_model
    mixed, desc = calibration_batch(tok, "mix", 4, 32, seed=0, data_dir=data_dir, model=model)
    plain, _ = calibration_batch(tok, "wikitext2", 2, 32, seed=0, data_dir=data_dir)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert mixed.shape == (4, 32) and desc.startswith("mix: 2 samples of chat")
    assert [int(r[0]) == start for r in mixed] == [True, False, True, False]
    assert torch.equal(mixed[1::2], plain)
    # the search's split: chat rows on the first 90% of the prompts; held apart, WikiText-2 windows from
    # the last 10% of the text and conversations on the last 10% of the prompts, in the mix's shares
    calib, held, desc = calibration_split(tok, "mix", 4, 32, 4, data_dir=data_dir, model=model, progress=False)
    prompts = load_calibration_prompts()
    split = int(len(prompts) * 0.9)
    fit_chat = chat_calibration(model, tok, 2, 32, 0, prompts=prompts[:split], progress=False)
    held_chat = chat_calibration(model, tok, 2, 32, 1, prompts=prompts[split:], progress=False)
    assert calib.shape == (4, 32) and held.shape == (4, 32)
    assert torch.equal(calib[::2], fit_chat) and not any(int(r[0]) == start for r in calib[1::2])
    assert [int(r[0]) == start for r in held] == [False, False, True, True] and torch.equal(held[2:], held_chat)
    assert desc.startswith("mix: 2 samples of chat") and "held apart: 2 windows" in desc and "2 of the conversations" in desc


def test_auto_calibration_follows_the_chat_template(chat_model, tiny_model):
    _, chat_tok = chat_model

    class Plain:
        chat_template = None
    assert resolve_calib("auto", chat_tok) == CHAT_MODEL_CALIB
    assert resolve_calib("auto", chat_tok, can_generate=False) == "wikitext2"   # a streamed model
    assert resolve_calib("auto", Plain()) == "wikitext2"
    assert resolve_calib("chat", Plain()) == "chat"
    with pytest.raises(LrinferError, match="chat calibration needs a tokenizer with a chat template"):
        calibration_batch(Plain(), "chat", 2, 16, model=tiny_model)


def _compress(d, out, *extra):
    return main(["compress", "--model", str(d / "model"), "--method", "svdllm", "--ratio", "0.3", "--samples", "2",
                 "--calib-seq-len", "32", "--rank-multiple", "1", "--no-eval", "--no-progress", "--json",
                 "--out", str(out), *extra])


def test_compress_records_the_calibration_choice(chat_dir, data_dir, tmp_path, capsys):
    assert _compress(chat_dir, tmp_path / "auto", "--data-dir", str(data_dir)) == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["calibration"]["requested"] == "auto" and report["calibration"]["choice"] == CHAT_MODEL_CALIB
    assert report["config"]["calib"] == CHAT_MODEL_CALIB
    assert _compress(chat_dir, tmp_path / "wt", "--calib", "wikitext2", "--data-dir", str(data_dir)) == 0
    report = json.loads((tmp_path / "wt" / "report.json").read_text())
    assert report["calibration"]["choice"] == "wikitext2" and report["calibration"]["source"].endswith("valid.txt")


def test_eval_chat_task(chat_dir, capsys):
    assert main(["eval", str(chat_dir / "model"), "--tasks", "chat", "--limit", "3", "--no-ppl", "--json",
                 "--no-progress", "--chat-records"]) == 0
    r = json.loads(capsys.readouterr().out)["tasks"]["chat"]
    assert r["n"] == 3 and len(r["records"]) == 3 and r["correct"] + r["wrong"] + r["empty"] == 3


@pytest.mark.parametrize("calib", ["chatt", "wikitext"])
def test_bad_calib_is_one_line(calib, capsys):
    assert main(["compress", "--calib", calib, "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert f"unknown calibration source '{calib}'" in err and "wikitext2, chat, mix" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_smollm2_answers_through_its_template(smollm2):
    model, tok, _ = smollm2
    r = evaluate_chat(model, tok, limit=16, progress=False)   # 16 capitals: dense SmolLM2 gets 13 (Italy, Spain,
    assert r["empty"] == 0 and r["correct"] >= 12             # Portugal wrong), never silent
