import json

import pytest
import torch

from lrinfer.offline.calibration_data import calibration_batch
from lrinfer.data import eval_windows, load_text, resolve_data_dir
from lrinfer.errors import LrinferError


class CharTok:
    """Characters as token ids: enough to test windowing."""
    bos_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_wikitext_local_files(data_dir):
    text, desc = load_text("wikitext2", "eval", data_dir)
    assert desc.endswith("wiki.test.raw") and text.startswith(" = Robert Boulter = \n\n\n Robert Boulter")
    text, desc = load_text("wikitext2", "calib", data_dir)
    assert desc.endswith("valid.txt") and "<unk>" in text


def test_eval_windows_are_non_overlapping_from_the_start(data_dir):
    w, _ = eval_windows(CharTok(), "wikitext2", 64, 5, data_dir)
    text, _ = load_text("wikitext2", "eval", data_dir)
    assert w.shape == (5, 64)
    assert w.flatten().tolist() == [ord(c) % 1000 for c in text[:320]]


def test_calibration_is_reproducible(data_dir):
    a, _ = calibration_batch(CharTok(), "wikitext2", 4, 32, seed=3, data_dir=data_dir)
    b, _ = calibration_batch(CharTok(), "wikitext2", 4, 32, seed=3, data_dir=data_dir)
    c, _ = calibration_batch(CharTok(), "wikitext2", 4, 32, seed=4, data_dir=data_dir)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 32)


def test_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"row {i} " * 10}) for i in range(20)))
    assert calibration_batch(CharTok(), str(tmp_path / "a.txt"), 3, 16)[0].shape == (3, 16)
    assert "row 19" in load_text(str(tmp_path / "b.jsonl"), "calib")[0]
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(LrinferError, match="bad.jsonl:1: each JSONL line needs a string field 'text'"):
        load_text(str(tmp_path / "bad.jsonl"), "calib")
    with pytest.raises(LrinferError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"), "calib")


def test_self_generated_calibration(tiny_model):
    class Tok:
        bos_token_id, eos_token_id = 1, 2
    ids, desc = calibration_batch(Tok(), "self", 2, 12, seed=0, model=tiny_model)
    again, _ = calibration_batch(Tok(), "self", 2, 12, seed=0, model=tiny_model)
    assert ids.shape == (2, 12) and "data-free" in desc and torch.equal(ids, again)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("LRINFER_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(LrinferError, match="data directory not found"):
        resolve_data_dir(tmp_path / "nope")
