"""What lrinfer knows of a decoder-only model: its supported architectures, its decoder
blocks, and the linears that can be compressed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lrinfer.errors import LrinferError


# model_type values whose decoder blocks we have checked (attention q/k/v/o + gated MLP).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class LinearInfo:
    name: str          # qualified module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int         # decoder block index
    kind: str          # last name component, e.g. "q_proj"
    in_features: int
    out_features: int

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def check_architecture(model: nn.Module) -> str:
    """The model's `model_type`, or an error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise LrinferError(f"unsupported architecture '{model_type}'; supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return model_type


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's block list, found by structure: the longest ModuleList of same-class
    modules that contain linears (dense or already low-rank). Returns (qualified name, blocks)."""
    from .nn import LowRankLinear
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(b) for b in mod}) == 1 and any(isinstance(m, (nn.Linear, LowRankLinear))
                                                        for m in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise LrinferError(f"no decoder blocks found in {type(model).__name__}; supported architectures: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return best


def compressible_linears(model: nn.Module, modules: list[str] | None = None) -> list[LinearInfo]:
    """Every `nn.Linear` inside a decoder block, in forward order of blocks, optionally filtered by
    last name component (`modules=["q_proj", "down_proj"]`). lm_head and embeddings are never included."""
    prefix, blocks = decoder_blocks(model)
    found = []
    for i, block in enumerate(blocks):
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear):
                found.append(LinearInfo(f"{prefix}.{i}.{sub}", i, sub.rsplit(".", 1)[-1],
                                        m.in_features, m.out_features))
    if modules:
        kinds = sorted({f.kind for f in found})
        unknown = sorted(set(modules) - set(kinds))
        if unknown:
            raise LrinferError(f"unknown module name(s) {unknown}; this model's linears are: {', '.join(kinds)}")
        found = [f for f in found if f.kind in modules]
    return found
