"""`lrinfer generate` on a tiny compressed checkpoint with a tokenizer and a chat template:
greedy output equals Hugging Face `generate`'s, the template is applied (or not with --raw),
streaming prints the same text, sampling is seeded, bad input is a one-line error."""
import json

import pytest
import torch

import lrinfer
from lrinfer.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 60
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_hf_dir):
    """A plain-SVD 30% checkpoint of a tiny Llama whose tokenizer has a chat template."""
    root = tiny_hf_dir(tmp_path_factory.mktemp("gen"), TEXT)
    model, tok, source = lrinfer.load_model(str(root / "model"))
    tok.chat_template = TEMPLATE
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.3, rank_multiple=1), ids,
                              progress=False)
    return lrinfer.save_checkpoint(model, tok, root / "ck", {"method": "svd", "ratio": 0.3, "ranks": result.ranks},
                                   base_model=source)


def _hf_greedy(ckpt, text, n, add_special_tokens=True):
    model, tok = lrinfer.load_checkpoint(ckpt)
    ids = tok(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1], ids.shape[1]


def _run(capsys, *args):
    code = main(["generate", *map(str, args), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_raw_equals_hf_generate(ckpt, capsys):
    code, out, _ = _run(capsys, ckpt, "The quick brown", "--raw", "--max-new-tokens", 12, "--json")
    assert code == 0
    report = json.loads(out)
    completion, tokens, prompt_tokens = _hf_greedy(ckpt, "The quick brown", 12)
    assert report["completion"] == completion and report["tokens"] == tokens
    assert report["prompt_tokens"] == prompt_tokens and report["chat_template"] is False
    assert report["prompt"] == "The quick brown" and report["seconds"] > 0 and report["sample"] is None
    assert report["finish_reason"] in ("eos", "length")


def test_chat_template_and_streaming(ckpt, capsys):
    code, out, _ = _run(capsys, ckpt, "Pack my box", "--max-new-tokens", 8, "--json")
    assert code == 0
    report = json.loads(out)
    templated = "<|user|> Pack my box\n<|assistant|> "
    completion, tokens, prompt_tokens = _hf_greedy(ckpt, templated, 8, add_special_tokens=False)
    assert report["chat_template"] is True and report["prompt_tokens"] == prompt_tokens
    assert report["completion"] == completion and report["tokens"] == tokens
    # without --json the completion streams to stdout, the same text, then a newline
    code, out, err = _run(capsys, ckpt, "Pack my box", "--max-new-tokens", 8)
    assert code == 0 and out == completion + "\n" and "tokens in" in err


def test_sampling_is_seeded(ckpt, capsys):
    outs = []
    for _ in range(2):
        code, out, _ = _run(capsys, ckpt, "The lazy dog", "--sample", "--temperature", 1.5, "--top-p", 0.9,
                            "--seed", 3, "--max-new-tokens", 10, "--json")
        assert code == 0
        outs.append(json.loads(out))
    assert outs[0]["completion"] == outs[1]["completion"]
    assert outs[0]["sample"] == {"temperature": 1.5, "top_p": 0.9, "seed": 3}


def test_checkpoint_without_tokenizer(tmp_path, capsys):
    from ._tiny import tiny_checkpoint
    _, path, _ = tiny_checkpoint(tmp_path / "ck")
    code, _, err = _run(capsys, path, "hi")
    assert code == 2 and "no tokenizer" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["/no/such/model", "hi"], "model path not found"),
    (["CK", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["CK", "hi", "--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["CK", "hi", "--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["CK", "", "--raw"], "prompt is empty"),
])
def test_errors_are_one_line(ckpt, args, message, capsys):
    code, _, err = _run(capsys, *[str(ckpt) if a == "CK" else a for a in args])
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
