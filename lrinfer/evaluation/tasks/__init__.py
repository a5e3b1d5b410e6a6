"""Offline zero-shot task definitions for lm-eval.

The YAML files in this folder are lm-eval task configs (use the folder as
lm-eval's ``include_path``).  They read their data from a local ``data_dir``
handed to them as task metadata instead of downloading it from a hub.

``piqa``: PIQA validation split (1,838 questions) from
``<data_dir>/piqa/valid.jsonl`` (``{"goal", "sol1", "sol2"}`` per line) and
``<data_dir>/piqa/valid-labels.lst`` (``0`` or ``1`` per line, aligned).
Prompt, choices, target and metrics are those of lm-eval's stock ``piqa``.

This module only needs the standard library until :func:`load_piqa` is called
by lm-eval (which then imports ``datasets``, an lm-eval dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parent

#: local task name -> files it needs, relative to data_dir
LOCAL_TASKS: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
}


def task_files(task: str, data_dir: str | Path) -> list[Path]:
    """The data files of a local task, checked to exist.

    Raises ``ValueError`` for a task that is not local, ``FileNotFoundError``
    naming every missing file.
    """
    if task not in LOCAL_TASKS:
        raise ValueError(
            f"unknown zero-shot task {task!r}; local tasks: {', '.join(sorted(LOCAL_TASKS))}, chat"
        )
    paths = [Path(data_dir) / rel for rel in LOCAL_TASKS[task]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"zero-shot task {task!r} needs {', '.join(missing)} (data_dir={str(data_dir)!r})"
        )
    return paths


def read_piqa(data_dir: str | Path) -> list[dict[str, Any]]:
    """PIQA validation rows ``{"goal", "sol1", "sol2", "label"}`` in file order."""
    jsonl, labels = task_files("piqa", data_dir)
    with open(jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(labels, encoding="utf-8") as f:
        labs = [line.strip() for line in f if line.strip()]
    if len(rows) != len(labs):
        raise ValueError(f"{jsonl} has {len(rows)} questions but {labels} has {len(labs)} labels")
    out = []
    for i, (row, lab) in enumerate(zip(rows, labs)):
        if lab not in ("0", "1"):
            raise ValueError(f"{labels}:{i + 1}: label must be 0 or 1, got {lab!r}")
        missing = {"goal", "sol1", "sol2"} - row.keys()
        if missing:
            raise ValueError(f"{jsonl}:{i + 1}: missing field(s) {sorted(missing)}")
        out.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(lab)})
    return out


def load_piqa(data_dir: str | Path | None = None, **_metadata: Any):
    """lm-eval ``custom_dataset`` hook: ``DatasetDict({"validation": ...})``.

    lm-eval calls it with the task's metadata as keyword arguments; only
    ``data_dir`` is used.
    """
    if data_dir is None:
        raise ValueError(
            "the local 'piqa' task needs metadata data_dir (the folder holding piqa/valid.jsonl)"
        )
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_piqa(data_dir))})
