"""Hugging Face integration: `AutoModelForCausalLM.from_pretrained(compressed_dir)` returns the patched model.

    import lrinfer.runtime.hf                                   # registers quant_method "lrinfer"
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-svdllm-0.2", dtype=torch.bfloat16)

An lrinfer checkpoint (`lrinfer.save_checkpoint`) is an ordinary Hugging Face directory whose
config.json carries `quantization_config = {quant_method: "lrinfer", ranks: {name: [k, k2]}, ...}`.
Transformers builds the model on the meta device; `LrinferHfQuantizer` then swaps every linear
named in `ranks` for a `LowRankLinear` (still on meta), so only the factors U, V[, U2, V2] are
ever materialised: the dense weight of a compressed layer is never allocated.
When `lrinfer.json` lies beside the weights, every file is checked against its sha256 first.

Saving: `lrinfer.runtime.hf.save_pretrained(model, dir)` (or `model.save_pretrained(dir)` on a model
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
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from lrinfer.errors import CheckpointError
from . import checkpoint
from .checkpoint import MANIFEST, QUANT_METHOD, WEIGHTS, CheckpointSpec, read_manifest, skeleton, verify_files
from .nn import k_major_factors_

log = logging.getLogger(__name__)

__all__ = ["LrinferConfig", "LrinferHfQuantizer", "mark_patched", "save_pretrained", "write_manifest"]


class LrinferConfig(QuantizationConfigMixin):
    """The `quantization_config` block of an lrinfer checkpoint: the attributes of
    `CheckpointSpec.to_dict()` (parsed and checked by `CheckpointSpec.from_dict`); `spec` gives it back.
    Unknown keys (e.g. written by a newer lrinfer) are kept and saved back."""

    def __init__(self, **kwargs):
        kwargs.setdefault("quant_method", QUANT_METHOD)
        for k, v in CheckpointSpec.from_dict(kwargs).to_dict().items():
            setattr(self, k, v)

    @property
    def spec(self) -> CheckpointSpec:
        return CheckpointSpec.from_dict(self.to_dict())


class LrinferHfQuantizer(HfQuantizer):
    """Loads lrinfer checkpoints in `from_pretrained`; it cannot compress a dense model on the fly
    (use `lrinfer.offline.compress` or `lrinfer compress`)."""

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
        spec = self.quantization_config.spec
        folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if folder is not None and (folder / MANIFEST).is_file():
            manifest = read_manifest(folder)
            verify_files(folder, manifest)
            spec.check_manifest(manifest, folder)
            self.manifest = manifest
            log.info("lrinfer: %d files in %s match their sha256", len(manifest.get("files", {})), folder)
        else:
            log.warning("lrinfer: no %s beside the weights (%s); checksums not verified", MANIFEST, folder)
        return skeleton(model, spec, "quantization_config")

    def _process_model_after_weight_loading(self, model, **kwargs):
        """The CPU factors laid out k-major in the loaded tensors' own memory (`k_major_factors_`)."""
        k_major_factors_(model)
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

def mark_patched(model, spec: CheckpointSpec | None = None, **fields) -> LrinferConfig:
    """Make a model patched in memory (by `lrinfer.offline.compress` or `lrinfer.patch`) save like a
    loaded checkpoint: sets `model.config.quantization_config` and `model.hf_quantizer`, so
    `model.save_pretrained(dir)` writes a directory `from_pretrained` and `load_checkpoint` read.
    `spec` defaults to `CheckpointSpec.of(model, **fields)` (fields: method, ratio, extra keys)."""
    spec = spec if spec is not None else CheckpointSpec.of(model, **fields)
    spec.check_model(model)
    qc = LrinferConfig(**spec.to_dict())
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
                         "call lrinfer.runtime.hf.mark_patched(model, method=..., ratio=...) first")
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
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{folder / 'config.json'} has no lrinfer quantization_config")
    spec = CheckpointSpec.from_dict(qc, f"{folder / 'config.json'}: quantization_config")
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
    base = base_model or spec.base_model or prior.get("base_model") or getattr(model.config, "name_or_path", None)
    return checkpoint.write_manifest(folder, spec.replace(base_model=base or None), tensors, aliases)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
