"""Durable progress of a compression, so `--resume` continues after a crash or a kill.

After each decoder block, the work directory receives (each file written atomically):
  block_NNNN.safetensors   that block's factors
  streams_NNNN.safetensors both activation streams entering the next block
  state.json               {fingerprint, next_block, ranks, hidden_error, streams file}, written last
A kill between writes leaves state.json pointing at the previous, complete block, which is redone.
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

from .checkpoint import atomic_write_bytes
from .errors import LrinferError
from .factors import FactorPair, flatten_factors, unflatten_factors

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
    factors: dict[str, FactorPair]          # every finished block's factors
    dense: list[torch.Tensor]               # activation streams entering `next_block`
    compressed: list[torch.Tensor]


class WorkDir:
    """The on-disk progress of one compression run."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self) -> Progress | None:
        """The saved progress, or None when there is none. Refuses progress of a different run."""
        state_file = self.path / STATE
        if not state_file.is_file():
            return None
        from safetensors.torch import load_file
        try:
            state = json.loads(state_file.read_text())
            if state["fingerprint"] != self.fingerprint:
                raise LrinferError(f"{self.path} holds progress of a different compression (model, config or "
                                   "calibration differ); run without --resume to start over")
            factors: dict[str, FactorPair] = {}
            for i in range(state["next_block"]):
                block_file = self.path / f"block_{i:04d}.safetensors"
                if not block_file.is_file():
                    continue        # a block with nothing to compress
                factors.update(unflatten_factors(load_file(str(block_file))))
            streams = load_file(str(self.path / state["streams"]))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise LrinferError(f"{self.path}: the saved progress is unreadable ({type(e).__name__}: {e}); "
                               "run without --resume to start over") from None
        n = state["batches"]
        log.info("resuming at block %d from %s", state["next_block"], self.path)
        return Progress(state["next_block"], state["ranks"], state["hidden_error"], factors,
                        [streams[f"dense.{b}"] for b in range(n)], [streams[f"compressed.{b}"] for b in range(n)])

    def start(self) -> None:
        """Begin afresh: drop any earlier progress."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def save_block(self, block: int, factors: dict[str, FactorPair], ranks: dict[str, int],
                   hidden_error: list[float], dense: list[torch.Tensor], compressed: list[torch.Tensor]) -> None:
        """Record that `block` is done: its factors, then the streams after it, then the state."""
        if factors:
            save_tensors(flatten_factors(factors), self.path / f"block_{block:04d}.safetensors")
        streams_file = f"streams_{block + 1:04d}.safetensors"
        same = all(c is d for c, d in zip(compressed, dense))
        tensors = {f"dense.{b}": t for b, t in enumerate(dense)}
        tensors.update({f"compressed.{b}": (t.clone() if same else t) for b, t in enumerate(compressed)})
        save_tensors(tensors, self.path / streams_file)
        state = {"fingerprint": self.fingerprint, "next_block": block + 1, "ranks": ranks,
                 "hidden_error": hidden_error, "streams": streams_file, "batches": len(dense)}
        atomic_write_bytes(self.path / STATE, json.dumps(state).encode())
        for old in self.path.glob("streams_*.safetensors"):
            if old.name != streams_file:
                old.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
