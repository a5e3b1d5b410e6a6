"""Kernel configurations as data: defaults keyed by M bucket, overridden by per-GPU JSON.

A config is a flat dict:

    method      "fused"       one persistent launch (shrink, grid barrier, expand); CUDA only;
                              grid <= SMs x occupancy, cooperative launch where Triton has it
                "two_launch"  shrink kernel then expand kernel
                "two_launch_pdl"  the same two kernels, the expand one launched with programmatic
                              dependent launch (SM90+; plain two_launch where unsupported)
                "triton"      tiled tensor-core matmuls (prefill)
                "torch"       two cuBLAS matmuls through torch
    decode keys (fused / two_launch / two_launch_pdl):
                BLOCK_M, BLOCK_IN, BLOCK_K (shrink tile), BLOCK_N, BLOCK_R (expand tile), num_warps,
                num_stages (software-pipeline depth of both phases' loads), PREFETCH_U (fused: load
                the first U tile before the grid barrier, 1/0)
    prefill keys (triton):
                PM, PN, PK, GROUP_M, p_warps, p_stages

Per-GPU files live in `configs/<gpu-slug>.json` (written offline by `bench/tune_kernels.py`):

    {"gpu": "NVIDIA H100 80GB HBM3",
     "buckets": {"1": {"method": "fused", "BLOCK_N": 32}, ...},
     "shapes":  {"4096x4096x1224": {"1": {...}}}}       # key: in x out x total rank

Lookup: shape-specific table, then the GPU table, then DEFAULTS; within each table the nearest
M bucket in log2 distance (ties go to the larger bucket). Entries are merged over DEFAULTS.
`LRINFER_KERNEL_CONFIG=/path.json` replaces the per-GPU file (used by the tuner).
Nothing here autotunes; lookups are cached and never touch the device.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")

# Ranks the decode/prefill kernels read with 16-byte rows and cp.async: the row stride AND the
# masked bound must be multiples of 16 elements (k ≡ 8 mod 16 compiles to 2-byte scalar loads).
# `CompressConfig.rank_multiple` defaults to it; `LowRankLinear` pads other ranks with zero columns.
RANK_ALIGN = 16


def aligned_rank(k: int) -> int:
    """k rounded up to RANK_ALIGN: the rank the kernels get after padding at load."""
    return -(-k // RANK_ALIGN) * RANK_ALIGN

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)

_DECODE = dict(BLOCK_M=16, BLOCK_IN=128, BLOCK_K=64, BLOCK_N=32, BLOCK_R=128, num_warps=4, num_stages=3,
               PREFETCH_U=1)
_PREFILL = dict(PM=128, PN=128, PK=64, GROUP_M=8, p_warps=8, p_stages=3)


def _entry(method, **over):
    cfg = {"method": method, **_DECODE, **_PREFILL}
    cfg.update(over)
    return cfg


# Untuned starting points (no GPU measurement yet): fused for decode, cuBLAS for large M.
DEFAULTS: dict[int, dict] = {
    1: _entry("fused"),
    2: _entry("fused"),
    4: _entry("fused"),
    8: _entry("fused"),
    16: _entry("fused"),
    32: _entry("fused", BLOCK_M=32),
    64: _entry("torch", BLOCK_M=64, BLOCK_IN=64),
    128: _entry("torch"),
    256: _entry("torch"),
    512: _entry("torch"),
    2048: _entry("torch"),
    8192: _entry("torch"),
}

METHODS = ("fused", "two_launch", "two_launch_pdl", "triton", "torch")


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _nearest(table: dict, m: int):
    """Value of the key nearest to m in log2 distance (ties: larger key); None if empty."""
    if not table:
        return None
    lm = math.log2(max(m, 1))
    key = min(table, key=lambda k: (abs(math.log2(int(k)) - lm), -int(k)))
    return table[key]


@functools.lru_cache(maxsize=None)
def load_gpu_table(slug: str) -> dict:
    """Parsed JSON for a GPU slug ({} when there is none)."""
    env = os.environ.get("LRINFER_KERNEL_CONFIG")
    path = Path(env) if env else CONFIG_DIR / f"{slug}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        data = json.load(f)
    for sect in ("buckets",):
        data[sect] = {int(k): v for k, v in data.get(sect, {}).items()}
    data["shapes"] = {s: {int(k): v for k, v in t.items()} for s, t in data.get("shapes", {}).items()}
    return data


@functools.lru_cache(maxsize=4096)
def get_config(m: int, in_features: int, out_features: int, rank: int, slug: str = "") -> dict:
    """Config dict for M rows of a [in -> out] low-rank layer of total rank `rank` on GPU `slug`."""
    cfg = dict(_nearest(DEFAULTS, m))
    table = load_gpu_table(slug) if slug else {}
    shape_tab = table.get("shapes", {}).get(f"{in_features}x{out_features}x{rank}")
    for tab in (table.get("buckets"), shape_tab):
        over = _nearest(tab or {}, m)
        if over:
            cfg.update(over)
    if cfg["method"] not in METHODS:
        raise ValueError(f"lowrank_linear config: unknown method {cfg['method']!r}; expected one of {METHODS}")
    return cfg


@functools.lru_cache(maxsize=None)
def device_slug(index: int) -> str:
    import torch

    return gpu_slug(torch.cuda.get_device_name(index))


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count
