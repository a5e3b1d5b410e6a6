"""`lrinfer serve DIR`: vLLM's OpenAI-compatible server on a checkpoint, with lrinfer's plugin
(see docs/serving.md)."""
from __future__ import annotations
VLLM_SERVER = "vllm.entrypoints.openai.api_server"


def _architecture_override(path) -> list[str]:
    """`--hf-overrides` naming the architecture for a checkpoint whose config.json lacks `architectures`
    (written before lrinfer recorded it); vLLM picks its model class from that field."""
    import json as _json
    from pathlib import Path

    config = _json.loads((Path(path) / "config.json").read_text())
    if config.get("architectures"):
        return []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    return ["--hf-overrides", _json.dumps({"architectures": [arch]})] if arch else []


def serve_command(path, host: str = "127.0.0.1", port: int = 8000, vllm_args=()) -> list[str]:
    """The command `lrinfer serve` runs: vLLM's OpenAI-compatible server on a checkpoint directory, in this
    Python. Raises LrinferError when the directory is not an lrinfer checkpoint, vLLM is missing, or
    lrinfer's plugin entry point is not installed in this environment."""
    import importlib.metadata
    import importlib.util
    import sys
    from pathlib import Path

    from .checkpoint import read_manifest
    from lrinfer.errors import LrinferError
    from .vllm_plugin import INSTALL_HINT

    path = Path(path)
    if not path.is_dir():
        raise LrinferError(f"checkpoint directory not found: {path}")
    read_manifest(path)   # CheckpointError (an LrinferError) when it is not an lrinfer checkpoint
    if importlib.util.find_spec("vllm") is None:
        raise LrinferError(f"vLLM is not installed in this environment ({sys.executable}); install it: {INSTALL_HINT}")
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    if plugins.get("lrinfer") != "lrinfer.runtime.vllm_plugin:register":
        raise LrinferError("lrinfer's vLLM plugin is not registered in this environment (vLLM loads it through the "
                           "`vllm.general_plugins` entry point of the installed lrinfer): pip install --no-deps -e "
                           "<lrinfer checkout> in the environment that has vLLM")
    args = list(vllm_args)
    if args[:1] == ["--"]:
        args = args[1:]
    extra = [] if any(a.startswith("--hf-overrides") for a in args) else _architecture_override(path)
    return [sys.executable, "-m", VLLM_SERVER, "--model", str(path), "--host", host, "--port", str(port),
            *extra, *args]


def serve(path, host: str = "127.0.0.1", port: int = 8000, vllm_args=(), dry_run: bool = False) -> list[str]:
    """`lrinfer serve`: replace this process with vLLM's OpenAI-compatible server on the checkpoint (the
    plugin loads through its entry point in every vLLM process). dry_run: return the command instead."""
    import os

    cmd = serve_command(path, host, port, vllm_args)
    if dry_run:
        return cmd
    os.execv(cmd[0], cmd)
