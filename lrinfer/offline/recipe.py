"""Recipes: layer selection × rank allocation × solver × refinement, and a search that picks one on calibration text only.

A recipe is a partial `CompressConfig`. `search` compresses a fresh copy of the dense model with each
candidate and scores it by perplexity on a held-apart slice of the calibration text (never the
evaluation split); the lowest wins. Each finished candidate is recorded in the work directory, so an
interrupted search resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lrinfer.errors import LrinferError
from lrinfer.evaluation.perplexity import perplexity
from lrinfer.factors import flatten_factors, unflatten_factors
from lrinfer.offline.refinement.base import summarize as summarize_refinement
from lrinfer.registry import parse_value
from lrinfer.runtime.checkpoint import atomic_write_bytes
from lrinfer.runtime.nn import LowRankLinear, replace_module
from .compress import CompressionResult, compress
from .config import CompressConfig
from .resume import save_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Which layers (selection), how much rank each (allocation), how to solve (method), how to refine
    each solved block (refinement), and on how many calibration samples (None: all the search is given)."""
    method: str
    selection: str = "all"
    allocation: str = "uniform"
    method_options: dict = field(default_factory=dict)
    selection_options: dict = field(default_factory=dict)
    allocation_options: dict = field(default_factory=dict)
    samples: int | None = None
    refinement: str = "none"
    refinement_options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Recipe":
        """'saes:beta_max=0.9+drank@last:cap=0.3~blockfit:steps=8%128' -> SAES (β ≤ 0.9) with D-Rank
        ranks on the last layers at a per-layer cap of 0.3, each block refined by 8 steps of blockfit,
        on 128 calibration samples. Every part but the solver is optional; the selection defaults to
        the solver's own (ResSVD: last), the refinement to none."""
        from lrinfer.offline.solvers.base import get_solver
        rest, _, samples = spec.partition("%")
        rest, _, refinement = rest.partition("~")
        rest, _, selection = rest.partition("@")
        method, _, allocation = rest.partition("+")

        def named(part: str, default: str | None) -> tuple[str | None, dict]:
            name, _, opts = part.partition(":")
            options = {}
            for kv in filter(None, opts.split(",")):
                k, eq, v = kv.partition("=")
                if not eq or not k.strip() or not v.strip():
                    raise LrinferError(f"recipe {spec!r}: option {kv!r} is not KEY=VALUE "
                                       "(write e.g. saes:beta_max=0.9+drank@last:cap=0.3%128)")
                options[k.strip()] = parse_value(v.strip())
            return name.strip() or default, options

        method, m_opts = named(method, None)
        if not method:
            raise LrinferError(f"recipe {spec!r} names no solver (write e.g. saes@last:cap=0.3)")
        allocation, a_opts = named(allocation, "uniform")
        selection, s_opts = named(selection, None)
        refinement, r_opts = named(refinement, "none")
        if samples and not (samples.isdigit() and int(samples) > 0):
            raise LrinferError(f"recipe {spec!r}: calibration samples after '%' must be a positive integer")
        return cls(method, selection or get_solver(method).selection, allocation, m_opts, s_opts, a_opts,
                   int(samples) if samples else None, refinement, r_opts)

    @property
    def label(self) -> str:
        opts = lambda d: ",".join(f"{k}={v}" for k, v in sorted(d.items()))  # noqa: E731
        parts = [self.method + (f"({opts(self.method_options)})" if self.method_options else ""),
                 self.selection + (f"({opts(self.selection_options)})" if self.selection_options else ""),
                 self.allocation + (f"({opts(self.allocation_options)})" if self.allocation_options else "")]
        if self.refinement != "none":
            parts.append(self.refinement + (f"({opts(self.refinement_options)})" if self.refinement_options else ""))
        if self.samples:
            parts.append(f"{self.samples} samples")
        return " / ".join(parts)

    @property
    def slug(self) -> str:
        """The label as a file name: a trial's work files are found by recipe, not by list position."""
        return re.sub(r"[^A-Za-z0-9.=,-]+", "_", self.label).strip("_")

    def config(self, base: CompressConfig) -> CompressConfig:
        """`base` with this recipe's stages, options and sample count; raises on a bad name or option."""
        return replace(base, method=self.method, selection=self.selection, allocation=self.allocation,
                       method_options=dict(self.method_options), selection_options=dict(self.selection_options),
                       allocation_options=dict(self.allocation_options), refinement=self.refinement,
                       refinement_options=dict(self.refinement_options), n_samples=self.samples or base.n_samples)

    def to_dict(self) -> dict:
        return {"method": self.method, "selection": self.selection, "allocation": self.allocation,
                "method_options": self.method_options, "selection_options": self.selection_options,
                "allocation_options": self.allocation_options, "samples": self.samples,
                "refinement": self.refinement, "refinement_options": self.refinement_options}


def methods_catalog() -> dict:
    """Every registered method of the four stages: {stage: {name: {summary, options: {name: {default,
    type}}, ...}}}, in the order a recipe spec names them (solver, allocation, selection, refinement)."""
    from lrinfer.offline.allocation.base import ALLOCATORS
    from lrinfer.offline.refinement.base import REFINERS
    from lrinfer.registry import type_name
    from lrinfer.offline.selection.base import SELECTIONS
    from lrinfer.offline.solvers.base import SOLVERS

    def entry(m, **extra):
        types = m.option_types()
        return {"summary": m.summary, **extra,
                "options": {k: {"default": v, "type": type_name(types[k]) if k in types else "any"}
                            for k, v in m.options().items()}}
    return {"solver": {n: entry(m, needs=sorted(m.needs), selection=m.selection) for n, m in SOLVERS.items()},
            "allocation": {n: entry(m, needs_spectra=m.needs_spectra) for n, m in ALLOCATORS.items()},
            "selection": {n: entry(m) for n, m in SELECTIONS.items()},
            "refinement": {n: entry(m) for n, m in REFINERS.items()}}


LAST_CAP_FACTOR = 1.5   # per-layer cap of the last-layer SAES candidate, × the overall ratio


def default_candidates(ratio: float = 0.2, refinement: str = "blockfit") -> list[Recipe]:
    """The stated search space, each refined by `refinement` (the screening round compares them without
    it): SVD-LLM as the reference; SAES + D-Rank on ResSVD's last-layer selection at a per-layer cap of
    1.5 × `ratio` (when below 0.95; the best SAES recipe of earlier searches); KFAC and KFAC-SAES (both
    sides whitened) with the loss-model allocation, which also leaves linears dense where factoring buys
    nothing. Dropped after the searches of docs/results.md ("`--method auto` with KFAC"), where each
    screened far behind KFAC + loss at 20% and 40% and none was ever chosen: SAES with uniform or D-Rank
    ranks on all layers, ResSVD as published, and the other last-layer caps (1.25, 2.25, 3 ×)."""
    out = [Recipe("svdllm")]
    if (cap := round(ratio * LAST_CAP_FACTOR, 4)) < 0.95:
        out.append(Recipe("saes", "last", "drank", selection_options={"cap": cap}))
    out += [Recipe("kfac", allocation="loss"), Recipe("kfac-saes", allocation="loss")]
    return [replace(r, refinement=refinement) for r in out]


def check_candidates(candidates: list[Recipe], base: CompressConfig, n_calib: int) -> None:
    """Every name, option and sample count valid for a search given `n_calib` calibration rows, and
    no recipe twice; raises before any long work."""
    if not candidates:
        raise LrinferError("recipe search needs at least one candidate")
    for c in candidates:
        c.config(base)
        if c.samples and c.samples > n_calib:
            raise LrinferError(f"recipe {c.label!r} asks for {c.samples} calibration samples but the search "
                               f"was given {n_calib}; raise --samples to at least {c.samples}")
    if len({c.slug for c in candidates}) < len(candidates):
        raise LrinferError("recipe search: the candidates repeat a recipe: "
                           + ", ".join(c.label for c in candidates))


@dataclass(frozen=True)
class Screening:
    """The search's cheap first round: every candidate compressed on its first `samples` calibration rows
    and without refinement (its *proxy*), scored on the held-apart text; the candidates of the best
    `keep` proxies go on to a full compression, which alone decides. `None` in `search`: every
    candidate compressed in full.

    A ranking must not hinge on noise: a further proxy also goes on (up to `keep_max` in all) when it
    is tied with the best, i.e. its mean per-window NLL excess over the best, paired window by window on
    the same held-apart text, is below `tie_z` standard errors of that excess.

    Defaults, measured on SmolLM2-135M at 20% (docs/results.md, "The cheap search"): proxies on 4
    samples rank the SAES candidates in the same order as on 8 and as the full 32-sample search, at
    half the cost of 8; one finalist, as the full round is the dearest part (it alone is refined),
    two when the first two are tied."""
    samples: int = 4
    keep: int = 1
    tie_z: float = 2.0
    keep_max: int = 2

    def finalists(self, trials: list[dict]) -> list[dict]:
        """The screened trials that go on: the best `keep`, then those tied with the best (see above)."""
        ranked = sorted(trials, key=lambda t: t["heldout_ppl"])
        out = ranked[:self.keep]
        best = torch.tensor(ranked[0].get("window_nll", []), dtype=torch.float64)
        for t in ranked[self.keep:]:
            if len(out) >= max(self.keep_max, self.keep) or best.numel() < 2:
                break
            diff = torch.tensor(t.get("window_nll", []), dtype=torch.float64) - best
            if diff.numel() != best.numel() or not torch.isfinite(diff).all():
                break
            se = float(diff.std() / diff.numel() ** 0.5)
            if float(diff.mean()) < self.tie_z * se:
                out.append(t)
        return out

    def proxy(self, c: Recipe, n_calib: int) -> Recipe:
        return replace(c, samples=min(c.samples or n_calib, self.samples), refinement="none", refinement_options={})


@dataclass
class SearchResult:
    best: Recipe
    result: CompressionResult          # the winner's compression (its factors)
    trials: list[dict]                 # one per compression: recipe, round (screen/full), criterion, seconds
    criterion: str
    seconds: float = 0.0               # the whole search

    def report(self) -> dict:
        trials = [{k: v for k, v in t.items() if k != "window_nll"} for t in self.trials]
        return {"criterion": self.criterion, "chosen": self.best.to_dict(), "chosen_label": self.best.label,
                "trials": trials, "seconds": round(self.seconds, 1)}


def search(dense: nn.Module, base: CompressConfig, calib_ids: torch.Tensor, heldout_ids: torch.Tensor,
           candidates: list[Recipe] | None = None, work_dir: str | Path | None = None, resume: bool = False,
           progress: bool = True, screening: Screening | None = Screening()) -> SearchResult:
    """Choose a recipe by perplexity on `heldout_ids` [h, T] (calibration text held apart from
    `calib_ids` [n, T]); never the evaluation split. With `screening` (the default), a cheap first round
    ranks every candidate's proxy and only the best go on to a full compression; without it, every
    candidate is compressed in full. A candidate with `samples` set calibrates on that many first rows of
    `calib_ids`. `dense` is left unchanged; patch the winner with `apply_result`. Trials are recorded in
    `work_dir` as they finish, so an interrupted search resumes where it stopped."""
    t0 = time.perf_counter()
    candidates = candidates or default_candidates(base.ratio)
    check_candidates(candidates, base, calib_ids.shape[0])
    work = Path(work_dir) if work_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    finalists, trials = candidates, []
    if screening is not None and len(candidates) > screening.keep:
        proxies = {}   # proxy label -> (proxy, candidates it stands for); candidates differing only in
        for c in candidates:   # refinement or sample count share one proxy
            proxy = screening.proxy(c, calib_ids.shape[0])
            proxies.setdefault(proxy.label, (proxy, []))[1].append(c)
        if len(proxies) > screening.keep:
            screened, _ = _round(dense, base, calib_ids, heldout_ids, [p for p, _ in proxies.values()],
                                 work / "screen" if work else None, resume, progress, "screen")
            trials += screened
            finalists = [c for t in screening.finalists(screened) for c in proxies[t["label"]][1]]
    full, result = _round(dense, base, calib_ids, heldout_ids, finalists, work, resume, progress, "full")
    trials += full
    best = min(full, key=lambda t: t["heldout_ppl"])
    if best["heldout_ppl"] == float("inf"):
        raise LrinferError("every recipe failed: " + "; ".join(t.get("error", "") for t in full))
    winner = next(c for c in finalists if c.label == best["label"])
    if result is None:   # the winner finished in an earlier, interrupted run: reload its factors
        result = _reload(dense, base, work / f"{winner.slug}.safetensors")
        result.hidden_error = [best["hidden_error"]]
    criterion = (f"perplexity on {heldout_ids.shape[0]} held-apart calibration windows "
                 f"of {heldout_ids.shape[1]} tokens (never the evaluation split)")
    if len(full) < len(candidates):
        criterion += (f"; screened first on {min(screening.samples, calib_ids.shape[0])} calibration samples "
                      "without refinement, "
                      f"the best {screening.keep} (and any tied with the best within {screening.tie_z:g} standard "
                      f"errors of the paired per-window NLL, up to {screening.keep_max}) compressed in full")
    return SearchResult(winner, result, trials, criterion, time.perf_counter() - t0)


def _round(dense, base, calib_ids, heldout_ids, candidates: list[Recipe], work: Path | None, resume: bool,
           progress: bool, name: str) -> tuple[list[dict], CompressionResult | None]:
    """Compress a copy of `dense` with each candidate and score it on `heldout_ids`. Returns the trials
    (in candidate order) and the in-memory result of the best one finished in this run (None if the
    best finished in an earlier run)."""
    trials_file = work / "trials.json" if work else None
    done: dict[str, dict] = {}
    if work and resume and trials_file.is_file():
        done = {t["label"]: t for t in json.loads(trials_file.read_text())}
    elif work:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(trials_file, b"[]")
    trials, best = [], None
    for i, cand in enumerate(candidates):
        if cand.label in done:
            trials.append(done[cand.label])
            log.info("%s %d/%d %s: done before (%.3f)", name, i + 1, len(candidates), cand.label,
                     done[cand.label]["heldout_ppl"])
            continue
        log.info("%s %d/%d: %s", name, i + 1, len(candidates), cand.label)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        try:
            result = compress(model, cand.config(base), calib_ids[:cand.samples], progress,
                              work_dir=(work / cand.slug) if work else None, resume=resume)
        except LrinferError as e:
            trials.append({"label": cand.label, "recipe": cand.to_dict(), "round": name,
                           "heldout_ppl": float("inf"), "error": str(e)})
            continue
        scored = perplexity(model, heldout_ids, progress=progress, per_window=True)
        ppl = scored["ppl"]
        trial = {"label": cand.label, "recipe": cand.to_dict(), "round": name, "heldout_ppl": ppl,
                 "hidden_error": result.hidden_error[-1], "seconds": round(time.perf_counter() - t0, 1),
                 "window_nll": [round(x, 4) for x in scored["window_nll"]]}
        if refined := summarize_refinement(result.refinement.values()):   # what refining did, and cost
            trial["refinement"] = {k: round(v, 5) for k, v in refined.items()}
        trials.append(trial)
        if work:   # factors first, then the record that points at them
            save_tensors(flatten_factors(result.factors), work / f"{cand.slug}.safetensors")
            atomic_write_bytes(trials_file, json.dumps(trials, indent=2).encode())
        if best is None or ppl < best[0]:
            best = (ppl, cand, result)
        del model
    top = min(trials, key=lambda t: t["heldout_ppl"]) if trials else None
    return trials, (best[2] if best and top and best[1].label == top["label"] else None)


def _reload(dense, base, path: Path) -> CompressionResult:
    from safetensors.torch import load_file

    from lrinfer.runtime.architecture import compressible_linears
    factors = unflatten_factors(load_file(str(path)))
    ranks = {n: [p.rank, p.rank2] for n, p in factors.items()}
    return CompressionResult(factors, ranks, compressible_linears(dense, base.modules), [], 0.0)


def apply_result(model: nn.Module, result: CompressionResult) -> None:
    """Patch `model` (dense) with the factors of a search result."""
    for name, pair in result.factors.items():
        lin = model.get_submodule(name)
        replace_module(model, name, LowRankLinear.from_factors(pair.to(lin.weight.device), lin.bias))

