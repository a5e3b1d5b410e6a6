"""bench/gpu_kit.py on the CPU: every stage's tiny dry run, resuming, deadlines, failures, targets.

The kit's real runs need the GPU machine; here each stage runs its tiny version (tiny shapes, the
torch path, a tiny student) so that the plumbing is known to work and the GPU-only measurements
say why they were skipped.
"""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_kit  # noqa: E402

CUDA = torch.cuda.is_available()


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def dry_dir(tmp_path_factory):
    """One dry run of every stage (about 15 s on one CPU core), shared by the tests below."""
    out = tmp_path_factory.mktemp("kit")
    exp = tmp_path_factory.mktemp("export")
    res = gpu_kit.run(list(gpu_kit.STAGES), out, dry=True, budget_s=600, log=_quiet, export_dir=str(exp))
    return out, exp, res


def _load(out, n):
    return json.loads((out / f"stage{n}_{gpu_kit.STAGES[n][0]}.json").read_text())


def _copy(src, tmp_path):
    dst = tmp_path / "kit"
    shutil.copytree(src, dst)
    return dst


def test_every_stage_dry_runs(dry_dir):
    out, exp, res = dry_dir
    for n in gpu_kit.STAGES:
        rec = _load(out, n)
        assert rec["status"] == "dry-run", (n, rec.get("reason"), rec.get("traceback"))
        assert rec["dry_run"] and rec["env"]["torch"] == torch.__version__
        if not CUDA:
            assert rec["gpu_measurements"] == gpu_kit.NO_CUDA
    s1 = _load(out, 1)
    assert s1["counts"].get("failed", 0) == 0 and "-m gpu" in s1["command"]
    if not CUDA:
        assert "needs a CUDA device" in s1["reason"]
    s2 = _load(out, 2)
    kinds = {r.get("tag") for r in s2["rows"]}
    assert kinds == {"", "compile"}
    for r in s2["rows"]:
        assert "us" in r["results"]["ours"], r
        if not CUDA:
            for v in ("fused", "two_launch", "two_launch_pdl"):
                if v in r["results"]:
                    assert r["results"][v] == {"skipped": gpu_kit.NO_CUDA}
    s3 = _load(out, 3)
    assert s3["tune"]["complete"] and (out / s3["tuned_table"]).is_file()
    assert {r["tag"] for r in s3["rows"]} == {"tuned"}
    s4 = _load(out, 4)
    assert {(r["reduction"], r["batch"]) for r in s4["rows"]} == {(0.0, 1), (0.0, 2), (0.4, 1), (0.4, 2)}
    for r in s4["rows"]:
        assert r["finite_logits"] and r["eager_tokens_per_s"] > 0
        if r["reduction"]:
            assert max(r["layer_rel_err"].values()) < 1e-4  # fp32 torch path vs float64
    s5 = _load(out, 5)
    assert s5["student"]["status"] == "done" and s5["student"]["cpu"]["ppl_dense"] > 1
    assert s5["llama"]["wall_s"] > 0
    if not CUDA:
        assert s5["student"]["gpu"] == gpu_kit.NO_CUDA and s5["llama"]["peak_GiB"] == gpu_kit.NO_CUDA


def test_summary_lists_every_target_unmeasured(dry_dir):
    out, exp, _ = dry_dir
    text = (out / "summary.md").read_text()
    for needle in ("≥ 1.30×", "≥ 1.45×", "≥ 80%", "unfused/ours", "≥ 1.35×", "≥ 1.40×", "within 1%"):
        assert needle in text
    assert text.count("not measured") == 7 and "Dry run only" in text
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["targets"]) == 7 and all(t["met"] is None for t in summary["targets"])


def test_export_packs_the_folder(dry_dir):
    out, exp, _ = dry_dir
    with tarfile.open(exp / "gpu-kit.tgz") as tar:
        names = set(tar.getnames())
    assert {"summary.md", "stage1_tests.json", "stage5_compress.json"} <= names
    assert (exp / "summary.md").is_file() and not list(exp.glob("*.tmp"))


def test_rerun_keeps_finished_stages_and_force_reruns(dry_dir, tmp_path):
    out = _copy(dry_dir[0], tmp_path)
    before = (out / "stage4_e2e.json").read_text()
    msgs = []
    gpu_kit.run([4], out, dry=True, budget_s=600, log=msgs.append)
    assert any("kept" in m for m in msgs) and (out / "stage4_e2e.json").read_text() == before
    msgs = []
    gpu_kit.run([4], out, dry=True, budget_s=600, force=True, log=msgs.append)
    assert not any("kept" in m for m in msgs) and (out / "stage4_e2e.json").read_text() != before


def test_incomplete_sweep_resumes_without_remeasuring(dry_dir, tmp_path):
    out = _copy(dry_dir[0], tmp_path)
    rec = _load(out, 2)
    full = len(rec["rows"])
    rec["rows"] = rec["rows"][:2]
    rec["status"], rec["reason"] = "incomplete", "the --budget-s deadline came first"
    (out / "stage2_sweep.json").write_text(json.dumps(rec))
    gpu_kit.run([2], out, dry=True, budget_s=600, log=_quiet)
    new = _load(out, 2)
    assert new["status"] == "dry-run" and new["resumed"] == 1 and "reason" in new
    assert len(new["rows"]) == full
    assert new["rows"][:2] == rec["rows"]  # kept, not measured again


def test_deadline_leaves_stage_incomplete_then_resumable(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = gpu_kit.Kit.expired

    def expired(self):
        calls["n"] += 1
        return calls["n"] > 3  # the run may start, then the deadline passes after two cases

    monkeypatch.setattr(gpu_kit.Kit, "expired", expired)
    gpu_kit.run([2], tmp_path, dry=True, budget_s=600, log=_quiet)
    rec = _load(tmp_path, 2)
    assert rec["status"] == "incomplete" and "--budget-s" in rec["reason"]
    assert 0 < len(rec["rows"]) < 5
    monkeypatch.setattr(gpu_kit.Kit, "expired", orig)
    gpu_kit.run([2], tmp_path, dry=True, budget_s=600, log=_quiet)
    rec2 = _load(tmp_path, 2)
    assert rec2["status"] == "dry-run" and len(rec2["rows"]) == 5 and rec2["rows"][:len(rec["rows"])] == rec["rows"]


def test_stage_failure_is_recorded_and_retried(tmp_path, monkeypatch):
    def boom(kit, prev):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setitem(gpu_kit.RUNNERS, 4, boom)
    gpu_kit.run([4], tmp_path, dry=True, budget_s=600, log=_quiet)
    rec = _load(tmp_path, 4)
    assert rec["status"] == "failed" and "simulated CUDA error" in rec["reason"] and "traceback" in rec
    assert "| 4 e2e | failed" in (tmp_path / "summary.md").read_text()
    monkeypatch.undo()
    msgs = []
    gpu_kit.run([4], tmp_path, dry=True, budget_s=600, log=msgs.append)
    assert not any("kept" in m for m in msgs) and _load(tmp_path, 4)["status"] == "dry-run"


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom">tb</failure></testcase>'
                   '<testcase classname="a" name="sk"><skipped message="needs a CUDA device"/></testcase>'
                   '</testsuite></testsuites>')
    r = gpu_kit.parse_junit(xml)
    assert r["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert r["failures"] == [{"test": "a::bad", "message": "boom"}]
    assert r["skip_reasons"] == {"needs a CUDA device": 1}


# ----------------------------------------------------------------------------- targets


def _row(i, o, red, M, dense, unfused, ours, k=2000, copy_frac=None, tag=""):
    res = {"dense": {"us": dense}, "unfused": {"us": unfused}, "ours": {"us": ours}}
    if copy_frac is not None:
        res["ours"]["copy_frac"] = copy_frac
    return {"model": "m", "in": i, "out": o, "reduction": red, "k": k, "M": M, "tag": tag,
            "method_ours": "fused", "results": res}


def _write(out, n, rec):
    rec = {"stage": n, "status": "done", "dry_run": False, **rec}
    (out / f"stage{n}_{gpu_kit.STAGES[n][0]}.json").write_text(json.dumps(rec))


def test_targets_met_and_missed(tmp_path):
    rows2 = [
        _row(4096, 4096, 0.4, 1, 13.0, 12.0, 10.0, copy_frac=0.85),     # 1.30× dense: met
        _row(4096, 11008, 0.4, 1, 30.0, 25.0, 21.0, copy_frac=0.79),    # 1.43×: missed; 79% copy: missed
        _row(4096, 4096, 0.4, 8192, 400.0, 300.0, 280.0),               # prefill 1.43×
        _row(4096, 11008, 0.4, 8192, 900.0, 700.0, 700.0),              # prefill 1.29×: missed
        _row(4096, 4096, 0.2, 64, 20.0, 18.0, 19.0, k=512),             # slower than unfused
        _row(4096, 4096, 0.4, 1, 1.0, 1.0, 1.0, tag="compile"),         # compile subset: ignored
    ]
    _write(tmp_path, 2, {"rows": rows2, "roofline": {"copy_GBps": 4300.0}})
    # stage 3's tuned sweep replaces the 4096→11008 M=1 case: 1.50× and 81%
    _write(tmp_path, 3, {"rows": [_row(4096, 11008, 0.4, 1, 30.0, 25.0, 20.0, copy_frac=0.81, tag="tuned")]})
    _write(tmp_path, 4, {"rows": [{"reduction": 0.0, "batch": 1, "graph_tokens_per_s": 100.0},
                                  {"reduction": 0.4, "batch": 1, "graph_tokens_per_s": 145.0,
                                   "graph_speedup_vs_dense": 1.45, "eager_speedup_vs_dense": 1.1}]})
    _write(tmp_path, 5, {"student": {"cpu": {"ppl_dense": 95.0, "ppl_compressed": 120.0},
                                     "gpu": {"ppl_dense": 95.2, "ppl_compressed": 121.5},
                                     "rel_diff_dense": 0.2 / 95, "rel_diff_compressed": 1.5 / 120}})
    t1, t2, copy_bw, never_slower, prefill, e2e, student = gpu_kit.evaluate_targets(tmp_path)
    assert t1["met"] is True and t1["value"] == pytest.approx(1.3) and t1["source"] == "stage 2"
    assert t2["met"] is True and t2["value"] == pytest.approx(1.5) and "stage 3" in t2["source"]
    assert copy_bw["met"] is True and copy_bw["value"] == pytest.approx(0.81)  # the tuned 81% replaced 79%
    assert never_slower["met"] is False and "M=64" in never_slower["note"]
    assert prefill["met"] is False and prefill["value"] == pytest.approx(900 / 700)
    assert e2e["met"] is True and e2e["value"] == pytest.approx(1.45)
    assert student["met"] is False and student["value"] == pytest.approx(1.5 / 120)
    text = gpu_kit.write_summary(tmp_path)
    assert "**NO**" in text and "**yes**" in text and "Dry run only" not in text


def test_cli_summary_and_arguments(tmp_path, capsys):
    assert gpu_kit.main(["--summary", "--out", str(tmp_path)]) == 0
    assert "| 1 tests | not run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_kit.main(["--out", str(tmp_path)])  # neither --stage nor --all
