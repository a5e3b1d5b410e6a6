"""Checkpoint format: atomic writes, checksums, refusals with clear messages."""
import json
import os

import pytest

import lrinfer
from lrinfer.runtime.checkpoint import MANIFEST, WEIGHTS, atomic_write_bytes, read_manifest

from ._old_writer import write_version1


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
    import lrinfer.runtime.checkpoint as ck

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


# --- the format as one object: CheckpointSpec ---------------------------------------------------

def test_spec_round_trips_through_json():
    from lrinfer.runtime.checkpoint import LAYOUT, CheckpointSpec
    spec = CheckpointSpec({"a.q_proj": (48, 16), "a.down_proj": (32, 0)}, "ressvd", 0.25, base_model="tiny",
                          dtype="bfloat16", extra={"selection": "all", "config": {"seed": 3}})
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["quant_method"] == "lrinfer" and d["layout"] == LAYOUT and d["ranks"]["a.q_proj"] == [48, 16]
    assert CheckpointSpec.from_dict(d) == spec
    # a version 1 block written before the spec (no layout, dtype, base_model; ranks as [k] or k) reads too
    old = CheckpointSpec.from_dict({"quant_method": "lrinfer", "format_version": 1, "method": "svd", "ratio": 0.3,
                                    "ranks": {"x": [8], "y": 4}})
    assert old.ranks == {"x": (8, 0), "y": (4, 0)} and old.layout == LAYOUT and old.version == 1


@pytest.mark.parametrize("edit, pattern", [
    ({"quant_method": "gptq"}, r"quant_method is 'gptq', not 'lrinfer'"),
    ({"format_version": 99}, r"format version 99 is newer than this lrinfer supports \(1\); upgrade lrinfer"),
    ({"format_version": "1"}, r"format_version is '1', not a positive integer"),
    ({"layout": "V[k,in] U[k,out]"}, r"layout 'V\[k,in\] U\[k,out\]' is not one this lrinfer reads"),
    ({"ratio": "0.2"}, r"'ratio' is '0.2'; expected a number or null"),
    ({"method": 3}, r"'method' is 3; expected a str or null"),
    ({"dtype": "float99"}, r"dtype 'float99' is not a torch dtype"),
    ({"ranks": [[8, 0]]}, r"'ranks' is a list, not an object"),
    ({"ranks": {"x": [8, 0, 1]}}, r"ranks\['x'\] = \[8, 0, 1\]; expected \[rank >= 1, residual rank >= 0\]"),
])
def test_spec_refuses_bad_fields_in_one_line(edit, pattern):
    from lrinfer.runtime.checkpoint import CheckpointSpec
    d = {"quant_method": "lrinfer", "format_version": 1, "method": "svd", "ratio": 0.3, "ranks": {"x": [8, 0]}, **edit}
    with pytest.raises(lrinfer.CheckpointError, match=pattern) as info:
        CheckpointSpec.from_dict(d, "cfg")
    assert "\n" not in str(info.value) and str(info.value).startswith("cfg: ")


def test_save_checkpoint_builds_the_spec_from_the_model(tmp_path, tiny_model, calib_ids):
    from lrinfer.runtime.checkpoint import LAYOUT, CheckpointSpec
    result = lrinfer.compress(tiny_model, lrinfer.CompressConfig(method="svd", ratio=0.3), calib_ids, progress=False)
    path = lrinfer.save_checkpoint(tiny_model, None, tmp_path / "ck", base_model="tiny")
    manifest = read_manifest(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert manifest["ranks"] == qc["ranks"] == result.ranks
    assert manifest["layout"] == qc["layout"] == LAYOUT and manifest["dtype"] == qc["dtype"] == "float32"
    assert manifest["base_model"] == qc["base_model"] == "tiny"
    # ranks that are not the model's are refused before anything is written
    name = next(iter(result.ranks))
    wrong = CheckpointSpec({**CheckpointSpec.of(tiny_model).ranks, name: (1, 0)})
    with pytest.raises(lrinfer.LrinferError, match="ranks differ from the model's LowRankLinear modules"):
        lrinfer.save_checkpoint(tiny_model, None, tmp_path / "bad", wrong, base_model="tiny")
    assert not (tmp_path / "bad").exists()


def test_skeleton_swaps_linears_on_meta(tiny_model):
    from lrinfer.runtime.checkpoint import CheckpointSpec, skeleton
    from lrinfer.runtime.nn import LowRankLinear
    name = "model.layers.1.mlp.down_proj"
    lin = tiny_model.get_submodule(name)
    skeleton(tiny_model, CheckpointSpec({name: (8, 4)}))
    m = tiny_model.get_submodule(name)
    assert isinstance(m, LowRankLinear) and (m.rank, m.rank2) == (8, 4) and m.V.is_meta
    assert (m.in_features, m.out_features, m.V.dtype) == (lin.in_features, lin.out_features, lin.weight.dtype)
    assert skeleton(tiny_model, CheckpointSpec({name: (8, 4)})).get_submodule(name) is m   # kept as it is
    with pytest.raises(lrinfer.CheckpointError, match=r"rank \[80, 0\] of .* is out of range"):
        skeleton(tiny_model, CheckpointSpec({"model.layers.0.mlp.up_proj": (80, 0)}))


def test_version1_checkpoint_loads_bit_exactly(tmp_path, tiny_model, calib_ids):
    """A checkpoint of the old writer (with a residual pair and a bias-free layer) loads through
    load_checkpoint and transformers' from_pretrained, giving exactly the logits of the model it was
    written from, on fresh random tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from lrinfer.factors import FactorPair
    from lrinfer.runtime.nn import LowRankLinear, replace_module
    lrinfer.compress(tiny_model, lrinfer.CompressConfig(method="svd", ratio=0.3), calib_ids, progress=False)
    name = "model.layers.0.self_attn.o_proj"
    old = tiny_model.get_submodule(name)
    g = torch.Generator().manual_seed(7)
    pair = FactorPair(*(torch.randn(n, k, generator=g) / 8 for n, k in ((old.out_features, 12), (old.in_features, 12),
                                                                       (old.out_features, 4), (old.in_features, 4))))
    replace_module(tiny_model, name, LowRankLinear.from_factors(pair))
    path = write_version1(tiny_model.eval(), tmp_path / "v1")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "big")))
    with torch.no_grad():
        want = tiny_model(ids).logits
        loaded, _ = lrinfer.load_checkpoint(path)
        assert loaded.get_submodule(name).rank2 == 4
        assert torch.equal(loaded(ids).logits, want)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert torch.equal(hf(ids).logits, want)
