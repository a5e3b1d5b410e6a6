"""Running a decoder block alone: capture each block's call (args, masks, position
embeddings) once, then run any block on recorded hidden states, on any device."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BlockCall:
    """How the model called one block: positional args after the hidden state, and kwargs."""
    args: tuple
    kwargs: dict


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class TwoStreams:
    """Per-batch hidden states entering the current block: `dense` (X) and `compressed` (X̂)."""
    dense: list[torch.Tensor]
    compressed: list[torch.Tensor]
    calls: list[list[BlockCall]] = field(default_factory=list)   # [block][batch]


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                   device: torch.device) -> TwoStreams:
    """Run the model with every block replaced by a pass-through that records its call.

    input_ids [N, T] -> streams with dense == compressed == embeddings, batches of `batch_size`,
    and each block's exact arguments (masks and position embeddings can differ per block).
    """
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    first: list[torch.Tensor] = []
    saved = []

    def passthrough(i):
        def forward(hidden_states, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            calls[i].append(BlockCall(args, kwargs))
            if i == 0:
                first.append(hidden_states)
            return hidden_states
        return forward

    for i, block in enumerate(blocks):
        saved.append(block.forward)
        block.forward = passthrough(i)
    base = getattr(model, model.base_model_prefix, model)
    try:
        for ids in input_ids.split(batch_size):
            base(input_ids=ids.to(device), use_cache=False)
    finally:
        for block, fwd in zip(blocks, saved):
            block.forward = fwd
    return TwoStreams(first, list(first), calls)


def to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None or t.device == device else t.to(device, non_blocking=True)


def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall],
              device: torch.device | None = None) -> list[torch.Tensor]:
    """The block's outputs for each batch. With `device`, each batch runs there and its output goes
    back to where its input was (streams kept on the host, block on the accelerator)."""
    return [to_device(first_tensor(block(to_device(h, device), *c.args, **c.kwargs)), h.device) for h, c in zip(hidden, calls)]
