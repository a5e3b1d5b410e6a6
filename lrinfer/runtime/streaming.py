"""Block streaming: compress a model whose weights never sit in memory all at once.

A local Hugging Face directory of safetensors files is built on the `meta` device; the embeddings,
the final norm and the head (every tensor outside the decoder blocks) load once onto the compute
device, and each decoder block's weights are read from the shards only while that block is
calibrated and solved (`BlockStreamer.load_block` / `release_block`). The solved factors go to the
work directory (`lrinfer.offline.resume.WorkDir`), never to host memory, and the final checkpoint is written
tensor by tensor (`save_streamed_checkpoint`): dense tensors from the source shards, factors from the
work directory. Perplexity runs block by block too (`lrinfer.evaluation.perplexity`), over the source or over
the written checkpoint. So host and device memory stay flat in depth: one block, the embeddings and
head, the two activation streams and one block's statistics.

Sources that must be materialized (GGUF files, hub ids without a local copy, lrinfer checkpoints,
directories whose tensor names do not match the model's) keep the in-memory path (`models.load_model`).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from lrinfer.errors import LrinferError

log = logging.getLogger(__name__)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# --------------------------------------------------------------------------- safetensors files

def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}
    (reads only the header, not the data)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LrinferError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise LrinferError(f"{path}: not a safetensors file (header length {n})")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LrinferError(f"{path}: not a safetensors file ({e})") from None


class SafetensorsFiles:
    """Which file holds each tensor of a set of safetensors files, with its dtype and shape; reads
    single tensors on demand (each read opens the file, copies the tensor and closes it again)."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
        for path in files:
            path = Path(path)
            for name, info in read_header(path).items():
                if name == "__metadata__":
                    continue
                self.where[name] = path
                self.meta[name] = (_ST_DTYPES.get(info["dtype"]), tuple(info["shape"]))

    @classmethod
    def of_dir(cls, path: str | os.PathLike) -> "SafetensorsFiles":
        """The safetensors files of a Hugging Face directory (`model.safetensors` or the shards named by
        `model.safetensors.index.json`)."""
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls(path / n for n in names)
        return cls(sorted(path.glob("*.safetensors")))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Iterable[str], device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: tensor} on `device`, floating tensors cast to `dtype` when given. Files are opened once each."""
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise LrinferError(f"tensor {n} is in none of the safetensors files")
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        device = torch.device(device)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for n in group:
                    t = f.get_tensor(n)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[n] = t.to(device) if device.type != "cpu" else t
        return out


def streamable_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a local Hugging Face directory whose weights are safetensors files (and not an
    lrinfer checkpoint or a quantized model), i.e. a source that `load_streamed` can stream."""
    from .checkpoint import is_checkpoint
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()) or is_checkpoint(path):
        return False
    if not ((path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and not config.get("quantization_config")


# --------------------------------------------------------------------------- the streamed model

def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """module.<name> = value, as a Parameter when it was one (requires_grad kept) or as a buffer."""
    mod_name, _, attr = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def _to_meta(module: nn.Module) -> None:
    """Every parameter of `module` (and its persistent buffers) back to the meta device: frees them."""
    for mod in module.modules():
        for k, p in mod._parameters.items():
            if p is not None and p.device.type != "meta":
                mod._parameters[k] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for k, b in mod._buffers.items():
            if b is not None and b.device.type != "meta" and k not in mod._non_persistent_buffers_set:
                mod._buffers[k] = b.to("meta")


class BlockStreamer:
    """Loads one decoder block of a meta-built `model` at a time from safetensors files.

    `files` holds the tensors under the model's own state-dict names (a Hugging Face directory, or an
    lrinfer checkpoint's `model.safetensors` for a skeleton patched with `LowRankLinear`s). Everything
    outside the blocks is loaded at construction (`load_rest`); `load_block(i)` materializes block i on
    `device` in `dtype`, `release_block(i)` frees it again. `InMemoryBlocks` is the same interface for a
    model held whole (`block_source` picks).
    """
    streamed = True

    def __init__(self, model: nn.Module, files: SafetensorsFiles, device: torch.device | str,
                 dtype: torch.dtype):
        from .architecture import decoder_blocks
        self.model, self.files = model, files
        self.device, self.dtype = torch.device(device), dtype
        self.prefix, self.blocks = decoder_blocks(model)

    @staticmethod
    def _keys(module: nn.Module) -> list[str]:
        """State-dict names (relative to `module`) of its tensors, tied duplicates once."""
        seen, keys = set(), []
        for k, v in module.state_dict(keep_vars=True).items():
            if id(v) not in seen:
                seen.add(id(v))
                keys.append(k)
        return keys

    def block_keys(self, i: int) -> dict[str, str]:
        """{name in block i: name in the files} for block i's tensors."""
        return {k: f"{self.prefix}.{i}.{k}" for k in self._keys(self.blocks[i])}

    def load_rest(self) -> None:
        """Load every tensor outside the decoder blocks (embeddings, final norm, head) onto the device,
        move computed buffers (rotary frequencies) there, and tie the embeddings when the model does."""
        block_prefix = f"{self.prefix}."
        wanted = [k for k, v in self.model.state_dict(keep_vars=True).items()
                  if not k.startswith(block_prefix) and v.device.type == "meta"]
        present = [k for k in wanted if k in self.files]
        for k, t in self.files.read(present, self.device, self.dtype).items():
            _set_tensor(self.model, k, t)
        if len(present) < len(wanted):
            self.model.tie_weights()
        for mod in self.model.modules():
            for k, b in mod._buffers.items():
                if b is not None and b.device.type != "meta" and b.device != self.device:
                    mod._buffers[k] = b.to(self.device)
        still = [k for k, v in self.model.state_dict(keep_vars=True).items()
                 if not k.startswith(block_prefix) and v.device.type == "meta"]
        if still:
            raise LrinferError(f"the safetensors files hold no {still[:3]}")

    def load_block(self, i: int) -> nn.Module:
        """Block i with its weights on the device (only tensors still on meta are read)."""
        block = self.blocks[i]
        keys = {rel: full for rel, full in self.block_keys(i).items()
                if _lookup(block, rel).device.type == "meta"}
        tensors = self.files.read(keys.values(), self.device, self.dtype)
        for rel, full in keys.items():
            _set_tensor(block, rel, tensors[full])
        return block

    def release_block(self, i: int) -> None:
        """Free block i's weights (back to meta)."""
        _to_meta(self.blocks[i])


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    return getattr(mod, attr)


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    """The `BlockStreamer` of a model built by `load_streamed`, or None for an ordinary model."""
    return model.__dict__.get("_lrinfer_streamer")


class InMemoryBlocks:
    """`BlockStreamer`'s interface over a model held whole: `load_block(i)` returns block i as it is and
    `release_block(i)` keeps it, so a loop over the blocks reads the same for both (`block_source`).
    device / dtype: where and in what the model's (first) weights are."""
    streamed = False

    def __init__(self, model: nn.Module):
        from .architecture import decoder_blocks
        self.model = model
        self.prefix, self.blocks = decoder_blocks(model)
        weights = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = weights.device, weights.dtype

    def load_block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release_block(self, i: int) -> None:
        pass


def block_source(model: nn.Module) -> BlockStreamer | InMemoryBlocks:
    """Where `model`'s decoder blocks come from: its `BlockStreamer` when `load_streamed` built it (one
    block read from disk at a time), else `InMemoryBlocks`. Both have `blocks`, `prefix`, `device`,
    `dtype`, `streamed`, `load_block(i)` and `release_block(i)`."""
    return streamer_of(model) or InMemoryBlocks(model)


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every parameter on meta (computed buffers real, on the CPU)."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import params_on_meta
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _config_dtype(config, files: SafetensorsFiles) -> torch.dtype:
    """What `from_pretrained(dtype="auto")` would pick: the config's dtype, else the first floating
    tensor's, else float32."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for d, _ in files.meta.values():
        if d is not None and d.is_floating_point:
            return d
    return torch.float32


_MMAP_THRESHOLD = 1 << 20


def _return_freed_blocks_to_the_os() -> None:
    """glibc only: serve every allocation of 1 MiB or more with its own mmap (`mallopt(M_MMAP_THRESHOLD)`),
    so a freed block's buffers go back to the OS. Left to itself, glibc raises that threshold to 32 MiB
    after the first large free, the next blocks' weights land in the heap, and fragmentation grows the
    RSS by ~13 MB per block (measured on a 24-layer, hidden-1024 model: 462 → 774 MB; with this, 514 MB)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(_MMAP_THRESHOLD))      # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_streamed(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> nn.Module | None:
    """A model of the Hugging Face directory `path` built on meta, with the tensors outside the decoder
    blocks loaded on `device` and a `BlockStreamer` attached (`streamer_of`). None when the directory
    cannot be streamed (its tensor names do not cover the model's), after a log line saying why.

    dtype: the compute dtype (default: the config's, as `from_pretrained(dtype="auto")`)."""
    from transformers import AutoConfig

    from .architecture import check_architecture, decoder_blocks
    path = Path(path)
    files = SafetensorsFiles.of_dir(path)
    config = AutoConfig.from_pretrained(str(path))
    dtype = dtype or _config_dtype(config, files)
    try:
        model = build_skeleton(config, dtype)
        check_architecture(model)
        decoder_blocks(model)
    except (LrinferError, ValueError, KeyError) as e:
        log.info("%s: not streamed (%s); loading the whole model", path, e)
        return None
    state = model.state_dict(keep_vars=True)
    tied = {k for k, v in state.items() if sum(v is w for w in state.values()) > 1}
    missing = [k for k in state if k not in files and k not in tied]
    if missing:
        log.info("%s: not streamed (the files name tensors differently, e.g. no %s); loading the whole model",
                 path, missing[0])
        return None
    _return_freed_blocks_to_the_os()
    streamer = BlockStreamer(model, files, device, dtype)
    streamer.load_rest()
    model.__dict__["_lrinfer_streamer"] = streamer
    model.__dict__["_lrinfer_source_dir"] = str(path)
    return model


# --------------------------------------------------------------------------- block-streamed forward


# --------------------------------------------------------------------------- streamed checkpoint writer

def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      fetch: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header from `entries` (name, dtype, shape), then
    each tensor's bytes from `fetch(name)` (cast to its dtype) in order, so at most one tensor is in
    memory. The file reads back with `safetensors.torch.load_file`."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            t = fetch(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the header says {tuple(shape)}")
            t = t.detach().to("cpu", dtype).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def save_streamed_checkpoint(model: nn.Module, tokenizer, out: str | os.PathLike, spec,
                             base_model: str, factor_dir: str | os.PathLike, overwrite: bool = False,
                             dtype: torch.dtype | None = None) -> Path:
    """`checkpoint.save_checkpoint` for a streamed, compressed model: the same directory layout, written
    tensor by tensor. `model` is the meta skeleton that `compress` patched with `LowRankLinear`s; their
    factors come from the work directory `factor_dir` (block_NNNN.safetensors), every other block tensor
    from the source files, and the tensors outside the blocks from memory. Floating tensors are written
    in `dtype` (default: as they are)."""
    from .checkpoint import write_checkpoint_dir
    streamer = streamer_of(model)
    if streamer is None:
        raise LrinferError("save_streamed_checkpoint needs a model built by load_streamed")
    factor_files = SafetensorsFiles(sorted(Path(factor_dir).glob("block_*.safetensors")))

    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    entries, aliases = [], {}
    for k, v in state.items():
        if id(v) in first:
            aliases[k] = first[id(v)]
            continue
        first[id(v)] = k
        t_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        entries.append((k, t_dtype, tuple(v.shape)))

    def fetch(name: str) -> torch.Tensor:
        v = state[name]
        if v.device.type != "meta":
            return v
        src = factor_files if name in factor_files else streamer.files
        return src.read([name])[name]

    return write_checkpoint_dir(
        model, tokenizer, out, spec, base_model, {k: (s, d) for k, d, s in entries}, aliases,
        lambda path: write_safetensors(path, entries, fetch, {"format": "pt"}), overwrite=overwrite, dtype=dtype)


def checkpoint_streamer(model: nn.Module, checkpoint_dir: str | os.PathLike) -> BlockStreamer:
    """A `BlockStreamer` over a checkpoint written by `save_streamed_checkpoint` from `model` (the
    patched skeleton): evaluates the compressed model block by block, its weights as stored."""
    from .checkpoint import WEIGHTS
    src = streamer_of(model)
    streamer = BlockStreamer(model, SafetensorsFiles([Path(checkpoint_dir) / WEIGHTS]), src.device, src.dtype)
    outside = [k for k in model.state_dict(keep_vars=True)
               if not k.startswith(f"{streamer.prefix}.") and k in streamer.files]
    for k, t in streamer.files.read(outside, streamer.device, streamer.dtype).items():
        _set_tensor(model, k, t)      # the embeddings and head as stored, too
    model.tie_weights()
    return streamer


def save_compressed(model: nn.Module, tokenizer, out: str | os.PathLike, spec, base_model: str,
                    factor_dir: str | os.PathLike | None = None, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a compressed `model` as a checkpoint directory however its blocks are held: in memory
    (`checkpoint.save_checkpoint`) or streamed from disk (`save_streamed_checkpoint`, its factors read
    from `factor_dir`, where `compress` wrote them: `CompressionResult.work_dir`). Returns `out`."""
    if block_source(model).streamed:
        if factor_dir is None:
            raise LrinferError("a streamed model's factors are on disk: pass factor_dir=result.work_dir "
                               "(the CompressionResult of compress)")
        return save_streamed_checkpoint(model, tokenizer, out, spec, base_model, factor_dir, overwrite, dtype)
    from .checkpoint import save_checkpoint
    return save_checkpoint(model, tokenizer, out, spec, base_model=base_model, overwrite=overwrite, dtype=dtype)


def as_written(model: nn.Module, checkpoint_dir: str | os.PathLike, dtype: torch.dtype) -> BlockStreamer | None:
    """The compressed `model` with its weights as `save_compressed` wrote them to `checkpoint_dir` in
    `dtype`, to evaluate what was written: a streamed model gets a `BlockStreamer` over the checkpoint
    (for `perplexity(..., streamer=)`); a model in memory has its floating parameters rounded to `dtype`
    in place (what writing them did) and gets None (it is evaluated as it is)."""
    if block_source(model).streamed:
        return checkpoint_streamer(model, checkpoint_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))
    return None
