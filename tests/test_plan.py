"""The memory plan: its terms from a config alone, its choice of where the streams live, and its one-line
refusal before any weight is read."""
import json
from pathlib import Path

import pytest

import lrinfer
from lrinfer.cli import main
from lrinfer.offline.plan import GiB, estimate, read_config

CONFIGS = Path(__file__).resolve().parents[1] / "bench" / "configs"


def test_terms_of_a_small_config():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True}
    p = estimate(cfg, n_samples=8, seq_len=32, batch_size=4, dtype="float32", method="svdllm")
    block = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert p.block == block * 4 and p.outside == (100 * 64 + 64) * 4
    assert p.streams == 3 * 8 * 32 * 64 * 4
    assert p.statistics == (3 * 64 * 64 + 128 * 128) * 8             # q/k/v, o, gate/up, down: one Gram each
    saes = estimate(cfg, n_samples=8, seq_len=32, batch_size=4, dtype="float32", method="saes")
    assert saes.statistics == 2 * 128 * 128 * 8                       # one stage at a time, Ĝ and the cross term
    whole = estimate(cfg, n_samples=8, seq_len=32, batch_size=4, dtype="float32", streaming=False)
    assert whole.block == 4 * p.block and whole.device_peak > p.device_peak


def test_streams_go_to_the_host_when_the_device_is_short():
    cfg = read_config(CONFIGS / "llama-2-70b.json")
    kw = dict(n_samples=256, seq_len=2048, dtype="float16", device="cuda", host_free=256 * GiB)
    roomy = estimate(cfg, device_free=80 * GiB, **kw)
    tight = estimate(cfg, device_free=40 * GiB, **kw)
    assert roomy.streams_on == "device" and tight.streams_on == "host" and tight.fits
    assert tight.device_peak == roomy.device_peak - roomy.streams


def test_refusal_names_what_would_fit():
    cfg = read_config(CONFIGS / "llama-2-70b.json")
    p = estimate(cfg, n_samples=256, seq_len=2048, dtype="float16", device="cuda", device_free=40 * GiB,
                 host_free=64 * GiB, streams="device")
    with pytest.raises(lrinfer.LrinferError) as e:
        p.check()
    msg = str(e.value)
    assert "\n" not in msg and "on cuda but 40.00 GiB is available" in msg
    assert "streams on the host (--streams host)" in msg and "--samples 128" in msg


def test_compress_refuses_before_loading_weights(tmp_path, capsys):
    """A 70B-shaped directory with no weights at all: the plan refuses on this machine's memory before
    anything is read (the directory has no tensors to read)."""
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "llama-2-70b.json").read_text())
    (model / "model.safetensors").write_bytes(b"")   # never opened
    rc = main(["compress", "--model", str(model), "--device", "cpu", "--calib-seq-len", "4096", "--samples", "4096",
               "--out", str(tmp_path / "out"), "--no-eval", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: the memory plan needs"), err
    assert not (tmp_path / "out").exists()


def test_plan_command_prints_from_a_config(capsys):
    assert main(["plan", "--config", str(CONFIGS / "llama-2-70b.json"), "--device-memory", "80",
                 "--host-memory", "256", "--calib-seq-len", "2048", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["streaming"] and plan["streams_on"] == "device"
    assert 20 * GiB < plan["device_peak"] < 80 * GiB


def test_a_search_plans_for_its_largest_candidate(tmp_path):
    """`--method auto` is planned at the peak of its dearest candidate (KFAC's output-gradient Grams, the
    whole model), not at the base config's; the plan names it."""
    from lrinfer.pipeline import CompressJob, SearchOptions, _candidates, _largest_plan
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "llama-2-7b.json").read_text())
    base = lrinfer.CompressConfig(ratio=0.2)

    def plan(search=None):
        job = CompressJob(model=str(model), config=base, search=search)
        return _largest_plan(job, _candidates(job), device="cpu", dtype=None, stream=False)
    plain, search, only_svdllm = plan(), plan(SearchOptions()), plan(SearchOptions(candidates=["svdllm"]))
    assert plain.method == "svdllm" and search.method in ("kfac", "kfac-saes")
    assert search.device_peak > plain.device_peak and "largest candidate" in search.notes[-1]
    assert only_svdllm.device_peak == plain.device_peak
