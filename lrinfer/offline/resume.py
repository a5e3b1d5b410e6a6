"""Durable progress of a compression, so `--resume` continues after a crash or a kill.

After each decoder block, the work directory receives (each file written atomically):
  block_NNNN.safetensors   that block's factors (in the model's dtype)
  streams_NNNN.safetensors both activation streams entering the next block, in the model's dtype
                           (one copy while the two streams are still the same tensors)
  state.json               {fingerprint, next_block, ranks, hidden_error, streams file, bytes written}, last
A kill between writes leaves state.json pointing at the previous, complete block, which is redone.
The previous block's streams file is deleted once the new state is durable, so the directory holds
every finished block's factors (the compressed linears, which a streamed compression also writes its
checkpoint from) plus one streams file (two for a moment).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lrinfer.errors import LrinferError
from lrinfer.factors import FactorPair, flatten_factors, unflatten_factors
from lrinfer.runtime.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)
STATE = "state.json"


def fingerprint(config: dict, calib_ids: torch.Tensor, linears) -> str:
    """Identifies a compression run: its config, calibration tokens, and the model's linear shapes."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(calib_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps([(f.name, f.in_features, f.out_features) for f in linears]).encode())
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Progress:
    next_block: int
    ranks: dict[str, int]
    hidden_error: list[float]
    factors: dict[str, FactorPair]          # every finished block's factors ({} unless asked for)
    dense: list[torch.Tensor]               # activation streams entering `next_block`
    compressed: list[torch.Tensor]          # the same list object as `dense` while the streams agree
    factor_ranks: dict[str, list[int]]      # finished linears -> [rank, residual rank] (from file headers)
    bytes_written: list[int]                # per finished block: bytes its factor and streams files took


def factor_ranks(files) -> dict[str, list[int]]:
    """{linear name: [rank, rank2]} from the headers of block factor files (no tensor data read)."""
    from lrinfer.runtime.streaming import read_header
    out: dict[str, list[int]] = {}
    for f in files:
        for k, info in read_header(f).items():
            base, _, part = k.rpartition(".")
            if part in ("U", "U2"):
                ranks = out.setdefault(base, [0, 0])
                ranks[part == "U2"] = int(info["shape"][1])
    return out


class WorkDir:
    """The on-disk progress of one compression run."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self, factors: bool = True) -> Progress | None:
        """The saved progress, or None when there is none. Refuses progress of a different run.
        factors=False leaves the finished factors on disk (a streamed compression reads them at the end)."""
        state_file = self.path / STATE
        if not state_file.is_file():
            return None
        from safetensors.torch import load_file
        try:
            state = json.loads(state_file.read_text())
            if state["fingerprint"] != self.fingerprint:
                raise LrinferError(f"{self.path} holds progress of a different compression (model, config or "
                                   "calibration differ); run without --resume to start over")
            found: dict[str, FactorPair] = {}
            block_files = [f for f in (self.path / f"block_{i:04d}.safetensors" for i in range(state["next_block"]))
                           if f.is_file()]            # a block with nothing to compress has none
            for block_file in block_files if factors else []:
                found.update(unflatten_factors(load_file(str(block_file))))
            ranks = factor_ranks(block_files)
            streams = load_file(str(self.path / state["streams"]))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise LrinferError(f"{self.path}: the saved progress is unreadable ({type(e).__name__}: {e}); "
                               "run without --resume to start over") from None
        n = state["batches"]
        log.info("resuming at block %d from %s", state["next_block"], self.path)
        dense = [streams[f"dense.{b}"] for b in range(n)]
        compressed = dense if state.get("same") else [streams[f"compressed.{b}"] for b in range(n)]
        return Progress(state["next_block"], state["ranks"], state["hidden_error"], found, dense, compressed,
                        ranks, state.get("bytes_written", []))

    def start(self) -> None:
        """Begin afresh: drop any earlier progress."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def save_block(self, block: int, factors: dict[str, FactorPair], ranks: dict[str, int],
                   hidden_error: list[float], dense: list[torch.Tensor], compressed: list[torch.Tensor],
                   bytes_written: list[int] | None = None) -> int:
        """Record that `block` is done: its factors, then the streams after it, then the state (which
        carries `bytes_written` of the earlier blocks plus this one's). Returns this block's bytes."""
        written = 0
        if factors:
            block_file = self.path / f"block_{block:04d}.safetensors"
            save_tensors(flatten_factors(factors), block_file)
            written += block_file.stat().st_size
        streams_file = self.path / f"streams_{block + 1:04d}.safetensors"
        same = all(c is d for c, d in zip(compressed, dense))
        tensors = {f"dense.{b}": t for b, t in enumerate(dense)}
        if not same:
            tensors.update({f"compressed.{b}": t for b, t in enumerate(compressed)})
        save_tensors(tensors, streams_file)
        written += streams_file.stat().st_size
        state = {"fingerprint": self.fingerprint, "next_block": block + 1, "ranks": ranks,
                 "hidden_error": hidden_error, "streams": streams_file.name, "batches": len(dense), "same": same,
                 "bytes_written": list(bytes_written or []) + [written]}
        atomic_write_bytes(self.path / STATE, json.dumps(state).encode())
        for old in self.path.glob("streams_*.safetensors"):
            if old.name != streams_file.name:
                old.unlink(missing_ok=True)
        return written

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
