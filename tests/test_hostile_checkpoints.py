"""Hostile and broken checkpoints (issue #6): every one is refused with a one-line `CheckpointError`
that names the file and the problem; nothing is ever unpickled or imported from the checkpoint.

Deeper checks are reached by re-sealing: after rewriting a file, the manifest's sha256/bytes are
updated so the checksum passes and the loader gets to the check under test.
"""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lrinfer
from ._tiny import tiny_checkpoint
from lrinfer.runtime.checkpoint import MANIFEST, WEIGHTS, sha256_file

FACTOR = "model.layers.0.self_attn.q_proj"     # a compressed linear of the tiny model ([64, 64])
MLP = "model.layers.1.mlp.down_proj"           # [64, 128]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One valid checkpoint per module (plain svd at ratio 0.3: fast, no calibration statistics)."""
    _, path, result = tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "base", seq_len=16)
    return path, result.ranks


@pytest.fixture
def ck(base, tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(base[0], path)
    return path


# ---------------------------------------------------------------------------------------- helpers

def read_json(path, name):
    return json.loads((path / name).read_text())


def write_json(path, name, obj):
    (path / name).write_text(json.dumps(obj))


def reseal(path, declare_tensors: bool = False):
    """Update the manifest's sha256/bytes of every listed file (and, if asked, the declared
    shape/dtype of every tensor) so that only the deeper checks can catch the edit."""
    man = read_json(path, MANIFEST)
    for name in man["files"]:
        if (path / name).is_file():
            man["files"][name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    if declare_tensors:
        man["tensors"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                          for k, t in load_file(str(path / WEIGHTS)).items()}
        write_json(path, MANIFEST, man)
        return reseal(path)
    write_json(path, MANIFEST, man)


def rewrite_weights(path, edit, declare_tensors: bool = False):
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS), metadata={"format": "pt"})
    reseal(path, declare_tensors)


def set_rank(path, name, rank):
    """Set a rank in both the manifest and config.json (they must agree), then re-seal."""
    man, cfg = read_json(path, MANIFEST), read_json(path, "config.json")
    man["ranks"][name] = rank
    cfg["quantization_config"]["ranks"][name] = rank
    write_json(path, MANIFEST, man)
    write_json(path, "config.json", cfg)
    reseal(path)


def refused(path, pattern: str, file: str | None = WEIGHTS, **kw) -> str:
    """Load must raise a one-line CheckpointError matching `pattern` and naming `file`."""
    with pytest.raises(lrinfer.CheckpointError, match=pattern) as info:
        lrinfer.load_checkpoint(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    if file is not None:
        assert f"{path}/{file}" in msg, msg
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, lrinfer.LrinferError)
    return msg


def assert_loads(path, **kw):
    model, _ = lrinfer.load_checkpoint(path, **kw)
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
    return model


class MarkerOnUnpickle:
    """Unpickling this creates `marker` (via open(marker, 'w')): proof that something unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------- sanity

def test_the_valid_checkpoint_loads(ck):
    assert_loads(ck)
    assert_loads(ck, verify=False)


# ---------------------------------------------------------------------------------------- file damage

def test_truncated_safetensors(ck):
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(ck, r"model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated or modified\)")
    refused(ck, r"model\.safetensors: not a valid safetensors file", verify=False)


@pytest.mark.parametrize("where", ["header", "body"])
def test_flipped_byte_is_a_checksum_error(ck, where):
    data = bytearray((ck / WEIGHTS).read_bytes())
    data[20 if where == "header" else len(data) - 7] ^= 0x10
    (ck / WEIGHTS).write_bytes(bytes(data))
    refused(ck, r"model\.safetensors: checksum mismatch \(the file is corrupt or was modified\)")


def test_flipped_byte_in_config_is_a_checksum_error(ck):
    text = (ck / "config.json").read_text().replace('"vocab_size": 128', '"vocab_size": 129')
    (ck / "config.json").write_text(text)
    refused(ck, r"config\.json: \d+ bytes, the manifest says|config\.json: checksum mismatch", file="config.json")


# ---------------------------------------------------------------------------------------- tensor checks

def rank_of(path, name=FACTOR) -> int:
    return read_json(path, MANIFEST)["ranks"][name][0]


def test_factor_of_wrong_shape_for_its_rank(ck):
    r = rank_of(ck)
    rewrite_weights(ck, lambda t: t.update({f"{FACTOR}.U": t[f"{FACTOR}.U"][:, :-1]}))
    refused(ck, rf"'{FACTOR}\.U' has shape \[64, {r - 1}\], the model needs \[64, {r}\]")


def test_factor_of_wrong_shape_also_declared_in_manifest(ck):
    r = rank_of(ck)
    rewrite_weights(ck, lambda t: t.update({f"{FACTOR}.V": t[f"{FACTOR}.V"][:, :-1]}), declare_tensors=True)
    refused(ck, rf"'{FACTOR}\.V' has shape \[64, {r - 1}\], the model needs \[64, {r}\]")


def test_factor_of_wrong_dtype_against_manifest(ck):
    r = rank_of(ck)
    rewrite_weights(ck, lambda t: t.update({f"{FACTOR}.U": t[f"{FACTOR}.U"].double()}))
    refused(ck, rf"'{FACTOR}\.U' \(torch\.float64, \[64, {r}\]\) does not match lrinfer\.json")


def test_factor_of_wrong_dtype_also_declared_in_manifest(ck):
    # without the dtype check this loads and fails at the first forward (the op refuses mixed dtypes)
    rewrite_weights(ck, lambda t: t.update({f"{FACTOR}.U": t[f"{FACTOR}.U"].double()}), declare_tensors=True)
    refused(ck, rf"'{FACTOR}\.U' is float64 but the model's other tensors are float32")


def test_factor_of_integer_dtype(ck):
    rewrite_weights(ck, lambda t: t.update({f"{FACTOR}.V": t[f"{FACTOR}.V"].to(torch.int32)}),
                    declare_tensors=True)
    refused(ck, rf"'{FACTOR}\.V' has dtype torch\.int32, the model needs a floating tensor")


@pytest.mark.parametrize("which", ["U", "V"])
def test_missing_factor(ck, which):
    rewrite_weights(ck, lambda t: t.pop(f"{FACTOR}.{which}"), declare_tensors=True)
    refused(ck, rf"missing tensor\(s\) \['{FACTOR}\.{which}'\]")


def test_dense_weight_instead_of_factors(ck):
    def edit(t):
        U, V = t.pop(f"{FACTOR}.U"), t.pop(f"{FACTOR}.V")
        t[f"{FACTOR}.weight"] = U @ V.t()
    rewrite_weights(ck, edit, declare_tensors=True)
    refused(ck, r"missing tensor\(s\)")


@pytest.mark.parametrize("rank", [[65, 0], [64, 1]], ids=str)
def test_rank_out_of_range(ck, rank):
    set_rank(ck, FACTOR, rank)
    refused(ck, rf"rank .* of '{FACTOR}' is out of range for a \[64, 64\] layer "
                r"\(1 <= rank \+ residual rank <= 64\)", file=None)


@pytest.mark.parametrize("rank", [[0, 0], [-3, 0], [8, -1], [2.5, 0], ["8", 0], [True, 0], [8, 0, 0], "8"], ids=str)
def test_rank_malformed(ck, rank):
    set_rank(ck, FACTOR, rank)
    refused(ck, rf"ranks\['{FACTOR}'\] = .*; expected \[rank >= 1, residual rank >= 0\] \(integers\)", file=None)


def test_rank_larger_than_min_in_out_of_a_rectangular_layer(ck):
    set_rank(ck, MLP, [65, 0])     # [64, 128]: min is 64
    refused(ck, rf"rank \[65, 0\] of '{MLP}' is out of range for a \[64, 128\] layer "
                r"\(1 <= rank \+ residual rank <= 64\)", file=None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("which", ["U", "V"])
def test_nan_or_inf_in_a_factor(ck, value, which):
    def edit(t):
        t[f"{FACTOR}.{which}"][3, 2] = value
    rewrite_weights(ck, edit)
    refused(ck, rf"'{FACTOR}\.{which}' holds NaN/Inf")


def test_nan_in_an_uncompressed_weight(ck):
    def edit(t):
        t["model.embed_tokens.weight"][5, 5] = float("nan")
    rewrite_weights(ck, edit)
    refused(ck, r"'model\.embed_tokens\.weight' holds NaN/Inf")


def test_unknown_tensor(ck):
    rewrite_weights(ck, lambda t: t.update({"model.layers.0.backdoor": torch.zeros(3)}), declare_tensors=True)
    refused(ck, r"unknown tensor\(s\) \['model\.layers\.0\.backdoor'\]")


def test_tensor_undeclared_in_manifest(ck):
    man = read_json(ck, MANIFEST)
    del man["tensors"][f"{FACTOR}.U"]
    write_json(ck, MANIFEST, man)
    refused(ck, rf"'{FACTOR}\.U' .* does not match lrinfer\.json \(None\)")


def test_rank_for_a_layer_the_model_lacks(ck):
    set_rank(ck, "model.layers.7.self_attn.q_proj", [4, 0])
    refused(ck, r"ranks name 'model\.layers\.7\.self_attn\.q_proj', which this llama model lacks", file=None)


def test_rank_for_a_module_that_is_not_linear(ck):
    set_rank(ck, "model.embed_tokens", [4, 0])
    refused(ck, r"'model\.embed_tokens' is not a linear layer", file=None)


# ---------------------------------------------------------------------------------------- manifest / config

def test_manifest_and_config_ranks_differ(ck):
    cfg = read_json(ck, "config.json")
    cfg["quantization_config"]["ranks"][FACTOR] = [rank_of(ck) - 1, 0]
    write_json(ck, "config.json", cfg)
    reseal(ck)
    refused(ck, r"config\.json's quantization_config does not match lrinfer\.json", file=None)


@pytest.mark.parametrize("qc", [None, "lrinfer", {"quant_method": "gptq"}, []], ids=str)
def test_config_quantization_config_wrong(ck, qc):
    cfg = read_json(ck, "config.json")
    if qc is None:
        del cfg["quantization_config"]
    else:
        cfg["quantization_config"] = qc
    write_json(ck, "config.json", cfg)
    reseal(ck)
    refused(ck, r"config\.json's quantization_config does not match lrinfer\.json", file=None)


def test_manifest_not_json(ck):
    (ck / MANIFEST).write_bytes(b"\x00\xffnot json{")
    refused(ck, r"lrinfer\.json: not valid JSON", file=MANIFEST)


@pytest.mark.parametrize("content", ["[]", '"lrinfer"', '{"format": "other"}', "{}"])
def test_manifest_not_an_lrinfer_manifest(ck, content):
    (ck / MANIFEST).write_text(content)
    refused(ck, r"lrinfer\.json: not an lrinfer manifest", file=MANIFEST)


def test_manifest_missing(ck):
    (ck / MANIFEST).unlink()
    refused(ck, r"not an lrinfer checkpoint \(lrinfer\.json missing\)", file=None)


@pytest.mark.parametrize("key, value, pattern", [
    ("files", "x", r"'files' is a str, not an object"),
    ("ranks", None, r"'ranks' is a NoneType, not an object"),
    ("tensors", [1], r"'tensors' is a list, not an object"),
    ("aliases", 5, r"'aliases' is a int, not an object"),
    ("format_version", "1", r"format_version is '1', not an integer"),
    ("format_version", 99, r"format version 99 is newer than this lrinfer supports"),
])
def test_manifest_field_of_wrong_type(ck, key, value, pattern):
    man = read_json(ck, MANIFEST)
    man[key] = value
    write_json(ck, MANIFEST, man)
    refused(ck, pattern, file=MANIFEST if "newer" not in pattern else None, verify=False)


def test_manifest_file_entry_corrupt(ck):
    man = read_json(ck, MANIFEST)
    man["files"][WEIGHTS] = 5
    write_json(ck, MANIFEST, man)
    refused(ck, r"files entry 'model\.safetensors' is 5", file=MANIFEST)


def test_manifest_tensor_entry_corrupt(ck):
    man = read_json(ck, MANIFEST)
    man["tensors"][f"{FACTOR}.U"] = "float32"
    write_json(ck, MANIFEST, man)
    refused(ck, rf"tensors entry '{FACTOR}\.U' is 'float32'", file=MANIFEST, verify=False)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "..", ""])
def test_manifest_file_name_outside_the_directory(ck, name):
    man = read_json(ck, MANIFEST)
    man["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    write_json(ck, MANIFEST, man)
    refused(ck, r"is not a plain file name in the checkpoint directory", file=MANIFEST)


def test_listed_file_missing(ck):
    (ck / WEIGHTS).unlink()
    refused(ck, r"model\.safetensors: missing \(listed in lrinfer\.json\)")
    refused(ck, r"model\.safetensors: missing or not a file", verify=False)


def test_config_missing(ck):
    (ck / "config.json").unlink()
    refused(ck, r"config\.json: missing \(listed in lrinfer\.json\)", file="config.json")
    refused(ck, r"config\.json: missing; every checkpoint needs its model config", file="config.json",
            verify=False)


@pytest.mark.parametrize("content, pattern", [
    (b'{"model_type": "llama",', r"config\.json: unreadable"),
    (b"\xff\xfe\x00garbage", r"config\.json: unreadable"),
    (b"[1, 2]", r"config\.json: holds a list, not a JSON object"),
    (b"null", r"config\.json: holds a NoneType, not a JSON object"),
])
def test_config_invalid(ck, content, pattern):
    (ck / "config.json").write_bytes(content)
    reseal(ck)
    refused(ck, pattern, file="config.json")


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(model_type="no_such_arch"), r"cannot build the model from it \(ValueError: .*no_such_arch"),
    (lambda c: c.pop("model_type"), r"cannot build the model from it \(ValueError: "),
    (lambda c: c.update(hidden_size="wide"), r"cannot build the model from it \(.*hidden_size"),
])
def test_config_that_transformers_rejects(ck, edit, pattern):
    cfg = read_json(ck, "config.json")
    edit(cfg)
    write_json(ck, "config.json", cfg)
    reseal(ck)
    refused(ck, pattern, file="config.json")


def test_config_sizes_disagree_with_tensors(ck):
    cfg = read_json(ck, "config.json")
    cfg["vocab_size"] = 96
    write_json(ck, "config.json", cfg)
    reseal(ck)
    refused(ck, r"'(model\.embed_tokens|lm_head)\.weight' has shape \[128, 64\], the model needs \[96, 64\]")


# ---------------------------------------------------------------------------------------- nothing executes

@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("verify", [True, False])
def test_pickle_instead_of_safetensors_is_never_unpickled(ck, tmp_path, kind, verify):
    marker = tmp_path / "UNPICKLED"
    payload = {"model.embed_tokens.weight": MarkerOnUnpickle(marker)}
    if kind == "pickle":
        (ck / WEIGHTS).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ck / WEIGHTS)
    reseal(ck)                          # even with a matching checksum
    refused(ck, r"model\.safetensors: not a valid safetensors file .*pickled checkpoints are never loaded",
            verify=verify)
    assert not marker.exists()
    pickle.loads(pickle.dumps(MarkerOnUnpickle(marker)))     # the payload is live: unpickling does create it
    assert marker.exists()


def test_stray_pytorch_model_bin_is_ignored(ck, tmp_path):
    marker = tmp_path / "UNPICKLED"
    torch.save({"model.embed_tokens.weight": MarkerOnUnpickle(marker)}, ck / "pytorch_model.bin")
    (ck / "model.bin").write_bytes(pickle.dumps(MarkerOnUnpickle(marker)))
    assert_loads(ck)
    assert_loads(ck, verify=False)
    assert not marker.exists()


def test_remote_code_in_config_is_not_imported(ck, tmp_path):
    marker = tmp_path / "IMPORTED"
    (ck / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                "from transformers import LlamaConfig as EvilConfig\n")
    cfg = read_json(ck, "config.json")
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    write_json(ck, "config.json", cfg)
    reseal(ck)
    try:
        assert_loads(ck)
    except lrinfer.CheckpointError as e:     # refusing is fine too; executing is not
        assert "\n" not in str(e)
    assert not marker.exists()


def test_missing_factor_declared_as_an_alias(ck):
    """An alias the model does not tie must not leave a parameter without data (a meta tensor)."""
    rewrite_weights(ck, lambda t: t.pop(f"{FACTOR}.U"), declare_tensors=True)
    man = read_json(ck, MANIFEST)
    man["aliases"][f"{FACTOR}.U"] = "model.embed_tokens.weight"
    write_json(ck, MANIFEST, man)
    refused(ck, rf"no data for \['{FACTOR}\.U'\] .*aliases of tensors the model does not tie")
