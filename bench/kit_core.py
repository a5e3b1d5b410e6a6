"""The GPU kit's frame (bench/gpu_kit.py): where a run writes, its deadline, and how a stage's record
starts, resumes and finishes."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from kit_report import NO_CUDA, STAGES, export, write_json  # noqa: E402

CARRY = ROOT / "out" / "gpu-kit-carry"   # what `--prepare` fills here, for the device tool to carry


def _log(msg: str) -> None:
    print(msg, flush=True)


def env_meta() -> dict:
    meta = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    try:
        import triton

        meta["triton"] = triton.__version__
        from lrinfer.runtime.kernels import fused_decode

        meta["launch"] = fused_decode.launch_features()
    except ImportError:
        meta["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sms=p.multi_processor_count, gpu_memory_GiB=round(p.total_memory / 2**30, 1))
    return meta


def gpu_slug() -> str:
    from lrinfer.runtime.kernels.configs import gpu_slug as slug

    return slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


class Kit:
    """Where a run writes, whether it is a dry run, and its deadline."""

    def __init__(self, out: Path, dry: bool, budget_s: float, force: bool = False, llama_layers: int = 4,
                 student: str | None = None, log=_log, export_dir: str | None = None):
        self.out, self.dry, self.force, self.log = Path(out), dry, force, log
        self.export_dir = Path(export_dir) if export_dir else None
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.deadline = time.monotonic() + budget_s
        self.llama_layers = llama_layers
        self.student = student
        self.out.mkdir(parents=True, exist_ok=True)

    def path(self, n: int) -> Path:
        return self.out / f"stage{n}_{STAGES[n][0]}.json"

    def load(self, n: int) -> dict | None:
        p = self.path(n)
        return json.loads(p.read_text()) if p.is_file() else None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def tuned_table(self) -> Path:
        return self.out / f"tuned-{gpu_slug()}.json"

    def save(self, rec: dict, status: str | None = None, reason: str | None = None) -> None:
        """Write the stage's JSON (as `status` while in progress) and refresh the export, so that a
        command killed at the device tool's limit still returns everything measured so far."""
        data = rec if status is None else {**rec, "status": status, "reason": reason}
        write_json(self.path(rec["stage"]), data)
        if self.export_dir is not None:
            export(self.out, self.export_dir)


def _start(kit: Kit, n: int, prev: dict | None) -> dict:
    name, title = STAGES[n]
    rec = {"stage": n, "name": name, "title": title, "status": "running", "dry_run": kit.dry,
           "device": kit.device, "env": env_meta()}
    if not kit.cuda:
        rec["gpu_measurements"] = NO_CUDA
    if prev and prev.get("status") in ("incomplete", "running", "failed") and prev.get("dry_run") == kit.dry:
        for k, v in prev.items():  # resume: keep the rows measured so far
            if k not in rec and k not in ("reason", "traceback", "started"):
                rec[k] = v
        rec["resumed"] = rec.get("resumed", 0) + 1
    rec["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return rec


def _finish(kit: Kit, rec: dict, complete: bool, t0: float, reason: str | None = None) -> dict:
    rec["seconds"] = round(rec.get("seconds", 0) * (rec.get("resumed", 0) > 0) + time.perf_counter() - t0, 1)
    if not complete:
        rec["status"] = "incomplete"
        rec["reason"] = reason or f"the --budget-s deadline came first: run stage {rec['stage']} again to continue"
    elif rec.get("status") == "running":
        rec["status"] = "dry-run" if kit.dry else "done"
        if kit.dry:
            rec.setdefault("reason", "tiny plumbing run" + ("" if kit.cuda else f"; GPU measurements {NO_CUDA}"))
    kit.save(rec)
    return rec

