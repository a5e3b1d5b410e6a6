"""A static ESTIMATE of kernel time from the compiled code (no GPU): bytes moved, bytes in flight
per SM, predicted µs at H100 / H200 bandwidth, beside dense. Only a GPU measurement confirms it.

Model (memory-bound decode; Little's law). A phase of W work items on a grid of G programs runs
in ceil(W / G) rounds; a round with A active programs moves its bytes B at the rate
min(BW, A · F / L), where F is the bytes one program keeps in flight and L the loaded memory
latency, and costs L + B / rate. F = (num_stages − 1) tiles when the compiled kernel streams its
weights with cp.async/TMA (software pipelined), one tile when it does not (scalar or register
loads: no pipelining). Fixed costs: the fused kernel's grid barrier and its finishing atomics;
the two-launch forms' launch gap (shorter with programmatic dependent launch). The fused
kernel's prefetched first U tiles move during the barrier. Dense = in · out · element bytes at
the same bandwidth, with no latency or launch cost (optimistic for dense).

Prefill ("triton"): max(bytes / BW, FLOPs / tensor-core peak) per GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

LATENCY_S = 700e-9            # loaded HBM latency (H100/H200 class)
BARRIER_S = 1.0e-6            # grid barrier: release add, acquire spin, skew
FINISH_S = 0.5e-6             # finishing arrival atomics
LAUNCH_GAP_S = {"two_launch": 2.5e-6, "two_launch_pdl": 1.0e-6}
LABEL = "ESTIMATE (static model from the compiled code, not a measurement)"


@dataclass(frozen=True)
class GPUModel:
    name: str
    bandwidth: float          # bytes/s
    sms: int
    tc_flops: float           # dense bf16/fp16 tensor-core FLOP/s

    def needed_in_flight_per_sm(self) -> float:
        """Bytes each SM must keep in flight to reach full bandwidth (BW × latency / SMs)."""
        return self.bandwidth * LATENCY_S / self.sms


GPUS = {"h100": GPUModel("H100 SXM (3.35 TB/s HBM3, 132 SMs)", 3.35e12, 132, 989e12),
        "h200": GPUModel("H200 (4.8 TB/s HBM3e, 132 SMs)", 4.8e12, 132, 989e12)}


def _rounds_time(items: int, grid: int, item_bytes: float, in_flight: float, gpu: GPUModel) -> float:
    t, left = 0.0, items
    while left > 0:
        active = min(left, grid)
        rate = min(gpu.bandwidth, active * in_flight / LATENCY_S)
        t += LATENCY_S + active * item_bytes / rate
        left -= active
    return t


def _pipelined(k) -> bool:
    """Weights streamed with cp.async / TMA and never with 1-2 byte scalar loads."""
    s = k.sass
    return (s["cp_async_all"] > 0 or s["tma"] > 0) and s["ldg_scalar"] == 0


def _decode(insp, gpu: GPUModel) -> dict:
    c, sh = insp.config, insp.shape
    e = 4 if insp.dtype == "float32" else 2
    IN, OUT, K1, K2, M = sh["in"], sh["out"], sh["k"], sh["k2"], sh["m"]
    KT = K1 + K2
    BM, BIN, BK, BN, BR = (c[n] for n in ("BLOCK_M", "BLOCK_IN", "BLOCK_K", "BLOCK_N", "BLOCK_R"))
    stages = c.get("num_stages", 3)
    fused = insp.method == "fused"
    k1, k2 = (insp.kernels[0], insp.kernels[0]) if fused else insp.kernels
    m_tiles = -(-M // BM)
    n_in_blocks = -(-IN // BIN)
    n_k_tiles = -(-K1 // BK) + -(-K2 // BK)
    programs = k1.grid if fused else k1.grid  # phase-1 split target (fused: its grid)
    n_splits = max(1, min(n_in_blocks, programs // (m_tiles * n_k_tiles))) if fused else None
    if not fused:  # the shrink grid is its item count
        n_splits = max(1, k1.grid // (m_tiles * n_k_tiles))
    bps = -(-n_in_blocks // n_splits)
    n_splits = -(-n_in_blocks // bps)
    items1 = m_tiles * n_k_tiles * n_splits
    items2 = m_tiles * -(-OUT // BN)

    v_bytes, u_bytes = IN * KT * e, OUT * KT * e
    io_bytes = M * (IN + OUT) * e + 2 * m_tiles * BM * KT * 4  # x, y, workspace zeroing + t
    moved = v_bytes + u_bytes + io_bytes

    v_tile, u_tile = BIN * BK * e, BR * BN * e
    f1 = v_tile * (min(stages - 1, bps) if _pipelined(k1) and stages > 1 else 1)
    f2 = u_tile * (stages - 1 if _pipelined(k2) and stages > 1 else 1)
    g1 = k1.grid
    g2 = k2.grid
    t1 = _rounds_time(items1, g1, v_bytes * m_tiles / items1, f1, gpu)
    t2 = _rounds_time(items2, g2, u_bytes * m_tiles / items2, f2, gpu)
    if fused:
        sync = BARRIER_S + FINISH_S
        if c.get("PREFETCH_U", 1):  # first U tiles of every program move during the barrier
            sync -= min(BARRIER_S, min(g1, items2) * u_tile / gpu.bandwidth)
    else:
        sync = LAUNCH_GAP_S[insp.method] + FINISH_S
    total = t1 + sync + t2

    def per_sm(grid, items, occ, f):
        return min(occ, -(-min(grid, items) // gpu.sms)) * f

    return {"bytes_moved": moved, "weight_bytes": v_bytes + u_bytes,
            "in_flight_per_sm": {"shrink": per_sm(g1, items1, k1.occupancy, f1),
                                 "expand": per_sm(g2, items2, k2.occupancy, f2)},
            "phase_us": {"shrink": t1 * 1e6, "sync": sync * 1e6, "expand": t2 * 1e6}, "us": total * 1e6}


def _prefill(insp, gpu: GPUModel) -> dict:
    sh = insp.shape
    e = 4 if insp.dtype == "float32" else 2
    IN, OUT, KT, M = sh["in"], sh["out"], sh["k"] + sh["k2"], sh["m"]
    gemms = [(M, KT, IN), (M, OUT, KT)]  # (rows, cols, inner)
    t = moved = 0.0
    for m, n, kk in gemms:
        b = (m * kk + kk * n + m * n) * e
        moved += b
        t += max(b / gpu.bandwidth, 2 * m * n * kk / gpu.tc_flops) + LATENCY_S
    return {"bytes_moved": moved, "weight_bytes": (IN + OUT) * KT * e, "in_flight_per_sm": None,
            "phase_us": None, "us": t * 1e6}


def estimate_inspection(insp, gpus=("h100", "h200")) -> dict:
    """{"label": LABEL, gpu: {bytes_moved, in_flight_per_sm, needed_in_flight_per_sm, us, dense_us,
    speedup_vs_dense}} for an `inspect.Inspection`."""
    out = {"label": LABEL, "latency_ns": LATENCY_S * 1e9}
    sh = insp.shape
    e = 4 if insp.dtype == "float32" else 2
    for g in gpus:
        gpu = GPUS[g]
        est = _prefill(insp, gpu) if insp.method == "triton" else _decode(insp, gpu)
        dense_bytes = sh["in"] * sh["out"] * e
        dense = (max(dense_bytes / gpu.bandwidth, 2 * sh["m"] * sh["in"] * sh["out"] / gpu.tc_flops)) * 1e6
        out[g] = {**est, "gpu": gpu.name, "needed_in_flight_per_sm": gpu.needed_in_flight_per_sm(),
                  "dense_bytes": dense_bytes, "dense_us": dense, "speedup_vs_dense": dense / est["us"]}
    return out


CALL_OVERHEAD_S = 3.0e-6      # one op call from Python (dispatch, launch of its first kernel)


def estimate_grouped(insp, singles, gpus=("h100", "h200")) -> dict:
    """ESTIMATE of the grouped op (one shrink over Σk, one expand over every shard) beside S separate
    calls (`singles`: the per-shard two-launch inspections) plus torch.cat of their outputs.

    Grouped: the decode model above for the shrink (KT = Σk) and the launch gap; the expand moves
    Σ out_i·k_i weights over Σ ceil(out_i / BLOCK_N) items per m tile; one call overhead.
    Separate: Σ over shards of (model + call overhead), plus the cat (reads and writes
    M · Σ out_i elements) and its launch gap."""
    from types import SimpleNamespace

    e = 4 if insp.dtype == "float32" else 2
    method = "two_launch_pdl" if insp.arch >= 90 else "two_launch"
    as_two = SimpleNamespace(config=insp.config, shape=insp.shape, dtype=insp.dtype, method=method,
                             kernels=insp.kernels[:2])
    out = {"label": LABEL + "; grouped vs S separate calls + torch.cat", "latency_ns": LATENCY_S * 1e9}
    M, n_out = insp.shape["m"], insp.shape["out"]
    for g in gpus:
        gpu = GPUS[g]
        d = _decode(as_two, gpu)
        c, groups = insp.config, insp.shape["groups"]
        m_tiles = -(-M // c["BLOCK_M"])
        items2 = m_tiles * sum(-(-o // c["BLOCK_N"]) for o, _ in groups)
        u_bytes = sum(o * kk for o, kk in groups) * e
        ex = insp.kernels[1]
        f2 = c["BLOCK_R"] * c["BLOCK_N"] * e * (c.get("num_stages", 3) - 1 if _pipelined(ex) and
                                                c.get("num_stages", 3) > 1 else 1)
        t2 = _rounds_time(items2, ex.grid, u_bytes * m_tiles / items2, f2, gpu) * 1e6
        grouped = d["phase_us"]["shrink"] + d["phase_us"]["sync"] + t2 + CALL_OVERHEAD_S * 1e6
        separate = sum(_decode(s, gpu)["us"] + CALL_OVERHEAD_S * 1e6 for s in singles)
        cat = 2 * M * n_out * e / gpu.bandwidth * 1e6 + LAUNCH_GAP_S["two_launch"] * 1e6
        out[g] = {"gpu": gpu.name, "us": grouped, "phase_us": {**d["phase_us"], "expand": t2}, "separate_us": separate + cat, "cat_us": cat,
                  "saving_us": separate + cat - grouped, "speedup_vs_separate": (separate + cat) / grouped}
    return out
