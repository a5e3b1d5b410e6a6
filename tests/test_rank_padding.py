"""Ranks the kernels cannot load with 16-byte rows are zero-padded at load (`LowRankLinear`).

Padding happens on the devices in `lrinfer.runtime.nn.PAD_DEVICE_TYPES` (CUDA); here CPU is added to it
so the same code runs on this machine.
"""
from __future__ import annotations

import pytest
import torch

import lrinfer
from lrinfer.runtime import nn as lnn
from lrinfer.factors import FactorPair, rank_for_ratio
from lrinfer.runtime.kernels import configs, lowrank_linear_reference


@pytest.fixture
def pad_on_cpu(monkeypatch):
    monkeypatch.setattr(lnn, "PAD_DEVICE_TYPES", {"cuda", "cpu"})


def _pair(i, o, k, k2, dtype=torch.float32):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return FactorPair(r(o, k), r(i, k), r(o, k2) if k2 else None, r(i, k2) if k2 else None)


def test_compress_default_rank_multiple_is_the_kernels_alignment():
    assert lrinfer.CompressConfig().rank_multiple == configs.RANK_ALIGN == 16
    assert rank_for_ratio(4096, 11008, 0.4, lrinfer.CompressConfig().rank_multiple) % 16 == 0


@pytest.mark.parametrize("k, k2", [(37, 0), (1784 // 8, 5), (48, 0), (24, 16)])
def test_padded_factors_exact(pad_on_cpu, k, k2):
    i, o = 40, 56
    pair = _pair(i, o, k, k2)
    m = lnn.LowRankLinear.from_factors(pair, torch.randn(o, dtype=torch.float64).float())
    # the parameters, rank and state dict keep k; the kernels get aligned views over zero columns
    assert (m.rank, m.rank2) == (k, k2)
    assert m.state_dict()["V"].shape == (i, k) and m.state_dict()["U"].shape == (o, k)
    for p, want in ((m.V, i), (m.U, o), (m.V2, i), (m.U2, o)):
        if p is None:
            continue
        wide = lnn.kernel_view(p)
        assert wide.shape == (want, configs.aligned_rank(p.shape[1]))
        assert torch.equal(wide[:, :p.shape[1]], p)
        assert not wide[:, p.shape[1]:].any(), "padding columns are zero"
    torch.testing.assert_close(m.factors().dense(), pair.dense())
    # the op on the padded views equals the unpadded math (float64 reference, fresh inputs)
    x = torch.randn(3, i)
    views = [lnn.kernel_view(t) for t in (m.V, m.U, m.V2, m.U2)]
    y = torch.ops.lrinfer.lowrank_linear(x, views[0], views[1], m.bias, views[2], views[3])
    ref = lowrank_linear_reference(x.double(), pair.V.double(), pair.U.double(), m.bias.double(),
                                   None if pair.V2 is None else pair.V2.double(),
                                   None if pair.U2 is None else pair.U2.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_padding_survives_to_and_load_state_dict(pad_on_cpu):
    pair = _pair(32, 24, 21, 3)
    m = lnn.LowRankLinear.from_factors(pair)
    m2 = m.to(torch.float64)  # a dtype move builds new storage: padded again
    assert lnn.kernel_view(m2.V).shape == (32, 32) and not lnn.kernel_view(m2.V)[:, 21:].any()
    fresh = lnn.LowRankLinear(32, 24, 21, 3, device="meta")
    fresh.load_state_dict({k: v.float().contiguous() for k, v in m2.state_dict().items()}, assign=True)
    assert lnn.kernel_view(fresh.U).shape == (24, 32)
    torch.testing.assert_close(fresh.dense_weight(), pair.dense())


def test_no_padding_off_the_pad_devices():
    m = lnn.LowRankLinear.from_factors(_pair(32, 24, 21, 0))
    assert lnn.kernel_view(m.V).shape == (32, 21)


def test_cpu_factors_are_k_major_wherever_lrinfer_lays_them_out(tmp_path):
    """On the CPU a factor is stored k-major (the transpose of a contiguous [k, rows]), same values, as
    built, copied into, converted, trained and loaded by `load_checkpoint`; an assigned parameter is kept
    as given (a memory-mapped file's view must not be copied). The state dict keeps [rows, k]."""
    pair = _pair(40, 56, 21, 5)
    m = lnn.LowRankLinear.from_factors(pair, torch.randn(56))
    copied = lnn.LowRankLinear(40, 56, 21, 5, bias=True)
    copied.load_state_dict({k: v.contiguous() for k, v in m.state_dict().items()})
    assigned = lnn.LowRankLinear(40, 56, 21, 5, bias=True, device="meta")
    assigned.load_state_dict({k: v.contiguous() for k, v in m.state_dict().items()}, assign=True)
    assert assigned.V.is_contiguous() and not lnn.is_k_major(assigned.V)
    for mod in (m, copied, m.to(torch.float64), assigned.to(torch.float64), lnn.LowRankLinear(40, 56, 21, 5)):
        for p in (mod.V, mod.U, mod.V2, mod.U2):
            assert lnn.is_k_major(p) and p.t().is_contiguous(), p.stride()
    for name, t in (("V", pair.V), ("U", pair.U), ("V2", pair.V2), ("U2", pair.U2)):
        assert torch.equal(getattr(copied, name), t) and copied.state_dict()[name].shape == t.shape
    x = torch.randn(3, 40, dtype=torch.float64)
    ref = lowrank_linear_reference(x, *(t.double() for t in (pair.V, pair.U, copied.bias, pair.V2, pair.U2)))
    torch.testing.assert_close(copied.double()(x), ref)
    # still a trainable parameter in that layout: one optimizer step keeps it k-major and changes it
    copied = copied.float()
    opt = torch.optim.Adam(copied.parameters(), lr=1e-2)
    copied(torch.randn(4, 40)).square().sum().backward()
    before = copied.V.detach().clone()
    opt.step()
    assert lnn.is_k_major(copied.V) and not torch.equal(copied.V, before)
    # a checkpoint written and loaded back: k-major, bit-exact values
    from ._tiny import tiny_checkpoint
    model, path, result = tiny_checkpoint(tmp_path / "ck")
    loaded, _ = lrinfer.load_checkpoint(path)
    for name in result.ranks:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert lnn.is_k_major(b.V) and lnn.is_k_major(b.U) and torch.equal(a.V, b.V) and torch.equal(a.U, b.U)


def test_loaded_factors_become_k_major_in_their_own_memory_unless_shared():
    """`k_major_factors_` rewrites each assigned row-major factor that alone owns its storage in that
    storage (no second copy), same values; a factor sharing its storage (V and V2 cut from one tensor,
    one parameter in two modules) is kept as given, since rewriting it would scramble the other."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    i, o, k, k2 = 40, 56, 21, 5
    own = {n: torch.randn(r, c, generator=g) for n, (r, c) in
           {"V": (i, k), "U": (o, k), "V2": (i, k2), "U2": (o, k2), "bias": (o, 1)}.items()}
    own["bias"] = own["bias"][:, 0].contiguous()
    a = lnn.LowRankLinear(i, o, k, k2, bias=True, device="meta")
    a.load_state_dict({n: t.clone() for n, t in own.items()}, assign=True)
    VV = torch.randn(i, k + k2, generator=g)   # V and V2 side by side in one storage
    b = lnn.LowRankLinear(i, o, k, k2, device="meta")
    b.load_state_dict({"V": VV[:, :k], "V2": VV[:, k:], "U": own["U"].clone(), "U2": own["U2"].clone()},
                      assign=True)
    c = lnn.LowRankLinear(i, o, k, device="meta")
    c.load_state_dict({"V": own["V"].clone(), "U": own["U"].clone()}, assign=True)
    d = lnn.LowRankLinear(i, o, k, device="meta")
    d.V, d.U = c.V, torch.nn.Parameter(own["U"].clone())   # c.V is d.V: two users
    model = torch.nn.ModuleDict({"a": a, "b": b, "c": c, "d": d})
    x = torch.randn(3, i, generator=g)
    before = {n: m(x) for n, m in model.items()}
    ptrs = {(n, f): getattr(m, f).data_ptr() for n, m in model.items() for f in ("V", "U")}
    assert lnn.k_major_factors_(model) == 4 + 2 + 1 + 1   # a: all four; b: U, U2; c and d: U (V shared)
    for f in ("V", "U", "V2", "U2"):
        assert lnn.is_k_major(getattr(a, f)) and torch.equal(getattr(a, f), own[f])
    assert all(getattr(m, f).data_ptr() == ptrs[n, f] for n, m in model.items() for f in ("V", "U"))  # in place
    assert b.V.stride() == b.V2.stride() == (k + k2, 1) and torch.equal(b.V, VV[:, :k]) and lnn.is_k_major(b.U)
    assert c.V is d.V and c.V.is_contiguous() and lnn.is_k_major(c.U) and lnn.is_k_major(d.U)
    for n, m in model.items():
        torch.testing.assert_close(m(x), before[n])
    assert lnn.k_major_factors_(model) == 0


def test_a_move_to_a_pad_device_makes_k_major_factors_row_major(monkeypatch):
    m = lnn.LowRankLinear.from_factors(_pair(32, 24, 16, 0))
    assert lnn.is_k_major(m.V) and not m.V.is_contiguous()
    monkeypatch.setattr(lnn, "PAD_DEVICE_TYPES", {"cuda", "cpu"})
    m = m.to(torch.float64)   # the kernels read rows along k: row-major again, aligned k not widened
    assert m.V.is_contiguous() and m.U.is_contiguous() and lnn.kernel_view(m.V).shape == (32, 16)


def test_a_slice_of_a_wider_tensor_is_padded_not_widened(pad_on_cpu):
    """V and V2 cut from one [in, k + k2] tensor with k + k2 = aligned(k): the strides look like
    padding, but the next columns hold V2. They must be copied into zero padding, never widened over."""
    i, o, k, k2 = 40, 56, 21, 11   # 21 + 11 = 32 = aligned(21)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    VV = torch.randn(i, k + k2, generator=g, dtype=torch.float64)
    UU = torch.randn(o, k + k2, generator=g, dtype=torch.float64)
    m = lnn.LowRankLinear(i, o, k, k2, dtype=torch.float64)
    for name, t in (("V", VV[:, :k]), ("U", UU[:, :k]), ("V2", VV[:, k:]), ("U2", UU[:, k:])):
        setattr(m, name, torch.nn.Parameter(t))
    views = [lnn.kernel_view(t) for t in (m.V, m.U, m.V2, m.U2)]
    assert not views[0][:, k:].any() and not views[1][:, k:].any()
    x = torch.randn(3, i, generator=g, dtype=torch.float64)
    y = torch.ops.lrinfer.lowrank_linear(x, *views[:2], None, *views[2:])
    torch.testing.assert_close(y, x @ VV @ UU.T)
