"""bench/gpu_quick.py on the CPU: the dry run of every phase, the JSONL records, a phase killed by its
timeout, the budget that skips phases, and the summary and its targets.

The dry run is the real script (parent + one child process per phase) with tiny shapes: kernels
through Triton's interpreter, host-clock stand-ins for CUDA timing, every record marked dry.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_quick  # noqa: E402
import quick_report  # noqa: E402

PHASE_NAMES = [p.name for p in gpu_quick.PHASES]
RUNNER_NAMES = {"phase_start", "phase_done", "failed", "timeout", "skipped"}


def _interpreter_works() -> bool:
    """Triton 3.6's interpreter takes int() of a 1-element array, which numpy >= 2.4 refuses."""
    import numpy as np

    try:
        int(np.array([1]))
        return True
    except TypeError:
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every phase (about 40-70 s on two shared CPU cores), shared by the tests below."""
    out = tmp_path_factory.mktemp("quick")
    path = gpu_quick.run(out, budget_s=600, dry=True, echo=False)
    return out, quick_report.read_records(path)


def _of(recs, phase, name=None):
    return [r for r in recs if r["phase"] == phase and (name is None or r["name"] == name)]


def test_every_phase_runs_and_records(dry_run):
    out, recs = dry_run
    assert (out / gpu_quick.JSONL).is_file() and (out / gpu_quick.SUMMARY).is_file() and (out / gpu_quick.LOG).is_file()
    assert len({r["run"] for r in recs}) == 1
    for r in recs:
        assert r["dry"] is True, r
        assert {"phase", "name", "shape", "dtype", "variant", "value", "unit", "time", "t_rel_s", "env"} <= set(r)
    status = quick_report.phase_status(recs)
    for p in PHASE_NAMES:
        measured = [r for r in _of(recs, p) if r["name"] not in RUNNER_NAMES]
        assert measured, f"phase {p} wrote no record"
        assert status[p]["status"] == "done" or (status[p]["status"] == "failed" and not _interpreter_works()), \
            (p, status[p])
        assert all(r["env"].get("gpu") == "cpu (dry run)" for r in measured)
    # every phase that fails does so by recording its error, never silently
    for p, st in status.items():
        if st["status"] == "failed":
            assert _of(recs, p, "error"), p
    assert [r["name"] for r in _of(recs, "run")] == ["run_start", "run_end"]


def test_env_and_timings_use_the_library_ranks(dry_run):
    from lrinfer.offline.compress import CompressConfig
    from lrinfer.factors import rank_for_ratio

    _, recs = dry_run
    env = _of(recs, "env", "environment")[0]["env"]
    assert env["rank_multiple"] == CompressConfig().rank_multiple
    copy = _of(recs, "env", "copy_bandwidth")[0]
    assert copy["value"] > 0 and copy["unit"] == "GB/s" and "dry stand-in" in copy["method"]
    times = [r for p in ("decode", "prefill") for r in _of(recs, p, "time")]
    variants = {r["variant"] for r in times}
    assert {"dense", "unfused", "ours", "dense_repeat"} <= variants
    for r in times:
        s = r["shape"]
        assert s["k"] == rank_for_ratio(s["in"], s["out"], 0.4, CompressConfig().rank_multiple)
        es = 4   # float32 in the dry run
        weights = s["in"] * s["out"] * es if r["variant"].startswith("dense") else (s["in"] + s["out"]) * s["k"] * es
        assert r["bytes"] == weights + s["M"] * (s["in"] + s["out"]) * es
        assert r["value"] > 0 and r["GBps"] == pytest.approx(r["bytes"] / r["value"] / 1e3)
        assert r["copy_frac"] == pytest.approx(r["GBps"] / copy["value"])
        assert r["rel_err"] < 1e-4 and "dry stand-in" in r["timer"]
    e2e = {r["variant"]: r for r in _of(recs, "e2e", "tokens_per_s")}
    assert e2e["dense"]["value"] > 0 and e2e["lowrank_40"]["value"] > 0 and e2e["lowrank_40"]["finite_logits"]
    sp = _of(recs, "e2e", "speedup")[0]
    assert sp["value"] == pytest.approx(e2e["lowrank_40"]["value"] / e2e["dense"]["value"])


def test_dry_kernels_match_float64(dry_run):
    """Every variant in the correctness phase, the stress, graph and shared-counter stand-ins: all pass."""
    if not _interpreter_works():
        pytest.skip("Triton's interpreter fails on this numpy (>= 2.4: int() of a 1-element array), "
                    "as tests/kernels/test_triton_interpret.py does here")
    _, recs = dry_run
    corr = _of(recs, "correct")
    checks = [r for r in corr if r["name"] in ("rel_err", "error")]
    assert {(r["variant"], r["dtype"]) for r in checks} == {
        (v, d) for v in ("two_launch", "two_launch_pdl", "prefill", "fused") for d in ("float16", "float32")}
    assert all(r["name"] == "rel_err" and r["pass"] and r["all_written"] for r in checks), \
        [r.get("error") or r["value"] for r in checks if not r.get("pass")]
    assert {r["shape"].get("k2", 0) > 0 for r in checks} == {True, False}, "a residual-pair case and plain ones"
    order = [r["variant"] for r in checks]
    assert order.index("fused") > max(order.index(v) for v in ("two_launch", "two_launch_pdl", "prefill"))
    stress = _of(recs, "stress", "two_streams")[0]
    assert stress["pass"] and stress["outputs_checked"] == 2 * stress["iterations"]
    assert all(r["pass"] for r in _of(recs, "graphs", "graph_replay")) and len(_of(recs, "graphs", "graph_replay")) == 5
    assert all(r["pass"] for r in _of(recs, "shared", "shared_counters"))
    timed = {r["variant"] for r in _of(recs, "decode", "time")}
    assert {"two_launch", "two_launch_pdl", "fused"} <= timed


def test_summary_parses_the_file(dry_run, capsys):
    out, recs = dry_run
    assert gpu_quick.main(["--summarize", str(out / gpu_quick.JSONL)]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "not GPU numbers" in text
    for p in PHASE_NAMES:
        assert f"| {p} |" in text
    targets = quick_report.evaluate_targets(recs)
    assert len(targets) == 6 and all(t["status"] == "not measured" for t in targets), "dry records are no GPU numbers"
    assert (out / gpu_quick.SUMMARY).read_text() == quick_report.summarize(recs)


def test_a_killed_record_line_is_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    for name in ("a", "b"):
        quick_report.append_record(path, quick_report.make_record("r1", "env", name, 1.0, "s", dry=True, t0=0.0))
    with open(path, "a") as f:
        f.write('{"run": "r1", "phase": "env", "na')   # the kill came mid-line
    assert [r["name"] for r in quick_report.read_records(path)] == ["a", "b"]


def test_phase_killed_by_its_timeout_keeps_earlier_records(tmp_path):
    """The env child hangs after its first record (as a hung kernel would); the runner kills it at its
    timeout, records that, and goes on with the next phase."""
    path = gpu_quick.run(tmp_path, budget_s=600, dry=True, phases=["env", "e2e"], timeouts={"env": 12},
                         stall="env", echo=False)
    recs = quick_report.read_records(path)
    names = [(r["phase"], r["name"]) for r in recs]
    assert names[0] == ("run", "run_start") and ("env", "environment") in names
    assert ("env", "copy_bandwidth") not in names, "the child was stopped after its first record"
    t = _of(recs, "env", "timeout")[0]
    assert t["value"] == 12 and t["seconds"] >= 12
    assert names.index(("env", "environment")) < names.index(("env", "timeout"))
    assert _of(recs, "e2e", "phase_done") and _of(recs, "e2e", "tokens_per_s"), "the next phase still ran"
    assert quick_report.phase_status(recs)["env"]["status"] == "timeout"
    assert "| env | timeout |" in (tmp_path / gpu_quick.SUMMARY).read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_with_the_runner(tmp_path):
    """The device tool kills the command at its limit: a child (in its own session) must not outlive it."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, quick_report.STALL_ENV: "env",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    runner = subprocess.Popen([sys.executable, str(BENCH / "gpu_quick.py"), "--dry", "--phases", "env",
                               "--out", str(tmp_path), "--quiet"], env=env, stdout=subprocess.DEVNULL)
    path = tmp_path / gpu_quick.JSONL
    child = None
    for _ in range(600):
        recs = quick_report.read_records(path) if path.is_file() else []
        child = next((r["env"]["pid"] for r in recs if r["name"] == "environment"), None)
        if child or runner.poll() is not None:
            break
        time.sleep(0.1)
    assert child and _alive(child), "the env child wrote its first record and hangs"
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    survived = _alive(child)
    if survived:   # leave nothing behind, even when the test fails
        os.kill(child, signal.SIGKILL)
    assert not survived


def test_budget_skips_phases_that_cannot_fit():
    env = gpu_quick.PHASE_BY_NAME["env"]
    decode = gpu_quick.PHASE_BY_NAME["decode"]
    r = gpu_quick.RESERVE_S
    assert gpu_quick.phase_timeout(decode, 1000, dry=False) == decode.timeout_s
    assert gpu_quick.phase_timeout(decode, decode.need_s + r + 10, dry=False) == decode.need_s + 10
    assert gpu_quick.phase_timeout(decode, decode.need_s + r - 1, dry=False) is None
    assert gpu_quick.phase_timeout(env, 0, dry=False) is None
    assert gpu_quick.phase_timeout(env, env.dry_need_s + r, dry=True) == env.dry_need_s
    assert gpu_quick.phase_timeout(env, 1000, dry=True, override=7) == 7
    assert sum(p.need_s for p in gpu_quick.PHASES) <= 480 - r, "every phase can start within the default budget"


def test_no_budget_skips_every_phase(tmp_path):
    path = gpu_quick.run(tmp_path, budget_s=gpu_quick.RESERVE_S + 1, dry=True, echo=False)
    recs = quick_report.read_records(path)
    skipped = [r for r in recs if r["name"] == "skipped"]
    assert [r["phase"] for r in skipped] == PHASE_NAMES
    assert not [r for r in recs if r["name"] == "phase_start"]
    assert all("left before the deadline" in r["reason"] for r in skipped)


def _timing(phase, i, o, k, M, variant, us, copy_frac=None):
    return {"run": "g", "phase": phase, "name": "time", "variant": variant, "dtype": "bfloat16", "dry": False,
            "shape": {"M": M, "in": i, "out": o, "k": k}, "value": us, "unit": "us", "copy_frac": copy_frac}


def test_targets_met_and_missed_from_gpu_records():
    recs = [_timing("decode", 4096, 4096, 1232, 1, "dense", 30.0), _timing("decode", 4096, 4096, 1232, 1, "ours", 20.0, 0.85),
            _timing("decode", 4096, 4096, 1232, 1, "unfused", 25.0),
            _timing("decode", 4096, 11008, 1792, 1, "dense", 40.0), _timing("decode", 4096, 11008, 1792, 1, "ours", 35.0, 0.6),
            _timing("decode", 4096, 11008, 1792, 1, "unfused", 30.0), _timing("decode", 4096, 11008, 1792, 1, "fused", 25.0),
            {"run": "g", "phase": "e2e", "name": "speedup", "value": 1.5, "dry": False, "layers": 32}]
    t = {x["target"].split(":")[0]: x for x in quick_report.evaluate_targets(recs)}
    assert t["decode M=1, 40%, 4096→4096"]["status"] == "met" and t["decode M=1, 40%, 4096→4096"]["value"] == 1.5
    miss = t["decode M=1, 40%, 4096→11008"]
    assert miss["status"] == "missed" and miss["value"] == pytest.approx(40 / 35) and "fused 1.60×" in miss["note"]
    bw = t["decode M=1, rank ≥ 1024"]
    assert bw["status"] == "missed" and bw["value"] == 0.6 and "4096→11008" in bw["note"]
    assert t["every case"]["status"] == "missed" and t["every case"]["value"] == pytest.approx(30 / 35)
    assert t["end to end, Llama-2-7B shape, 40%, batch 1, CUDA graphs"]["status"] == "met"
    assert t["prefill M=8192, 40%"]["status"] == "not measured"
    text = quick_report.summarize(recs)
    assert "DRY" not in text and "| 4096→11008 | 1792 | 1 | fused | 25.0 | 1.60 | 1.20 |" in text
