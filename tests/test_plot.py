"""`lrinfer plot`: PNG files from a tiny checkpoint; a one-line ImportError without matplotlib."""
import argparse
import json
import sys

import pytest
import torch

import lrinfer
from lrinfer.evaluation import plot


@pytest.fixture
def checkpoint(tmp_path, make_tiny):
    make_tiny(layers=3).save_pretrained(tmp_path / "dense")  # the dense model, for the spectra
    model = make_tiny(layers=3)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.3), ids, progress=False)
    path = lrinfer.save_checkpoint(model, None, tmp_path / "ck", {"method": "svd", "ratio": 0.3,
                                                                  "ranks": result.ranks}, base_model="tiny")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"method": "dense", "ratio": 0.0, "ppl": 12.0}] + [
        {"method": m, "ratio": r, "ppl": p} for m, r, p in
        [("svd", 0.2, 40.0), ("svd", 0.4, 400.0), ("svdllm", 0.2, 15.0), ("svdllm", 0.4, 22.0)]]))
    return path, tmp_path / "dense", results


def _args(argv):
    parser = argparse.ArgumentParser()
    plot.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_plot_writes_pngs(checkpoint, tmp_path):
    path, dense, results = checkpoint
    report = plot.run(_args(["plot", str(path), "--model", str(dense), "--results", str(results),
                             "--out", str(tmp_path / "png")]))
    names = sorted(p.rsplit("/", 1)[-1] for p in report["files"])
    assert names == ["ppl.png", "ranks.png", "spectra.png"] and report["skipped"] == {}
    for f in report["files"]:
        data = open(f, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_spectra_skipped_when_the_dense_model_is_missing(checkpoint):
    path, _, _ = checkpoint  # base_model "tiny" is not loadable
    report = plot.plot_checkpoint(path)
    assert [p.rsplit("/", 1)[-1] for p in report["files"]] == ["ranks.png"]
    assert "pass --model" in report["skipped"]["spectra.png"]


def test_methods_table_json_is_accepted(tmp_path):
    f = tmp_path / "runs.json"
    f.write_text(json.dumps({"runs": [{"spec": "svd", "method": "svd", "ratio": 0.2, "ppl": 50.0},
                                      {"spec": "dense", "method": "dense", "ratio": 0.0, "ppl": 30.0}]}))
    assert len(plot.read_results(f)) == 2
    assert plot.plot_ppl(plot.read_results(f), tmp_path / "p.png").stat().st_size > 0


def test_missing_matplotlib_is_a_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^lrinfer plot needs matplotlib: pip install 'lrinfer\[plot\]'$"):
        plot._pyplot()
