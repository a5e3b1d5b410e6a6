"""Fuzzing (issue #6): the checkpoint loader under random damage, and the low-rank op under random
shapes, layouts and dtypes.

Loader contract: a damaged checkpoint either loads (and then runs) or raises `LrinferError`
(`CheckpointError` is one) — never another exception type. Logits must be finite whenever the
tensor *values* were not changed; with verify=False a flipped bit inside a tensor's data is just a
different (possibly huge) number and nothing can tell it from a real weight.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lrinfer
from ._tiny import tiny_llama
from lrinfer.runtime.checkpoint import MANIFEST, WEIGHTS, sha256_file
from lrinfer.runtime.kernels import lowrank_linear, lowrank_linear_reference

# ============================================================================ loader fuzz


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.3), ids, progress=False)
    return lrinfer.save_checkpoint(model, None, tmp_path_factory.mktemp("fuzz") / "base",
                                   {"method": "svd", "ratio": 0.3, "ranks": result.ranks}, base_model="tiny")


def header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def mutate_bytes(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    """One random flip / truncation / insertion / deletion / digit change in data[lo:hi]."""
    data = bytearray(data)
    pos = rng.randrange(lo, max(lo + 1, hi))
    op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "digit"])
    if op == "flip":
        data[pos] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[pos:]
    elif op == "insert":
        data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == "delete":
        del data[pos:pos + rng.randint(1, 8)]
    else:   # a digit in the header: shapes and data offsets
        digits = [i for i in range(lo, min(hi, len(data))) if chr(data[i]).isdigit()]
        if digits:
            data[rng.choice(digits)] = ord(str(rng.randrange(10)))
    return bytes(data)


JSON_VALUES = [None, True, False, 0, 1, -1, 2, 7, 64, 2.5, -0.0, "", "x", "float16", "llama", [], [1],
               [0, 0], [65, 0], {}, {"a": 1}]


def leaves(obj, path=()):
    """Every (path, value) of a JSON document, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))


def mutate_json(rng: random.Random, doc):
    """Replace, delete or add one value somewhere in the document."""
    doc = copy.deepcopy(doc)
    path, _ = rng.choice([p for p in leaves(doc) if p[0]])
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    op = rng.choice(["replace", "replace", "replace", "delete", "add"])
    if op == "replace":
        parent[path[-1]] = copy.deepcopy(rng.choice(JSON_VALUES))
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[rng.choice(["model.layers.0.mlp.up_proj", "extra", path[-1] + "_x"])] = rng.choice(JSON_VALUES)
    else:
        parent.append(copy.deepcopy(rng.choice(JSON_VALUES)))
    return doc


def reseal(path):
    man = json.loads((path / MANIFEST).read_text())
    for name in man["files"]:
        if (path / name).is_file():
            man["files"][name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST).write_text(json.dumps(man))


def make_case(rng: random.Random, base, path):
    """A damaged copy of `base` at `path`. Returns (description, values_may_change, reseal_ok)."""
    shutil.copytree(base, path)
    target = rng.choice(["header", "header", "body", "manifest", "manifest", "config", "ranks"])
    if target in ("header", "body"):
        data = (path / WEIGHTS).read_bytes()
        h = header_len(data)
        lo, hi = (0, h) if target == "header" else (h, len(data))
        (path / WEIGHTS).write_bytes(mutate_bytes(rng, data, lo, hi))
        return target, True, True
    if target == "ranks":   # the same edit in both JSON files, so they still agree
        man = json.loads((path / MANIFEST).read_text())
        cfg = json.loads((path / "config.json").read_text())
        name = rng.choice(sorted(man["ranks"]))
        value = rng.choice([[0, 0], [1, 0], [8, 8], [65, 0], [16, 1], [True, 0], [-1, 0], "16", None, 16])
        man["ranks"][name] = cfg["quantization_config"]["ranks"][name] = value
        (path / MANIFEST).write_text(json.dumps(man))
        (path / "config.json").write_text(json.dumps(cfg))
        return f"ranks[{name}]={value!r}", False, True
    name = MANIFEST if target == "manifest" else "config.json"
    doc = json.loads((path / name).read_text())
    if target == "config" and rng.random() < 0.5:   # aim at the model sizes and the ranks block
        doc = {**doc, "quantization_config": mutate_json(rng, doc["quantization_config"])} \
            if rng.random() < 0.5 else doc
        key = rng.choice(["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings",
                          "model_type", "rms_norm_eps", "dtype", "rope_parameters"])
        doc[key] = rng.choice(JSON_VALUES)
    else:
        doc = mutate_json(rng, doc)
    if rng.random() < 0.2:
        text = json.dumps(doc)
        cut = rng.randrange(len(text))
        (path / name).write_text(text[:cut] + rng.choice(["", "}", "\x00", "\ufffd"]) + text[cut + 1:])
    else:
        (path / name).write_text(json.dumps(doc))
    return f"{target} edit", False, target == "config"


def check_contract(path, verify: bool, values_may_change: bool, what: str):
    try:
        model, _ = lrinfer.load_checkpoint(path, verify=verify)
    except lrinfer.LrinferError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{what}: multi-line message {msg!r}"
        return "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{what} (verify={verify}): {type(e).__name__} escaped the loader: {e}")
    try:
        with torch.no_grad():
            logits = model(torch.arange(6)[None] % model.config.vocab_size).logits
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what} (verify={verify}): loaded, but the forward raised {type(e).__name__}: {e}")
    if not values_may_change:
        assert torch.isfinite(logits).all(), f"{what}: loaded with non-finite logits"
    return "loaded"


N_CASES = 50


def test_loader_fuzz(base, tmp_path):
    rng = random.Random(20240606)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(N_CASES):
        path = tmp_path / f"case{i}"
        what, values_may_change, reseal_ok = make_case(rng, base, path)
        what = f"case {i} ({what})"
        outcomes[check_contract(path, True, values_may_change, what)] += 1
        outcomes[check_contract(path, False, values_may_change, what)] += 1
        if reseal_ok:   # checksums made to match: only the structural checks stand
            reseal(path)
            outcomes[check_contract(path, True, values_may_change, what + " resealed")] += 1
        shutil.rmtree(path)
    assert outcomes["refused"] > N_CASES // 2, outcomes


def test_verified_checkpoint_refuses_every_byte_change(base, tmp_path):
    """With verify=True (the default) any change to a listed file is refused."""
    rng = random.Random(7)
    for i in range(10):
        path = tmp_path / f"case{i}"
        shutil.copytree(base, path)
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(mutate_bytes(rng, data, 0, len(data)) if i % 2 else
                                     mutate_bytes(rng, data, 0, header_len(data)))
        if (path / WEIGHTS).read_bytes() == data:
            continue
        with pytest.raises(lrinfer.CheckpointError, match=r"model\.safetensors: .*(checksum|truncated)"):
            lrinfer.load_checkpoint(path)


# ============================================================================ op property test

TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@st.composite
def op_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    M = draw(st.integers(1, 40))
    n_in, n_out = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    k = draw(st.integers(1, 32))
    k2 = draw(st.sampled_from([0, 0, 1, 5]))
    bias = draw(st.booleans())
    layout = draw(st.sampled_from(["2d", "3d", "transposed", "sliced", "3d_permuted", "3d_sliced"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, M, n_in, n_out, k, k2, bias, layout, seed


def make_x(M, n_in, layout, g, dtype):
    """x [M, in] or [b, M/b, in] in `dtype`; the non-contiguous layouts are views of a bigger tensor."""
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    b = 2 if M % 2 == 0 else 1
    if layout == "2d":
        return r(M, n_in)
    if layout == "3d":
        return r(b, M // b, n_in)
    if layout == "transposed":
        return r(n_in, M).t()
    if layout == "sliced":
        return r(M, 2 * n_in + 1)[:, 1::2]
    if layout == "3d_permuted":
        return r(M // b, b, n_in).transpose(0, 1)
    return r(b, M // b + 1, n_in + 3)[:, 1:, 2:-1]                        # 3d_sliced


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_case())
def test_lowrank_op_matches_float64_reference(case):
    dtype, M, n_in, n_out, k, k2, bias, layout, seed = case
    g = torch.Generator().manual_seed(seed)
    x = make_x(M, n_in, layout, g, dtype)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    V, U = r(n_in, k, scale=n_in ** -0.5), r(n_out, k, scale=(k + k2) ** -0.5)
    V2, U2 = (r(n_in, k2, scale=n_in ** -0.5), r(n_out, k2, scale=(k + k2) ** -0.5)) if k2 else (None, None)
    b = r(n_out) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    if layout == "sliced" and M > 1:
        assert not x.is_contiguous()
    event(f"x contiguous: {x.is_contiguous()}")
    y = lowrank_linear(x, cast(V), cast(U), cast(b), cast(V2), cast(U2))
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n_out)
    # reference: the same (rounded) inputs in float64
    up = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref = lowrank_linear_reference(up(x), up(V), up(U), up(b), up(V2), up(U2))
    # error bound scale: Σ|x||V||U| (+|b|), the magnitude that rounding errors are relative to
    A = lambda t: None if t is None else t.abs()  # noqa: E731
    bound = lowrank_linear_reference(A(up(x)), A(up(V)), A(up(U)), A(up(b)), A(up(V2)), A(up(U2)))
    # plus an underflow floor: a float16 result or x·V below the smallest normal number is rounded to the
    # subnormal grid (an absolute error, up to half its spacing, carried into y by Σ|U|), which no
    # relative bound covers; the floor is TOL · smallest normal ≈ 3 subnormal spacings per such rounding
    U_mass = A(up(U)).sum(1) + (0 if U2 is None else A(up(U2)).sum(1))
    bound = bound + torch.finfo(dtype).tiny * (1 + U_mass)
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    worst = float((err / bound).max())
    assert worst <= TOL[dtype], f"{dtype} {layout} M={M} in={n_in} out={n_out} k={k} k2={k2}: rel err {worst:.3g}"
