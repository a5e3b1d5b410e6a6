"""`lrinfer bench` and lrinfer.evaluation.benchmark on tiny models (CPU, eager): both sides measured at every
batch size, the compressed side is smaller, the KV cache is counted, errors are one line."""
import json

import pytest
import torch

import lrinfer
from lrinfer.evaluation.benchmark import Runner, bench_model, compare, weight_stats
from lrinfer.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 60


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_hf_dir):
    """A plain-SVD 30% checkpoint of a tiny Llama saved as an HF directory (its recorded base model)."""
    root = tiny_hf_dir(tmp_path_factory.mktemp("bench"), TEXT)
    model, tok, source = lrinfer.load_model(str(root / "model"))
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.3, rank_multiple=1), ids,
                              progress=False)
    return lrinfer.save_checkpoint(model, tok, root / "ck", {"method": "svd", "ratio": 0.3, "ranks": result.ranks},
                                   base_model=source)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_cli(ckpt, capsys, keep_threads):
    args = ["bench", str(ckpt), "--device", "cpu", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
            "--repeats", "3", "--threads", "1"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(ckpt) and report["base_model"].endswith("model")
    assert (report["method"], report["ratio"], report["device"], report["dtype"]) == ("svd", 0.3, "cpu", "float32")
    assert report["threads"] == 1 and report["cuda_graphs"] is False and report["cache"] == "static"
    assert (report["prompt_len"], report["new_tokens"], report["repeats"]) == (8, 4, 3)
    dense, comp = report["dense"], report["compressed"]
    for key in ("params", "param_bytes", "weights_bytes", "streamed_bytes"):
        assert 0 < comp[key] < dense[key], key
    assert report["bytes_ratio"] == pytest.approx(dense["streamed_bytes"] / comp["streamed_bytes"], rel=1e-3)
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        for side in ("dense", "compressed"):
            r = row[side]
            assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
            assert len(r["decode_s"]) == len(r["prefill_s"]) == 3
            # the static cache: 2 layers x (K, V) x batch x 2 KV heads x 12 positions x 16 dims x 4 bytes
            assert r["kv_cache_bytes"] == 2 * 2 * row["batch"] * 2 * 12 * 16 * 4
            assert r["peak_bytes"] == report[side]["weights_bytes"] + r["kv_cache_bytes"]
        assert row["decode_speedup"] == pytest.approx(row["compressed"]["decode_tokens_per_s"]
                                                      / row["dense"]["decode_tokens_per_s"], rel=1e-3)
        assert row["decode_speedup_paired"] > 0 and row["decode_speedup_cpu_time"] > 0
        assert row["dense"]["decode_cpu_ms_per_step"] > 0
    assert "parameter + buffer" in report["peak_method"]

    assert main(args[:-4] + ["--repeats", "1"]) == 0     # the table
    out = capsys.readouterr().out
    assert "svd at ratio 0.3" in out and "compressed/dense: decode" in out
    assert out.count("  dense ") == 2 and out.count("  compressed ") == 2


def test_bench_model_caches_agree(make_tiny):
    model = make_tiny()
    static = bench_model(model, batch=2, prompt_len=6, new_tokens=3, repeats=1)
    dynamic = bench_model(model, batch=2, prompt_len=6, new_tokens=3, repeats=1, cache="dynamic")
    for r in (static, dynamic):   # 2 layers x (K, V) x batch 2 x 2 KV heads x 9 positions x 16 dims x 4 bytes
        assert r["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 9 * 16 * 4 and r["decode_tokens_per_s"] > 0
        assert r["params"] == weight_stats(model)["params"] == sum(p.numel() for p in model.parameters())
    # an untied input embedding is not read by a decode step
    assert static["streamed_bytes"] == static["param_bytes"] - model.get_input_embeddings().weight.nbytes


def test_runner_decodes_greedily(make_tiny):
    """The timed loop is real greedy decoding: its tokens equal HF generate's on the same prompt."""
    model = make_tiny()
    runner = Runner(model, 1, 5, 6)
    seen = []
    forward = model.forward

    def spy(**kw):
        seen.append(kw["input_ids"][:, -1:].clone())
        return forward(**kw)

    runner.run(forward=spy)
    ref = model.generate(runner.ids, attention_mask=torch.ones_like(runner.ids), do_sample=False,
                         max_new_tokens=6, pad_token_id=0)
    assert torch.equal(torch.cat(seen[1:], 1), ref[:, 5:])


def test_errors(ckpt, tmp_path, capsys, make_tiny):
    from ._tiny import tiny_checkpoint
    _, lost, _ = tiny_checkpoint(tmp_path / "lost")   # its manifest names base model 'tiny'
    cases = [
        (["bench", str(lost)], "cannot load its dense base model 'tiny'"),
        (["bench", str(lost), "--base", str(ckpt.parent / "model")], "does not match"),
        (["bench", str(ckpt.parent / "model")], "not an lrinfer checkpoint"),
        (["bench", str(tmp_path / "nothing")], "checkpoint directory not found"),
        (["bench", str(ckpt), "--repeats", "0"], "repeats must be at least 1"),
        (["bench", str(ckpt), "--prompt-len", "300"], "exceeds the model's 256 positions"),
    ]
    for args, message in cases:
        assert main(args + ["--device", "cpu"]) == 2, args
        err = capsys.readouterr().err   # (after a model loads, transformers' progress bar precedes the error)
        last = err.rstrip("\n").rsplit("\n", 1)[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in err, (args, err)
    with pytest.raises(lrinfer.LrinferError, match="CUDA graphs need a CUDA device"):
        compare(make_tiny(), make_tiny(), graphs=True)
    with pytest.raises(lrinfer.LrinferError, match="different dtypes"):
        compare(make_tiny(), make_tiny().double())
