"""Compressed checkpoints: safetensors + config.json (`quantization_config`) + tokenizer + manifest.

Layout of a checkpoint directory:
  model.safetensors   every tensor of the patched model (factors U, V[, U2, V2] for compressed linears)
  config.json         the model config with a `quantization_config` block: `CheckpointSpec.to_dict()`
  lrinfer.json        manifest: the spec's format fields, tensor shapes/dtypes, sha256 of every file
  tokenizer files, and report.json when written by `lrinfer compress`
`CheckpointSpec` owns the format (version, method, ratio, ranks, factor layout, dtype, base model):
every reader (`load_checkpoint`, the transformers quantizer in `lrinfer.runtime.hf`, the vLLM plugin, resume)
parses it with `CheckpointSpec.from_dict` and rebuilds the model with `skeleton`.
The directory appears atomically (written beside it, then renamed). Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from lrinfer.errors import CheckpointError, LrinferError

MANIFEST = "lrinfer.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
QUANT_METHOD = "lrinfer"
# How the factors of a compressed linear are stored in the file (every version so far; a residual pair
# likewise): the GPU kernels' 16-byte loads read rows along k. The CPU decodes faster with both factors
# k-major; both loaders rewrite them so in the loaded tensors' memory (`nn.k_major_factors_`; docs/results.md,
# "Which layout of the factors"). A new file layout would be a new format version and a new entry here.
LAYOUT = "V[in,k] U[out,k]"
LAYOUTS = (LAYOUT,)
_MANIFEST_FIELDS = ("format_version", "base_model", "method", "ratio", "ranks", "layout", "dtype")


def parse_ranks(ranks, where: str = "quantization_config") -> dict[str, tuple[int, int]]:
    """{linear name: [k, k2] | [k] | k} -> {name: (k, k2)}, checked (k >= 1, k2 >= 0, integers).
    The only parser of a checkpoint's ranks."""
    if not isinstance(ranks, Mapping):
        raise CheckpointError(f"{where}: 'ranks' is a {type(ranks).__name__}, not an object "
                              "{linear name: [rank, residual rank]}; re-create the checkpoint")
    out = {}
    for name, rk in ranks.items():
        r1, r2 = (list(rk) + [0])[:2] if isinstance(rk, (list, tuple)) and 1 <= len(rk) <= 2 else (rk, 0)
        if not (isinstance(name, str) and type(r1) is int and type(r2) is int and r1 >= 1 and r2 >= 0):
            raise CheckpointError(f"{where}: ranks[{name!r}] = {rk!r}; expected [rank >= 1, residual rank >= 0] "
                                  "(integers); re-create the checkpoint")
        out[name] = (r1, r2)
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """The format of one compressed checkpoint: config.json's `quantization_config` and the format
    fields of lrinfer.json are its `to_dict()`.

    ranks: {qualified linear name: (rank, residual rank)}; layout: how the factors are stored
    (`LAYOUT`: V [in, k], U [out, k], a residual pair V2 [in, k2], U2 [out, k2]); dtype: the floating
    dtype the tensors were written in; method, ratio, base_model: how it was made (informational);
    extra: any other keys (selection, allocation, the full config, a recipe search), kept as given.
    """

    ranks: dict[str, tuple[int, int]]
    method: str | None = None
    ratio: float | None = None
    base_model: str | None = None
    dtype: str | None = None
    layout: str = LAYOUT
    version: int = FORMAT_VERSION
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):   # ranks as given ([k, k2], [k] or k) -> checked (k, k2)
        object.__setattr__(self, "ranks", parse_ranks(self.ranks, "CheckpointSpec"))

    @classmethod
    def of(cls, model: nn.Module, method: str | None = None, ratio: float | None = None, **extra) -> "CheckpointSpec":
        """The spec of a patched model: ranks from its `LowRankLinear` modules."""
        from .nn import lowrank_modules
        return cls({n: (m.rank, m.rank2) for n, m in lowrank_modules(model).items()}, method, ratio, extra=extra)

    @classmethod
    def of_compression(cls, config, ranks: Mapping, **extra) -> "CheckpointSpec":
        """The spec of a compression run: `config` a `CompressConfig`, `ranks` its result's ranks."""
        return cls(dict(ranks), config.method, config.ratio,
                   extra={"selection": config.selection, "allocation": config.allocation,
                          "config": config.to_dict(), **extra})

    def replace(self, **changes) -> "CheckpointSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The `quantization_config` block (JSON types only)."""
        d = {**self.extra, "quant_method": QUANT_METHOD, "format_version": self.version, "method": self.method,
             "ratio": self.ratio, "ranks": {n: [r1, r2] for n, (r1, r2) in self.ranks.items()},
             "layout": self.layout}
        d.update({k: v for k, v in (("base_model", self.base_model), ("dtype", self.dtype)) if v is not None})
        return d

    def manifest_fields(self) -> dict:
        """The format fields lrinfer.json repeats (the manifest adds tensors, aliases and files)."""
        d = self.to_dict()
        return {"format": QUANT_METHOD, **{k: d.get(k) for k in _MANIFEST_FIELDS}}

    @classmethod
    def from_dict(cls, d, where: str = "quantization_config") -> "CheckpointSpec":
        """Parse a `quantization_config` block or a manifest; a bad field raises CheckpointError (one line).
        A version 1 block without `layout` has the one layout version 1 knows."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{where}: holds a {type(d).__name__}, not an object; re-create the checkpoint")
        d = dict(d)
        kind = d.pop("quant_method", None) or d.pop("format", None)
        if kind not in (None, QUANT_METHOD):
            raise CheckpointError(f"{where}: quant_method is {kind!r}, not {QUANT_METHOD!r}; not an lrinfer checkpoint")
        version = d.pop("format_version", FORMAT_VERSION)
        if type(version) is not int or version < 1:
            raise CheckpointError(f"{where}: format_version is {version!r}, not a positive integer; "
                                  "re-create the checkpoint")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{where}: format version {version} is newer than this lrinfer supports "
                                  f"({FORMAT_VERSION}); upgrade lrinfer")
        layout = d.pop("layout", LAYOUT)
        if layout not in LAYOUTS:
            raise CheckpointError(f"{where}: layout {layout!r} is not one this lrinfer reads ({', '.join(LAYOUTS)}); "
                                  "upgrade lrinfer or re-create the checkpoint")
        fields = {}
        for key, types in (("method", str), ("ratio", (int, float)), ("base_model", str), ("dtype", str)):
            v = d.pop(key, None)
            if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
                raise CheckpointError(f"{where}: '{key}' is {v!r}; expected a {getattr(types, '__name__', 'number')} "
                                      "or null; re-create the checkpoint")
            fields[key] = v
        if fields["dtype"] is not None and not isinstance(getattr(torch, fields["dtype"], None), torch.dtype):
            raise CheckpointError(f"{where}: dtype {fields['dtype']!r} is not a torch dtype; re-create the checkpoint")
        ranks = parse_ranks(d.pop("ranks", {}), where)
        for key in ("tensors", "aliases", "files"):   # a manifest's own fields
            d.pop(key, None)
        return cls(ranks, version=version, layout=layout, extra=d, **fields)

    def check_manifest(self, manifest: dict, where: Path) -> None:
        """Refuse a manifest (of the checkpoint at `where`) whose format fields are not this spec's."""
        held = CheckpointSpec.from_dict(manifest, str(where / MANIFEST))
        if (held.ranks, held.layout, held.version) != (self.ranks, self.layout, self.version):
            raise CheckpointError(f"{where}: config.json's quantization_config does not match {MANIFEST} "
                                  "(ranks, layout or version differ); the checkpoint was edited or mixed")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a spec whose ranks are not those of the model's `LowRankLinear` modules."""
        have = CheckpointSpec.of(model).ranks
        if have != self.ranks:
            diff = sorted(set(have.items()) ^ set(self.ranks.items()))[:3]
            raise LrinferError(f"the checkpoint spec's ranks differ from the model's LowRankLinear modules "
                               f"(e.g. {diff}); build it with CheckpointSpec.of(model, ...)")


def skeleton(model: nn.Module, spec: CheckpointSpec, where: str = "checkpoint") -> nn.Module:
    """Swap every linear named in `spec.ranks` for a `LowRankLinear` of those ranks on the meta device
    (dtype: the linear's), in place; the dense weights are never allocated. A layer that already is a
    `LowRankLinear` of those ranks is kept. Returns `model`."""
    from .nn import LowRankLinear, replace_module

    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for name, (r1, r2) in spec.ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: ranks name '{name}', which this {model_type} model lacks; "
                                  "the checkpoint belongs to another model") from None
        if isinstance(old, LowRankLinear) and (old.rank, old.rank2) == (r1, r2):
            continue
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{where}: '{name}' is not a linear layer ({type(old).__name__}); "
                                  "the checkpoint belongs to another model")
        full = min(old.in_features, old.out_features)
        if r1 + r2 > full:
            raise CheckpointError(f"{where}: rank {[r1, r2]} of '{name}' is out of range for a "
                                  f"[{old.out_features}, {old.in_features}] layer (1 <= rank + residual rank "
                                  f"<= {full})")
        replace_module(model, name, LowRankLinear(old.in_features, old.out_features, r1, r2, old.bias is not None,
                                                  device="meta", dtype=old.weight.dtype))
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an lrinfer checkpoint ({MANIFEST} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != QUANT_METHOD:
        raise CheckpointError(f"{path / MANIFEST}: not an lrinfer manifest")
    version = manifest.get("format_version", 0)
    if type(version) is not int:
        raise CheckpointError(f"{path / MANIFEST}: format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')} is newer than this "
                              f"lrinfer supports ({FORMAT_VERSION}); upgrade lrinfer")
    _check_manifest_types(path, manifest)
    return manifest


def _check_manifest_types(path: Path, manifest: dict) -> None:
    """Refuse a manifest whose fields have the wrong JSON types (so later code never meets them)."""
    where = path / MANIFEST

    def bad(what):
        raise CheckpointError(f"{where}: {what}; the manifest is corrupt, re-create the checkpoint")

    for key in ("ranks", "tensors", "aliases", "files"):
        if not isinstance(manifest.get(key, {}), dict):
            bad(f"'{key}' is a {type(manifest[key]).__name__}, not an object")
    for name, meta in manifest.get("files", {}).items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            bad(f"file name {name!r} is not a plain file name in the checkpoint directory")
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and isinstance(meta.get("sha256"), str)):
            bad(f"files entry {name!r} is {meta!r}, not {{'bytes': int, 'sha256': str}}")
    for name, meta in manifest.get("tensors", {}).items():
        if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and isinstance(meta.get("dtype"), str)):
            bad(f"tensors entry {name!r} is {meta!r}, not {{'shape': [...], 'dtype': str}}")
    for alias, target in manifest.get("aliases", {}).items():
        if not isinstance(target, str):
            bad(f"alias {alias!r} points to {target!r}, not a tensor name")


def prepare_out_dir(out: Path, base_model: str, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise LrinferError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()) or overwrite:
        return
    if is_checkpoint(out):
        try:
            held = read_manifest(out).get("base_model")
        except CheckpointError:
            held = None
        if held == base_model:
            return
        raise LrinferError(f"--out {out} already holds a compressed model of a different base ({held}); "
                           "pass --overwrite to replace it, or choose another --out")
    raise LrinferError(f"--out {out} is not empty and is not an lrinfer checkpoint; "
                       "pass --overwrite to replace it, or choose another --out")


def _unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without tied duplicates; returns (tensors, {alias: saved key})."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for k, v in model.state_dict().items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().contiguous()
    return tensors, aliases


def save_dtype(model: nn.Module, source: str | None = None) -> torch.dtype:
    """The dtype a checkpoint of `model` is written in by default: the source's own 16-bit dtype when it
    has one (the `dtype` a Hugging Face directory `source` declares, else the model's), else bfloat16 (a
    GGUF dequantizes to float32, but its model is a 16-bit model; the factors are balanced, so 16 bits
    lose little: docs/results.md)."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    config = Path(source) / "config.json" if source else None
    if config is not None and config.is_file():
        declared = json.loads(config.read_text())
        dtype = declared.get("dtype") or declared.get("torch_dtype") or dtype
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def save_checkpoint(model: nn.Module, tokenizer, out: str | os.PathLike,
                    spec: CheckpointSpec | Mapping | None = None, base_model: str | None = None,
                    extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the patched `model` to `out` atomically, its floating tensors in `dtype` (default: as they
    are; see `save_dtype`). `spec`: a `CheckpointSpec` (default `CheckpointSpec.of(model)`), or a mapping
    `CheckpointSpec.from_dict` reads ({"method", "ratio", "ranks", ...}); its ranks must be the model's.
    Returns the directory."""
    from safetensors.torch import save_file

    tensors, aliases = _unique_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return write_checkpoint_dir(
        model, tokenizer, out, spec, base_model, meta, aliases,
        lambda path: save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"}),
        extra_files, overwrite, dtype)


def _spec_for(model: nn.Module, spec, base_model: str | None, dtype: torch.dtype | None) -> CheckpointSpec:
    spec = CheckpointSpec.of(model) if spec is None else spec
    spec = spec if isinstance(spec, CheckpointSpec) else CheckpointSpec.from_dict(spec, "save_checkpoint's spec")
    spec.check_model(model)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = dtype or (max(set(floats), key=floats.count) if floats else None)
    return spec.replace(base_model=base_model or spec.base_model,
                        dtype=str(dtype).removeprefix("torch.") if dtype is not None else spec.dtype)


def write_checkpoint_dir(model: nn.Module, tokenizer, out: str | os.PathLike, spec: CheckpointSpec | Mapping | None,
                         base_model: str | None, tensors: dict[str, tuple], aliases: dict[str, str],
                         write_weights, extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                         dtype: torch.dtype | None = None) -> Path:
    """Everything of a checkpoint directory around its weights, written beside `out` and renamed into
    place: `write_weights(path)` writes the safetensors file, whose tensors are `tensors` {name: (shape,
    dtype)} (+ `aliases` {name: name it shares}); then config.json (architectures, dtype, the spec as
    quantization_config), the tokenizer, `extra_files`, and the manifest (`write_manifest`)."""
    out = Path(out)
    spec = _spec_for(model, spec, base_model, dtype)
    prepare_out_dir(out, spec.base_model, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(tmp / WEIGHTS)
        config = model.config.to_dict()
        if not config.get("architectures"):   # None for models loaded from GGUF; vLLM and others key on it
            config["architectures"] = [type(model).__name__]
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = spec.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        write_manifest(tmp, spec, {k: {"shape": list(shape), "dtype": str(d).removeprefix("torch.")}
                                   for k, (shape, d) in tensors.items()}, aliases)
        _fsync_dir(tmp)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_manifest(folder: Path, spec: CheckpointSpec, tensors: dict[str, dict], aliases: dict[str, str]) -> Path:
    """Write lrinfer.json into `folder`: the spec's format fields, `tensors` {name: {shape, dtype}},
    `aliases` {tied name: saved name}, and the size and sha256 of every other file there. The one writer
    of a manifest (`write_checkpoint_dir`, `lrinfer.runtime.hf.write_manifest`)."""
    folder = Path(folder)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    manifest = {**spec.manifest_fields(), "tensors": tensors, "aliases": aliases, "files": files}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return folder / MANIFEST


def verify_files(path: Path, manifest: dict) -> None:
    """Check every file listed in the manifest against its size and sha256."""
    for name, meta in manifest.get("files", {}).items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != meta.get("bytes"):
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, the manifest says {meta.get('bytes')} "
                                  "(truncated or modified); re-create the checkpoint")
        if sha256_file(p) != meta.get("sha256"):
            raise CheckpointError(f"{p}: checksum mismatch (the file is corrupt or was modified); "
                                  "re-create or re-download the checkpoint")


class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """`torch.empty` without an explicit device allocates on meta (how nn.Linear / nn.Embedding
    create their weights); buffers computed by other ops (e.g. rotary inv_freq) stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def params_on_meta():
    """Create every nn.Parameter on the meta device (buffers stay real), so building a model
    never allocates dense weights: `torch.empty` defaults to meta, and any parameter still made
    elsewhere is moved to meta when registered."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


def read_spec(path: Path, manifest: dict, config_dict: dict | None = None) -> CheckpointSpec:
    """The checkpoint's spec from its config.json's `quantization_config`, which must agree with the
    manifest's format fields (`manifest`: `read_manifest(path)`; `config_dict`: the parsed config.json,
    read from `path` when None)."""
    path = Path(path)
    if config_dict is None:
        config_dict = json.loads((path / "config.json").read_text())
    qc = config_dict.get("quantization_config") if isinstance(config_dict, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: config.json's quantization_config does not match {MANIFEST} "
                              "(it is not an lrinfer block); the checkpoint was edited or mixed")
    spec = CheckpointSpec.from_dict(qc, f"{path / 'config.json'}: quantization_config")
    spec.check_manifest(manifest, path)
    return spec


def load_checkpoint(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = True):
    """Rebuild the patched model from a checkpoint directory. Returns (model, tokenizer).

    The dense weights of compressed layers are never allocated: the skeleton is built with
    parameters on the meta device, compressed linears are swapped for `LowRankLinear` there,
    and tensors are assigned from safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        config_dict = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path / 'config.json'}: missing; every checkpoint needs its model config") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({_one_line(e)})") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{path / 'config.json'}: holds a {type(config_dict).__name__}, not a JSON object")
    spec = read_spec(path, manifest, config_dict)
    try:
        config = AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # anything transformers raises on a bad config: unknown model_type, bad field, ...
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model from it "
                              f"({type(e).__name__}: {_one_line(e)})") from None
    skeleton(model, spec, str(path))
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path / WEIGHTS}: missing or not a file; the checkpoint holds no weights")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: not a valid safetensors file ({_one_line(e)}); "
                              "pickled checkpoints are never loaded") from None
    _check_tensors(path, model, tensors, manifest)
    from .nn import k_major_factors_
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    k_major_factors_(model)   # the CPU's layout, in the file's memory (the peak: one factor more)
    model.tie_weights()
    empty = [k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"]
    if empty:   # an alias in the manifest named a tensor the model does not tie
        raise CheckpointError(f"{path / WEIGHTS}: no data for {empty[:5]}{' ...' if len(empty) > 5 else ''} "
                              f"(missing, and {MANIFEST} names them as aliases of tensors the model does not tie)")
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    tok = None
    if (path / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # corrupt tokenizer files (only reachable with verify=False or unlisted files)
            raise CheckpointError(f"{path}: the tokenizer files are unreadable "
                                  f"({type(e).__name__}: {_one_line(e)})") from None
    return model, tok


def _one_line(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters (some library messages run to paragraphs)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text[:297] + "...") if len(text) > 300 else (text or type(e).__name__)


def _check_tensors(path: Path, model: nn.Module, tensors: dict, manifest: dict) -> None:
    from .nn import LowRankLinear

    aliases = manifest.get("aliases", {})
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in aliases}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    where = path / WEIGHTS
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unknown:
        raise CheckpointError(f"{where}: unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    declared = manifest.get("tensors", {})
    for k, t in tensors.items():
        want = expected[k]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: '{k}' has shape {list(t.shape)}, the model needs {list(want.shape)}")
        d = declared.get(k)
        if d is None or d.get("shape") != list(t.shape) or d.get("dtype") != str(t.dtype).removeprefix("torch."):
            raise CheckpointError(f"{where}: '{k}' ({t.dtype}, {list(t.shape)}) does not match "
                                  f"{MANIFEST} ({d})")
        if t.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{where}: '{k}' has dtype {t.dtype}, the model needs a "
                                  f"{'floating' if want.is_floating_point() else 'non-floating'} tensor")
        if not t.is_floating_point():
            continue
        if isinstance(want, nn.Parameter) and not torch.isfinite(t).all():   # buffers may hold ±inf masks
            raise CheckpointError(f"{where}: '{k}' holds NaN/Inf; the file is corrupt, re-create the checkpoint")
    # A compressed layer's factors and bias must share the dtype of the rest of the model: the op
    # refuses mixed dtypes at the first forward otherwise.
    floats = [t.dtype for k, t in tensors.items() if t.is_floating_point()
              and not isinstance(_owner(model, k), LowRankLinear)]
    model_dtype = max(set(floats), key=floats.count) if floats else None
    for k, t in tensors.items():
        if isinstance(_owner(model, k), LowRankLinear):
            if model_dtype is None:
                model_dtype = t.dtype
            if t.dtype != model_dtype:
                raise CheckpointError(f"{where}: '{k}' is {str(t.dtype).removeprefix('torch.')} but the model's "
                                      f"other tensors are {str(model_dtype).removeprefix('torch.')}; "
                                      "all factors of a compressed layer must share the model's dtype")


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    mod, _, _ = key.rpartition(".")
    try:
        return model.get_submodule(mod)
    except AttributeError:
        return None
