"""Kernel-test fixtures.

Triton decides interpreter vs compiler when a kernel is *decorated* (`TRITON_INTERPRET` read at
`@triton.jit` time), and other tests may already have imported `lrinfer.runtime.kernels`. So the
`interp` fixture loads fresh copies of the kernel modules with TRITON_INTERPRET=1 set only
while they are being imported; the rest of the suite is unaffected.
"""
from __future__ import annotations

import importlib.util
import os
import types

import pytest
import torch

import lrinfer.runtime.kernels as K

HAS_CUDA = torch.cuda.is_available()


def _load_interpreted(name: str):
    path = os.path.join(os.path.dirname(K.__file__), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"lrinfer.runtime.kernels._interp_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def interp():
    """Namespace with interpreter builds of `fused_decode` (with `decode_kernels`) and `prefill` (CPU tensors)."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        # the launch layer of the interpreted copy launches the interpreted kernels
        fused_decode = _load_interpreted("fused_decode")
        fused_decode.kernels = _load_interpreted("decode_kernels")
        ns = types.SimpleNamespace(fused_decode=fused_decode, prefill=_load_interpreted("prefill"))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return ns
