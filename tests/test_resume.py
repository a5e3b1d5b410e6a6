"""A compression killed with SIGKILL at random points resumes to the same bytes as one run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom. " * 4 +
        "Call me Ishmael. Some years ago, never mind how long precisely. ") * 80


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_hf_dir):
    return tiny_hf_dir(tmp_path_factory.mktemp("model_dir"), TEXT, layers=8, hidden=96, intermediate=256)


def _cmd(root, out, method, *extra):
    return [sys.executable, "-m", "lrinfer.cli", "compress", "--model", str(root / "model"), "--method", method,
            "--ratio", "0.4", "--calib", str(root / "text.txt"), "--samples", "16", "--calib-seq-len", "64",
            "--batch-size", "4", "--out", str(out), "--no-eval", "--no-progress", *extra]


def _env():
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


def _state(out):
    try:
        return json.loads((out.parent / f".{out.name}.work" / "state.json").read_text())["next_block"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("method", ["svdllm", "saes"])
def test_sigkill_and_resume_matches_uninterrupted(model_dir, tmp_path, method):
    from lrinfer.offline.solvers.base import SOLVERS
    if method not in SOLVERS:
        pytest.skip(f"{method} not available")
    ref = tmp_path / "ref"
    subprocess.run(_cmd(model_dir, ref, method), check=True, env=_env(), capture_output=True)
    out = tmp_path / "out"
    rng = random.Random(1234)
    kills, first = 0, True
    for target in sorted(rng.sample(range(0, 8), 3)):
        proc = subprocess.Popen(_cmd(model_dir, out, method, *([] if first else ["--resume"])),
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = False
        deadline = time.time() + 120
        while _state(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))          # somewhere inside the next block (or its writes)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not (out / "model.safetensors").exists() or proc.returncode == 0  # never a partial checkpoint
    subprocess.run(_cmd(model_dir, out, method, "--resume"), check=True, env=_env(), capture_output=True)
    assert kills >= 2
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not (tmp_path / ".out.work").exists()


def test_resume_refuses_progress_of_another_run(model_dir, tmp_path):
    import lrinfer
    from lrinfer.offline.resume import WorkDir
    model, tok, _ = lrinfer.load_model(str(model_dir / "model"))
    calib = torch.randint(0, 300, (4, 32))
    lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=0.4), calib, progress=False,
                     work_dir=tmp_path / "work")
    model2, _, _ = lrinfer.load_model(str(model_dir / "model"))
    with pytest.raises(lrinfer.LrinferError, match="different compression"):
        lrinfer.compress(model2, lrinfer.CompressConfig(method="svd", ratio=0.3), calib, progress=False,
                         work_dir=tmp_path / "work", resume=True)
    assert WorkDir(tmp_path / "work", "x").path.is_dir()
