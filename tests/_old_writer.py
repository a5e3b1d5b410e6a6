"""A checkpoint exactly as lrinfer wrote format version 1 before `CheckpointSpec` (that writer's logic,
inlined, from lrinfer/checkpoint.py before commit 37d5d0c): quantization_config holds quant_method,
format_version, method, ratio and ranks only (no layout, dtype or base_model). Used by
tests/test_checkpoint.py (it loads bit-exactly) and tests/test_vllm.py (vLLM serves it, TP = 1 and 3)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lrinfer.runtime.checkpoint import MANIFEST, WEIGHTS
from lrinfer.runtime.nn import lowrank_modules


def write_version1(model, out: Path, tokenizer=None, method: str = "ressvd", ratio: float = 0.3,
                   base_model: str = "tiny") -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir()
    seen, tensors, aliases = {}, {}, {}   # the state dict without tied duplicates (the old _unique_state_dict)
    for k, v in model.state_dict().items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    ranks = {n: [m.rank, m.rank2] for n, m in lowrank_modules(model).items()}
    qc = {"quant_method": "lrinfer", "format_version": 1, "method": method, "ratio": ratio, "ranks": ranks}
    config = model.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"format": "lrinfer", "format_version": 1, "base_model": base_model, "method": method, "ratio": ratio,
                "ranks": ranks, "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                            for k, v in tensors.items()},
                "aliases": aliases, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out
