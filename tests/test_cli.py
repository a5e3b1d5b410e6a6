"""The CLI contract on a tiny model saved as a Hugging Face directory."""
import json
from dataclasses import replace

import pytest

import lrinfer
from lrinfer.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_hf_dir):
    return tiny_hf_dir(tmp_path_factory.mktemp("tiny_dir"), TEXT)


def _compress(tiny_dir, out, *extra):
    return main(["compress", "--model", str(tiny_dir / "model"), "--method", "svdllm", "--ratio", "0.3",
                 "--calib", str(tiny_dir / "text.txt"), "--samples", "4", "--calib-seq-len", "32",
                 "--data", str(tiny_dir / "text.txt"), "--seq-len", "32", "--windows", "3",
                 "--out", str(out), "--rank-multiple", "1", "--no-progress", "--json", *extra])


def test_compress_eval_info(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert _compress(tiny_dir, out) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out)["ranks"] == report["ranks"]
    for key in ("method", "ratio", "ranks", "params", "bytes_on_disk", "ppl", "ppl_dense", "achieved_ratio"):
        assert key in report
    assert report["method"] == "svdllm" and report["ratio"] == 0.3 and len(report["ranks"]) == 14
    assert report["params"]["linears_compressed"] < 0.7 * report["params"]["linears_dense"]
    assert report["ppl"]["seq_len"] == 32 and report["ppl"]["windows"] == 3
    assert report["ppl"]["data"].endswith("text.txt")

    assert main(["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32", "--windows", "3",
                 "--dtype", "float32", "--json", "--no-progress"]) == 0   # report: bf16 weights computed in fp32
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ppl"]["ppl"] == pytest.approx(report["ppl"]["ppl"], rel=1e-5)
    assert evaluated["method"] == "svdllm"

    assert main(["eval", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                 "--windows", "3", "--json", "--no-progress"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["method"] == "dense"
    assert dense["ppl"]["ppl"] == pytest.approx(report["ppl_dense"]["ppl"], rel=1e-5)

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compressed_linears"] == 14 and info["bytes_on_disk"] > 0


def test_pipeline_run_writes_what_the_cli_writes(tiny_dir, tmp_path, capsys):
    """`lrinfer.pipeline.run` from Python, on the job the CLI flags of `_compress` describe: the same
    checkpoint (ranks, report keys, perplexities), and the report it returns is the one it wrote.
    Then the same job with the model loaded whole instead of block by block: the same numbers."""
    from lrinfer.evaluation.perplexity import PerplexityConfig
    from lrinfer.pipeline import CompressJob, run
    assert _compress(tiny_dir, tmp_path / "cli") == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    text = str(tiny_dir / "text.txt")
    job = CompressJob(model=str(tiny_dir / "model"), out=tmp_path / "py", progress=False,
                      config=lrinfer.CompressConfig(method="svdllm", ratio=0.3, calib=text, n_samples=4, seq_len=32,
                                                    rank_multiple=1),
                      evaluation=PerplexityConfig(data=text, seq_len=32, windows=3))
    result = run(job)
    assert result.path == tmp_path / "py"
    assert result.report == json.loads((result.path / "report.json").read_text())
    assert result.report.keys() == cli.keys() and result.report["ranks"] == cli["ranks"]
    assert result.report["streamed"] and cli["streamed"]
    for key in ("ppl", "ppl_dense"):
        assert result.report[key]["ppl"] == cli[key]["ppl"]
    assert (result.path / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert not (tmp_path / ".py.work").exists()

    whole = run(replace(job, out=tmp_path / "whole", stream=False)).report
    assert not whole["streamed"] and whole["ranks"] == cli["ranks"]
    for key in ("ppl", "ppl_dense"):
        assert whole[key]["ppl"] == pytest.approx(cli[key]["ppl"], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"streams": "gpu"}, "streams must be one of auto, device, host"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"compute_dtype": "float64x"}, "unknown dtype 'float64x'"),
    ({"search": "heldout=0"}, "heldout must be >= 1"),
    ({"search": "candidates=nosuch"}, "nosuch"),
])
def test_pipeline_refuses_a_bad_job_before_loading(change, message):
    """One line naming the problem, before the (here missing) model is looked for."""
    from lrinfer.pipeline import CompressJob, SearchOptions, run
    if "search" in change:
        key, _, value = change.pop("search").partition("=")
        change["search"] = SearchOptions(**{key: int(value) if key == "heldout" else [value]})
    with pytest.raises(lrinfer.LrinferError, match=message):
        run(CompressJob(model="/no/such/model", **change))


def test_cli_defaults_are_the_dataclasses():
    """The flags' defaults are read from the dataclasses, so they cannot drift: no flags give the
    default job, and `plan`'s and `eval`'s defaults are the same fields'."""
    from lrinfer.cli import build_parser, compress_job, field_defaults
    from lrinfer.evaluation.perplexity import PerplexityConfig
    from lrinfer.offline.config import CompressConfig
    from lrinfer.pipeline import CompressJob, SearchOptions
    parser = build_parser()
    assert compress_job(parser.parse_args(["compress"])) == CompressJob()
    assert compress_job(parser.parse_args(["compress", "--method", "auto"])).search == SearchOptions()
    d = field_defaults(CompressConfig)
    plan = parser.parse_args(["plan", "--config", "config.json"])
    assert (plan.method, plan.ratio, plan.samples, plan.calib_seq_len, plan.batch_size, plan.streams) == (
        d["method"], d["ratio"], d["n_samples"], d["seq_len"], d["batch_size"], CompressJob().streams)
    evaluated = parser.parse_args(["eval", "DIR"])
    assert PerplexityConfig(evaluated.data, evaluated.seq_len, evaluated.windows, evaluated.eval_batch_size) \
        == PerplexityConfig()


def test_checkpoint_is_16_bit_by_default(tiny_dir, tmp_path, capsys):
    from safetensors import safe_open
    sizes = {}
    for dtype, extra in (("bfloat16", []), ("float32", ["--dtype", "float32"])):
        out = tmp_path / dtype
        assert _compress(tiny_dir, out, "--no-eval", *extra) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == dtype and config["architectures"] == ["LlamaForCausalLM"]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F32"}
        sizes[dtype] = (out / "model.safetensors").stat().st_size
        assert json.loads((out / "report.json").read_text())["dtype"] == dtype
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]


def test_16_bit_source_keeps_its_dtype_and_cpu_computes_in_float32(tiny_dir, tmp_path, capsys):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM
    src = tmp_path / "fp16"
    shutil.copytree(tiny_dir / "model", src)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).save_pretrained(src)
    out = tmp_path / "ck16"
    assert main(["compress", "--model", str(src), "--calib", str(tiny_dir / "text.txt"), "--samples", "4",
                 "--calib-seq-len", "32", "--no-eval", "--no-progress", "--rank-multiple", "1", "--json",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    capsys.readouterr()
    import lrinfer
    from lrinfer.runtime.models import load_dtype
    model, _, _ = lrinfer.load_model(str(out), load_dtype(None, "cpu"), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_expected_fallbacks_are_one_summary_line(tiny_dir, tmp_path, capsys, caplog):
    # 1 sample x 32 tokens < 64 input features: every Gram matrix of a 64-wide input is rank-deficient
    args = ["--samples", "1", "--no-eval"]
    assert _compress(tiny_dir, tmp_path / "a", *args) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["fallbacks"]["ridge"]) >= 10 and not any("rank-deficient" in r.message for r in caplog.records)
    assert main(["compress", "--model", str(tiny_dir / "model"), "--calib", str(tiny_dir / "text.txt"),
                 "--samples", "1", "--calib-seq-len", "32", "--no-eval", "--no-progress", "--rank-multiple", "1",
                 "--out", str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("rank-deficient Gram matrix" in line for line in lines) == 1
    assert _compress(tiny_dir, tmp_path / "c", *args, "--verbose") == 0
    assert sum("rank-deficient" in r.message for r in caplog.records) == len(report["fallbacks"]["ridge"])


def test_methods_lists_every_stage(capsys):
    assert main(["methods", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert {"svdllm", "ressvd", "saes"} <= set(catalog["solver"]) and set(catalog["allocation"]) == {"uniform", "drank", "loss"}
    assert catalog["selection"]["last"]["options"]["k"] == {"default": None, "type": "an int or None"}
    assert catalog["solver"]["ressvd"]["selection"] == "last"
    assert main(["methods"]) == 0
    assert "mode='whiten_then_plain'" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["compress", "--ratio", "1.0"], "ratio must be strictly between 0 and 1"),
    (["compress", "--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["compress", "--model", "/no/such/model"], "model path not found: /no/such/model"),
    (["eval", "./missing-dir"], "model path not found"),
    (["info", "/no/such/ckpt"], "not an lrinfer checkpoint"),
])
def test_errors_are_one_line(args, message, capsys):
    assert main(args + (["--no-eval"] if args[0] == "compress" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_refuses_out_dir_of_a_different_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "lrinfer.json").write_text(json.dumps({"format": "lrinfer", "format_version": 1,
                                                  "base_model": "someone/else"}))
    assert _compress(tiny_dir, out, "--no-eval") == 2
    assert "different base" in capsys.readouterr().err
    assert (out / "lrinfer.json").is_file() and not (out / "model.safetensors").exists()


def test_flipped_byte_fails_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert _compress(tiny_dir, out, "--no-eval") == 0
    capsys.readouterr()
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    assert main(["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_kernels_inspect_json_and_dump(tmp_path, capsys):
    """`lrinfer kernels inspect` with the flags other tools call it with: the rank compress emits,
    the launcher's kernels compiled for sm_90 on the CPU, an ESTIMATE beside dense, cubin + PTX dumped."""
    from lrinfer.factors import rank_for_ratio
    from lrinfer.runtime.kernels import inspect as ki

    try:
        ki._tool("cuobjdump")
        ki._tool("ptxas")
    except Exception as e:
        pytest.skip(f"no Triton NVIDIA backend: {e}")
    argv = ["kernels", "inspect", "--in", "4096", "--out", "11008", "--ratio", "0.4", "--m", "1",
            "--dtype", "bfloat16", "--arch", "sm_90"]
    assert main(argv + ["--json", "--dump", str(tmp_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rank"] == rank_for_ratio(4096, 11008, 0.4, lrinfer.CompressConfig().rank_multiple)
    (insp,) = rep["inspections"]
    assert insp["method"] == "fused" and insp["kernels"][0]["sass"]["ldg_scalar"] == 0
    assert "ESTIMATE" in insp["estimate"]["label"] and insp["estimate"]["h100"]["dense_bytes"] == 4096 * 11008 * 2
    assert (tmp_path / "fused" / "0_fused_kernel_sm90.cubin").stat().st_size > 0
    assert "fused_kernel" in (tmp_path / "fused" / "0_fused_kernel_sm90.ptx").read_text()
    assert main(argv) == 0
    assert "ESTIMATE" in capsys.readouterr().out
    assert main(["kernels", "inspect", "--in", "4096", "--out", "11008", "--m", "1"]) == 2
    assert "exactly one of --ratio" in capsys.readouterr().err
