"""Hugging Face integration: `AutoModelForCausalLM.from_pretrained(compressed_dir)` returns the patched model.

    import lrinfer.hf                                   # registers quant_method "lrinfer"
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-svdllm-0.2", dtype=torch.bfloat16)

An lrinfer checkpoint (`lrinfer.save_checkpoint`) is an ordinary Hugging Face directory whose
config.json carries `quantization_config = {quant_method: "lrinfer", ranks: {name: [k, k2]}, ...}`.
Transformers builds the model on the meta device; `LrinferHfQuantizer` then swaps every linear
named in `ranks` for a `LowRankLinear` (still on meta), so only the factors U, V[, U2, V2] are
ever materialised: the dense weight of a compressed layer is never allocated.
When `lrinfer.json` lies beside the weights, every file is checked against its sha256 first.

Saving: `lrinfer.hf.save_pretrained(model, dir)` (or `model.save_pretrained(dir)` on a model
loaded by `from_pretrained` or marked with `mark_patched`) writes config.json and
model.safetensors through transformers, then adds the `lrinfer.json` manifest, so the directory
loads with both `from_pretrained` and `lrinfer.load_checkpoint`. `lrinfer.save_checkpoint` writes
the same layout atomically (temp dir + rename) and is what `lrinfer compress` uses.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import (FORMAT_VERSION, MANIFEST, QUANT_METHOD, WEIGHTS, atomic_write_bytes, read_manifest,
                         sha256_file, verify_files)
from .errors import CheckpointError
from .nn import LowRankLinear, lowrank_modules, replace_module

log = logging.getLogger(__name__)

__all__ = ["LrinferConfig", "LrinferHfQuantizer", "mark_patched", "save_pretrained", "write_manifest"]


def _split_rank(name: str, rk) -> tuple[int, int]:
    r1, r2 = (list(rk) + [0])[:2] if isinstance(rk, (list, tuple)) else (rk, 0)
    if not (isinstance(r1, int) and isinstance(r2, int) and r1 >= 1 and r2 >= 0):
        raise CheckpointError(f"quantization_config.ranks['{name}'] = {rk!r}; expected [rank >= 1, residual rank >= 0]")
    return r1, r2


class LrinferConfig(QuantizationConfigMixin):
    """The `quantization_config` block of an lrinfer checkpoint.

    ranks: {qualified linear name: [rank, residual rank]}; method and ratio: how it was made
    (informational). Unknown keys (e.g. written by a newer lrinfer) are kept and saved back.
    """

    def __init__(self, ranks: dict | None = None, method: str | None = None, ratio: float | None = None,
                 format_version: int = FORMAT_VERSION, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.method = method
        self.ratio = ratio
        self.ranks = {k: list(_split_rank(k, v)) for k, v in (ranks or {}).items()}
        for k, v in kwargs.items():
            setattr(self, k, v)
        if int(format_version) > FORMAT_VERSION:
            raise CheckpointError(f"lrinfer checkpoint format version {format_version} is newer than this lrinfer "
                                  f"supports ({FORMAT_VERSION}); upgrade lrinfer")


class LrinferHfQuantizer(HfQuantizer):
    """Loads lrinfer checkpoints in `from_pretrained`; it cannot compress a dense model on the fly
    (use `lrinfer.compress` or `lrinfer compress`)."""

    requires_calibration = True  # only pre-compressed checkpoints
    quantization_config: LrinferConfig

    def __init__(self, quantization_config: LrinferConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.manifest: dict | None = None

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lrinfer checkpoints do not support disk offload (device_map holds 'disk'); "
                             "use cpu or accelerator devices")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Check the files against lrinfer.json (when present), then swap the compressed linears
        for `LowRankLinear` modules on the meta device."""
        ranks = self.quantization_config.ranks
        folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if folder is not None and (folder / MANIFEST).is_file():
            manifest = read_manifest(folder)
            verify_files(folder, manifest)
            if {k: list(_split_rank(k, v)) for k, v in manifest.get("ranks", {}).items()} != ranks:
                raise CheckpointError(f"{folder}: config.json's quantization_config does not match {MANIFEST} "
                                      "(ranks differ); the checkpoint was edited or mixed")
            self.manifest = manifest
            log.info("lrinfer: %d files in %s match their sha256", len(manifest.get("files", {})), folder)
        else:
            log.warning("lrinfer: no %s beside the weights (%s); checksums not verified", MANIFEST, folder)
        model_type = getattr(model.config, "model_type", type(model).__name__)
        for name, rk in ranks.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"quantization_config.ranks names '{name}', which this {model_type} "
                                      "model lacks") from None
            if isinstance(old, LowRankLinear):
                continue
            if not isinstance(old, nn.Linear):
                raise CheckpointError(f"quantization_config.ranks names '{name}', a {type(old).__name__}, "
                                      "not a linear layer")
            r1, r2 = rk
            full = min(old.in_features, old.out_features)
            if r1 + r2 > full:
                raise CheckpointError(f"rank {rk} of '{name}' is out of range for a [{old.out_features}, "
                                      f"{old.in_features}] layer (rank + residual rank <= {full})")
            replace_module(model, name, LowRankLinear(old.in_features, old.out_features, r1, r2,
                                                      old.bias is not None, device="meta",
                                                      dtype=old.weight.dtype))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _install_save_hook(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the op has an autograd formula; factors train like any parameter

    @property
    def is_compileable(self) -> bool:
        return True  # the op has a fake impl and no graph breaks


# Registration is idempotent, so re-importing this module (e.g. importlib.reload) is harmless.
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LrinferConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(LrinferHfQuantizer)


# ----------------------------------------------------------------------------- saving

def mark_patched(model, ranks: dict | None = None, method: str | None = None, ratio: float | None = None,
                 **extra) -> LrinferConfig:
    """Make a model patched in memory (by `lrinfer.compress` or `lrinfer.patch`) save like a
    loaded checkpoint: sets `model.config.quantization_config` and `model.hf_quantizer`, so
    `model.save_pretrained(dir)` writes a directory `from_pretrained` and `load_checkpoint` read.
    `ranks` defaults to those of the model's `LowRankLinear` modules."""
    if ranks is None:
        ranks = {n: [m.rank, m.rank2] for n, m in lowrank_modules(model).items()}
    qc = LrinferConfig(ranks=ranks, method=method, ratio=ratio, **extra)
    model.config.quantization_config = qc
    model.hf_quantizer = LrinferHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _install_save_hook(model)
    return qc


def _install_save_hook(model) -> None:
    """Make `model.save_pretrained` also write lrinfer.json (an instance attribute; the class is untouched)."""
    if getattr(model, "_lrinfer_save_hook", False):
        return
    plain = type(model).save_pretrained.__get__(model)

    @functools.wraps(plain)
    def save_with_manifest(save_directory, *args, **kwargs):
        out = plain(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not kwargs.get("distributed_checkpoint", False):
            write_manifest(save_directory, model)
        return out

    object.__setattr__(model, "save_pretrained", save_with_manifest)
    object.__setattr__(model, "_lrinfer_save_hook", True)


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, base_model: str | None = None,
                    **kwargs) -> Path:
    """`model.save_pretrained` (transformers' writer: config.json, generation_config.json,
    model.safetensors) plus the tokenizer and the lrinfer.json manifest. The model must be
    patched (loaded through `from_pretrained`, or marked with `mark_patched`)."""
    if getattr(model.config, "quantization_config", None) is None:
        raise ValueError("save_pretrained: the model has no lrinfer quantization_config; "
                         "call lrinfer.hf.mark_patched(model, method=..., ratio=...) first")
    save_directory = Path(save_directory)
    type(model).save_pretrained(model, save_directory, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(save_directory))
    write_manifest(save_directory, model, base_model)
    return save_directory


def write_manifest(folder: str | os.PathLike, model, base_model: str | None = None) -> Path:
    """Write lrinfer.json for a directory written by transformers' `save_pretrained`: ranks from
    config.json, tensor shapes/dtypes from the safetensors header, tied keys as aliases, and the
    sha256 of every file. Needs a single (unsharded) model.safetensors."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
        raise CheckpointError(f"{folder}: no single {WEIGHTS} ({len(shards)} shards); lrinfer.json needs an "
                              "unsharded checkpoint: pass a larger max_shard_size")
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{folder / 'config.json'} has no lrinfer quantization_config")
    tensors = {}
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            tensors[k] = {"shape": list(sl.get_shape()),
                          "dtype": str(_ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())).removeprefix("torch.")}
    # keys of the state dict the file lacks are tied to one it holds (same storage)
    by_storage = {}
    state = model.state_dict()
    for k in tensors:
        if k in state:
            by_storage[(state[k].untyped_storage().data_ptr(), state[k].storage_offset())] = k
    aliases = {}
    for k, v in state.items():
        if k not in tensors:
            saved = by_storage.get((v.untyped_storage().data_ptr(), v.storage_offset()))
            if saved is None:
                raise CheckpointError(f"{folder / WEIGHTS}: '{k}' is neither saved nor tied to a saved tensor")
            aliases[k] = saved
    prior = getattr(getattr(model, "hf_quantizer", None), "manifest", None) or {}
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    manifest = {
        "format": QUANT_METHOD, "format_version": FORMAT_VERSION,
        "base_model": base_model or prior.get("base_model") or getattr(model.config, "name_or_path", None),
        "method": qc.get("method"), "ratio": qc.get("ratio"), "ranks": qc.get("ranks", {}),
        "tensors": tensors, "aliases": aliases, "files": files,
    }
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return folder / MANIFEST


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
