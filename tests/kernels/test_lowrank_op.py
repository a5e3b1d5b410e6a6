"""The `lrinfer::lowrank_linear` op on CPU: validation, opcheck, autograd, torch.compile, configs."""
from __future__ import annotations

import json

import pytest
import torch

import lrinfer.runtime.kernels as K
from lrinfer.runtime.kernels import configs

from ._util import assert_close, make_case, ref64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k2", [0, 6])
def test_cpu_path_matches_reference(dtype, k2):
    x, V, U, b, V2, U2 = make_case(5, 40, 30, 11, k2, dtype if dtype != torch.float64 else torch.float32)
    x, V, U, b = (t.to(dtype) for t in (x, V, U, b))
    V2, U2 = (None, None) if not k2 else (V2.to(dtype), U2.to(dtype))
    y = K.lowrank_linear(x, V, U, b, V2, U2)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref64(x, V, U, b, V2, U2))
    else:
        assert_close(y, ref64(x, V, U, b, V2, U2), dtype if dtype != torch.bfloat16 else torch.bfloat16)


def test_3d_and_noncontiguous_x():
    x, V, U, b, _, _ = make_case(1, 24, 10, 7)
    x3 = torch.randn(2, 5, 48)[:, :, ::2]
    y = K.lowrank_linear(x3, V, U, b)
    assert y.shape == (2, 5, 10)
    torch.testing.assert_close(y, K.lowrank_linear_reference(x3, V, U, b))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(U=a["U"][:, :-1]), "V has 7 columns but U has 6"),
        (lambda a: a.update(x=a["x"][:, :-1]), "x has 23 features but V has 24 rows"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias has shape"),
        (lambda a: a.update(V2=torch.randn(24, 3)), "both V2 and U2"),
        (lambda a: a.update(V2=torch.randn(24, 3), U2=torch.randn(10, 4)), "V2 has 3 columns but U2 has 4"),
        (lambda a: a.update(V2=torch.randn(20, 3), U2=torch.randn(10, 3)), "V2 has 20 rows"),
        (lambda a: a.update(U=a["U"].double()), "U has dtype torch.float64 but x has torch.float32"),
        (lambda a: a.update(V=torch.randn(24, 7, 1)), "V must be 2-D"),
    ],
)
def test_validation_errors(mutate, match):
    x, V, U, b, _, _ = make_case(3, 24, 10, 7)
    args = dict(x=x, V=V, U=U, bias=b)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        K.lowrank_linear(**args)


@pytest.mark.parametrize("k2", [0, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(k2, bias):
    x, V, U, b, V2, U2 = make_case(6, 16, 12, 5, k2, torch.float64, bias)
    for t in (x, V, U, b, V2, U2):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.lrinfer.lowrank_linear.default, (x.view(2, 3, 16), V, U, b, V2, U2))


def test_gradcheck():
    x, V, U, b, V2, U2 = make_case(4, 9, 7, 3, 2, torch.float64, True)
    args = [t.requires_grad_(True) for t in (x, V, U, b, V2, U2)]
    assert torch.autograd.gradcheck(lambda *a: K.lowrank_linear(*a), args)


def test_torch_compile_fullgraph():
    x, V, U, b, V2, U2 = make_case(3, 32, 20, 8, 4)

    def f(x, V, U, b, V2, U2):
        return torch.relu(K.lowrank_linear(x, V, U, b, V2, U2)) * 2

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, V, U, b, V2, U2), f(x, V, U, b, V2, U2))
    x5 = torch.randn(2, 5, 32)
    torch.testing.assert_close(cf(x5, V, U, b, V2, U2), f(x5, V, U, b, V2, U2))


# ----------------------------------------------------------------------------- configs


def test_config_nearest_bucket():
    assert configs.get_config(1, 64, 64, 8)["method"] == configs.DEFAULTS[1]["method"]
    assert configs.get_config(3, 64, 64, 8) == configs.get_config(4, 64, 64, 8)  # tie -> larger bucket
    assert configs.get_config(100000, 64, 64, 8) == configs.DEFAULTS[8192]
    assert configs.get_config(40, 64, 64, 8) == configs.DEFAULTS[32]


def test_config_json_override(tmp_path, monkeypatch):
    data = {
        "gpu": "Fake GPU",
        "buckets": {"1": {"method": "two_launch", "BLOCK_N": 64}, "512": {"method": "triton"}},
        "shapes": {"64x32x8": {"1": {"BLOCK_K": 128}}},
    }
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("LRINFER_KERNEL_CONFIG", str(path))
    configs.load_gpu_table.cache_clear()
    configs.get_config.cache_clear()
    try:
        c = configs.get_config(1, 64, 64, 8, "fake-gpu")
        assert (c["method"], c["BLOCK_N"], c["BLOCK_K"]) == ("two_launch", 64, configs.DEFAULTS[1]["BLOCK_K"])
        c = configs.get_config(2, 64, 32, 8, "fake-gpu")  # shape-specific entry, nearest bucket 1
        assert (c["method"], c["BLOCK_K"]) == ("two_launch", 128)
        assert configs.get_config(2048, 64, 64, 8, "fake-gpu")["method"] == "triton"  # nearest: 512
        assert configs.get_config(2048, 64, 64, 8)["method"] == configs.DEFAULTS[2048]["method"]  # no GPU table
    finally:
        monkeypatch.delenv("LRINFER_KERNEL_CONFIG")
        configs.load_gpu_table.cache_clear()
        configs.get_config.cache_clear()


def test_gpu_slug():
    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
