"""Checkpoint format: atomic writes, checksums, refusals with clear messages."""
import json
import os

import pytest

import lrinfer
from lrinfer.checkpoint import MANIFEST, WEIGHTS, atomic_write_bytes, read_manifest


@pytest.fixture
def checkpoint(tmp_path, tiny_model, calib_ids):
    result = lrinfer.compress(tiny_model, lrinfer.CompressConfig(method="svd", ratio=0.3), calib_ids,
                              progress=False)
    path = lrinfer.save_checkpoint(tiny_model, None, tmp_path / "ck",
                                   {"method": "svd", "ratio": 0.3, "ranks": result.ranks}, base_model="tiny")
    return path, tiny_model, result


def test_layout_and_manifest(checkpoint):
    path, model, result = checkpoint
    assert {p.name for p in path.iterdir()} >= {WEIGHTS, "config.json", MANIFEST}
    manifest = read_manifest(path)
    assert manifest["ranks"] == result.ranks and manifest["method"] == "svd"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lrinfer" and qc["ranks"] == result.ranks
    name = next(iter(result.ranks))
    assert manifest["tensors"][f"{name}.U"]["shape"] == list(result.factors[name].U.shape)
    assert len(manifest["files"][WEIGHTS]["sha256"]) == 64
    # the dense weight of a compressed layer is not stored
    assert f"{name}.weight" not in manifest["tensors"]
    assert not list(path.parent.glob(".ck.tmp-*"))


def test_flipped_byte_is_a_checksum_error(checkpoint):
    path, *_ = checkpoint
    data = bytearray((path / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(lrinfer.CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        lrinfer.load_checkpoint(path)


def test_truncated_file_is_refused(checkpoint):
    path, *_ = checkpoint
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(lrinfer.CheckpointError, match="truncated or modified"):
        lrinfer.load_checkpoint(path)


def test_manifest_and_config_must_agree(checkpoint):
    path, *_ = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["ranks"]))
    cfg["quantization_config"]["ranks"][name] = [3, 0]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lrinfer.CheckpointError, match="does not match"):
        lrinfer.load_checkpoint(path, verify=False)


def test_overwrite_policy(checkpoint, tiny_model):
    path, model, result = checkpoint
    qc = {"method": "svd", "ratio": 0.3, "ranks": result.ranks}
    with pytest.raises(lrinfer.LrinferError, match="different base.*--overwrite"):
        lrinfer.save_checkpoint(model, None, path, qc, base_model="another-model")
    lrinfer.save_checkpoint(model, None, path, qc, base_model="tiny")            # same model: a re-run
    lrinfer.save_checkpoint(model, None, path, qc, base_model="other", overwrite=True)
    assert read_manifest(path)["base_model"] == "other"
    plain = path.parent / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(lrinfer.LrinferError, match="not empty"):
        lrinfer.save_checkpoint(model, None, plain, qc, base_model="tiny")
    assert (plain / "notes.txt").read_text() == "mine"


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


def test_failed_save_leaves_no_partial_directory(tmp_path, tiny_model, monkeypatch):
    import lrinfer.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "sha256_file", boom)
    with pytest.raises(OSError):
        lrinfer.save_checkpoint(tiny_model, None, tmp_path / "ck", {"ranks": {}}, base_model="tiny")
    assert list(tmp_path.iterdir()) == []


def test_not_a_safetensors_file(checkpoint):
    path, *_ = checkpoint
    import pickle
    (path / WEIGHTS).write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(lrinfer.CheckpointError, match="not a valid safetensors file"):
        lrinfer.load_checkpoint(path, verify=False)


def test_nan_factor_is_refused(checkpoint):
    from safetensors.torch import load_file, save_file
    path, *_ = checkpoint
    tensors = load_file(str(path / WEIGHTS))
    key = next(k for k in tensors if k.endswith(".U"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / WEIGHTS))
    with pytest.raises(lrinfer.CheckpointError, match=f"{key}' holds NaN"):
        lrinfer.load_checkpoint(path, verify=False)


def test_missing_directory():
    with pytest.raises(lrinfer.CheckpointError, match="not found"):
        lrinfer.load_checkpoint("/nonexistent/ck")
