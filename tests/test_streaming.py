"""Block streaming: a model from a safetensors directory built on meta, one decoder block loaded at a time,
gives the same factors, checkpoint and perplexity as the in-memory path, resumes, and keeps host memory
below the in-memory run's."""
import json
import os
import subprocess
import sys

import pytest
import torch
from ._tiny import tiny_checkpoint, tiny_llama
from safetensors.torch import load_file

import lrinfer
from lrinfer.factors import unflatten_factors
from lrinfer.runtime.streaming import (checkpoint_streamer, load_streamed, save_streamed_checkpoint, streamable_dir,
                                       streamer_of, write_safetensors)
from lrinfer.evaluation.perplexity import perplexity as streamed_perplexity


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    tiny_llama(layers=3, seed=2).save_pretrained(path)
    return path


def _factors(work_dir):
    out = {}
    for f in sorted(os.listdir(work_dir)):
        if f.startswith("block_"):
            out.update(unflatten_factors(load_file(os.path.join(work_dir, f))))
    return out


@pytest.mark.parametrize("method", ["svdllm", "saes"])
def test_streamed_matches_in_memory(model_dir, calib_ids, tmp_path, method):
    cfg = lrinfer.CompressConfig(method=method, ratio=0.3, batch_size=4)
    dense = tiny_llama(layers=3, seed=2)
    ref = lrinfer.compress(dense, cfg, calib_ids, progress=False)

    model = load_streamed(model_dir)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    result = lrinfer.compress(model, cfg, calib_ids, progress=False, work_dir=tmp_path / "work")
    assert result.streamed and result.factors == {} and result.ranks == ref.ranks
    assert result.hidden_error == ref.hidden_error
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())   # every block freed again
    got = _factors(result.work_dir)
    for name, pair in ref.factors.items():
        for k, t in pair.tensors().items():
            assert torch.equal(got[name].tensors()[k], t), (name, k)

    qc = {"method": method, "ratio": 0.3, "ranks": result.ranks}
    out = save_streamed_checkpoint(model, None, tmp_path / "ck", qc, "tiny", result.work_dir)
    loaded, _ = lrinfer.load_checkpoint(out)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=0, atol=0)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    assert (streamed_perplexity(model, windows, 2, False, checkpoint_streamer(model, out))["ppl"]
            == lrinfer.perplexity(dense, windows, 2, False)["ppl"])


def test_streamed_dense_perplexity(model_dir):
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(4))
    assert (streamed_perplexity(load_streamed(model_dir), windows, 2, False)
            == lrinfer.perplexity(tiny_llama(layers=3, seed=2), windows, 2, False))


def test_streamed_resume_matches_one_run(model_dir, calib_ids, tmp_path, monkeypatch):
    cfg = lrinfer.CompressConfig(method="saes", ratio=0.4, batch_size=4)
    one = lrinfer.compress(load_streamed(model_dir), cfg, calib_ids, progress=False, work_dir=tmp_path / "one")
    model = load_streamed(model_dir)
    release = type(streamer_of(model)).release_block

    def crash(self, i):
        release(self, i)
        if i == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(type(streamer_of(model)), "release_block", crash)
    with pytest.raises(KeyboardInterrupt):
        lrinfer.compress(model, cfg, calib_ids, progress=False, work_dir=tmp_path / "two")
    monkeypatch.undo()
    model = load_streamed(model_dir)
    two = lrinfer.compress(model, cfg, calib_ids, progress=False, work_dir=tmp_path / "two", resume=True)
    assert two.ranks == one.ranks and two.hidden_error == one.hidden_error
    assert len(two.bytes_written) == 3 and all(b > 0 for b in two.bytes_written)
    a, b = _factors(one.work_dir), _factors(two.work_dir)
    assert all(torch.equal(a[n].U, b[n].U) and torch.equal(a[n].V, b[n].V) for n in a)


def test_what_streams(model_dir, tmp_path, calib_ids):
    (tmp_path / "bin").mkdir()                                      # weights that are not safetensors
    (tmp_path / "bin" / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    assert streamable_dir(model_dir) and not streamable_dir(tmp_path / "bin")
    _, ck, _ = tiny_checkpoint(tmp_path / "ck")
    assert not streamable_dir(ck)                                    # an lrinfer checkpoint loads whole
    with pytest.raises(lrinfer.LrinferError, match="cannot stream"):
        lrinfer.compress(load_streamed(model_dir), lrinfer.CompressConfig(method="fwsvd"), calib_ids,
                         progress=False)


def test_write_safetensors_reads_back(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                      tensors.__getitem__, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_streamed_cli_peak_rss_below_in_memory(tmp_path, tiny_hf_dir):
    """A 134 MB (float32) model: compressed from its directory one block at a time, the process's peak
    RSS stays below the in-memory run's by at least half the decoder weights."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    text = "the quick brown fox jumps over the lazy dog. " * 400
    root = tiny_hf_dir(tmp_path, text, layers=8, hidden=512, intermediate=2048)
    weights = 8 * (4 * 512 * 512 + 3 * 512 * 2048) * 4
    peaks = {}
    for mode in ("stream", "no-stream"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "lrinfer.cli", "compress", "--model", str(root / "model"), "--method", "svd",
               "--modules", "down_proj", "--ratio", "0.9", "--calib", str(root / "text.txt"), "--samples", "2",
               "--calib-seq-len", "16", "--out", str(out), "--no-eval", "--no-progress", "--json"]
        proc = subprocess.run(cmd + (["--no-stream"] if mode == "no-stream" else []), capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report["streamed"] == (mode == "stream")
        peaks[mode] = report["peak_host_bytes"]
    assert peaks["stream"] < peaks["no-stream"] - weights / 2, {k: v / 2**20 for k, v in peaks.items()}
