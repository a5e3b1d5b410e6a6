"""Zero-shot accuracy of an already-loaded (possibly compressed) causal LM.

Runs tasks through lm-eval's Python API (``lm_eval.simple_evaluate``) with the
model *object* wrapped in ``HFLM``, so patched models (``nn.Linear`` replaced by
low-rank modules) are scored as they are in memory.

Offline tasks (``data_dir`` given): the task definitions shipped in
``lrinfer/evaluation/tasks`` are used, and only they: ``piqa`` there is lm-eval's stock
``piqa`` (same prompt ``Question: {goal}\\nAnswer:``, choices ``[sol1, sol2]``,
target, acc and acc_norm) read from ``<data_dir>/piqa/valid.jsonl`` +
``valid-labels.lst`` instead of the hub.  With ``data_dir=None`` task names go
to lm-eval unchanged (its stock tasks, which download their data).

Naming: the offline task is called ``piqa`` (not ``piqa_local``) so the same
``--tasks piqa`` means the same scoring with or without ``data_dir``; only
``source`` in the result tells where the questions came from.  The task folder
also works with the lm-eval CLI (its ``piqa`` then overrides the stock one)::

    lm_eval --include_path <lrinfer>/tasks --metadata '{"data_dir": "..."}' --tasks piqa ...

``chat`` is not an lm-eval task: it is lrinfer's own generative chat evaluation
(:func:`lrinfer.evaluation.chat.evaluate_chat`: questions shipped in the package, greedy
answers through the chat template, contains-the-answer scoring, empty answers
counted); it needs neither lm-eval nor ``data_dir``.

lm-eval is an optional extra (``pip install 'lrinfer[eval]'``); it is imported
only when :func:`evaluate_tasks` runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator

from .tasks import LOCAL_TASKS, TASK_DIR, task_files

__all__ = ["evaluate_tasks", "LOCAL_TASKS", "CHAT_TASK"]

CHAT_TASK = "chat"   # lrinfer.evaluation.chat.evaluate_chat, not an lm-eval task

_MISSING_LM_EVAL = "zero-shot tasks need lm-eval: pip install 'lrinfer[eval]'"

# lm-eval warnings that are expected when passing a model object / a
# custom_dataset task, and say nothing useful to our users.
_NOISE = (
    "`pretrained` model kwarg is not of type `str`",
    "Custom kwargs can be passed to `--metadata`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


@contextlib.contextmanager
def _quiet_lm_eval(desc: str, progress: bool = True) -> Iterator[None]:
    """Silence lm-eval's INFO logging and its secondary progress bars.

    lm-eval (0.4.13) shows three tqdm bars per run: one while building the
    task's requests (lm_eval.api.task), one while tokenizing them
    (lm_eval.api.model) and one over the model calls ("Running loglikelihood
    requests", lm_eval.models.huggingface; one tick per (question, choice)
    request, all tasks of the call together).  Only the last is kept, relabelled
    ``desc`` (or disabled too with ``progress=False``); the others are disabled by swapping the module-level ``tqdm``
    names for the duration of the call.  The ``lm_eval`` logger is set to
    WARNING meanwhile; warnings other than the known noise above still reach
    the log.
    """
    from tqdm.auto import tqdm as _tqdm

    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface

    def _no_bar(*args: Any, **kwargs: Any):
        kwargs["disable"] = True  # overrides lm-eval's own disable=...
        return _tqdm(*args, **kwargs)

    def _main_bar(*args: Any, **kwargs: Any):
        kwargs["desc"] = desc
        kwargs.setdefault("unit", "req")
        if not progress:
            kwargs["disable"] = True
        return _tqdm(*args, **kwargs)

    patches = [
        (lm_eval.api.task, _no_bar),
        (lm_eval.api.model, _no_bar),
        (lm_eval.models.huggingface, _main_bar),
    ]
    saved = [(mod, getattr(mod, "tqdm", None)) for mod, _ in patches]
    # simple_evaluate also records `git describe` of the cwd (a subprocess
    # whose stderr leaks "fatal: ..." outside a git checkout) and torch's
    # collect_env (pip list and friends, ~2 s a call); we report neither
    stubs = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    saved_fns = {k: getattr(lm_eval.evaluator, k) for k in stubs if hasattr(lm_eval.evaluator, k)}
    logger = logging.getLogger("lm_eval")
    old_level = logger.level
    flt = _DropNoise()
    try:
        for mod, new in patches:
            if hasattr(mod, "tqdm"):
                mod.tqdm = new
        for k in saved_fns:
            setattr(lm_eval.evaluator, k, stubs[k])
        logger.setLevel(logging.WARNING)
        # a logger's filter sees only records logged on it (not propagated
        # ones), so it goes on each of lm-eval's module loggers
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("lm_eval."):
                logging.getLogger(name).addFilter(flt)
        yield
    finally:
        for mod, old in saved:
            if old is not None:
                mod.tqdm = old
        for k, fn in saved_fns.items():
            setattr(lm_eval.evaluator, k, fn)
        logger.setLevel(old_level)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("lm_eval."):
                logging.getLogger(name).removeFilter(flt)


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it has no stderr
        return math.nan


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: Path | None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
    chat_records: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of ``model`` on ``tasks``.

    Args:
        model: a loaded ``transformers`` causal LM (patched modules allowed); it
            is moved to ``device`` if it is not there, and put in eval mode.
        tokenizer: its tokenizer.
        tasks: task names.  With ``data_dir``: local tasks only (see
            ``LOCAL_TASKS``: ``piqa``); without: any lm-eval task name.
        data_dir: folder holding the offline data (``<data_dir>/piqa/...``), or
            None to let lm-eval fetch its stock tasks from the network.
        limit: score only the first ``limit`` questions of each task.
        batch_size: requests per forward pass.
        device: where to run.
        progress: show the one progress bar (ticks per (question, choice)
            request, all tasks together); lm-eval's other bars and INFO logs
            are always silenced.
        chat_records: the ``chat`` task's result also holds each question's
            answer and verdict (``records``).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
        "source", "limit"}}``; ``n`` is the number of questions scored,
        ``source`` the data file (or ``"hf"`` for a stock lm-eval task).
        ``chat``: see :func:`lrinfer.evaluation.chat.evaluate_chat` (acc, acc_stderr,
        correct, empty, wrong, n, ...).

    Raises:
        ImportError: lm-eval is not installed.
        ValueError: a task name is unknown.
        FileNotFoundError: a local task's data file is missing.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"no tasks given; local tasks: {', '.join(sorted(LOCAL_TASKS))}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    chat = CHAT_TASK in tasks
    tasks = [t for t in tasks if t != CHAT_TASK]
    res = _lm_eval_tasks(model, tokenizer, tasks, data_dir, limit, batch_size, device, progress) if tasks else {}
    if chat:   # after lm-eval: a bad lm-eval task name fails before the chat answers are generated
        from .chat import evaluate_chat

        first = next(iter(model.parameters()), None)
        if first is not None and first.device != _torch_device(device):
            model.to(device)
        res[CHAT_TASK] = evaluate_chat(model, tokenizer, limit=limit, records=chat_records, progress=progress)
    return res


def _lm_eval_tasks(model, tokenizer, tasks, data_dir, limit, batch_size, device, progress):
    sources: dict[str, str] = {}
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        for t in tasks:  # checks names and files before any model work
            sources[t] = str(task_files(t, data_dir)[0])
    else:
        sources = {t: "hf" for t in tasks}

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(_MISSING_LM_EVAL) from e

    if data_dir is not None:
        # our tasks only: scanning lm-eval's ~15k stock configs costs ~9 s
        tm = TaskManager(
            include_path=str(TASK_DIR),
            include_defaults=False,
            metadata={"data_dir": str(data_dir)},
        )
    else:
        tm = TaskManager()
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if unknown:
            raise ValueError(
                f"unknown lm-eval task(s) {unknown}; local tasks (with data_dir): "
                f"{', '.join(sorted(LOCAL_TASKS))}"
            )

    first = next(iter(model.parameters()), None)
    if first is not None and first.device != _torch_device(device):
        model.to(device)
    model.eval()

    with _quiet_lm_eval(desc="zero-shot " + ",".join(tasks), progress=progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            task_manager=tm,
            log_samples=False,
            # leave the caller's RNG state alone: zero-shot scoring draws nothing
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )

    res: dict[str, dict[str, Any]] = {}
    for t in tasks:
        r = out["results"][t]
        res[t] = {
            "acc": _as_float(r.get("acc,none")),
            "acc_stderr": _as_float(r.get("acc_stderr,none")),
            "acc_norm": _as_float(r.get("acc_norm,none")),
            "acc_norm_stderr": _as_float(r.get("acc_norm_stderr,none")),
            "n": int(out["n-samples"][t]["effective"]),
            "source": sources[t],
            "limit": limit,
        }
    return res


def _torch_device(device: str):
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d
