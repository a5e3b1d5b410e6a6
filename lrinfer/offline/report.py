"""The machine-readable report of a compression (`DIR/report.json`) and its printed summary."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from lrinfer.offline.allocation.base import achieved_ratio
from lrinfer.offline.refinement.base import summarize as summarize_refinement
from lrinfer.version import __version__
from .compress import CompressionResult
from .config import CompressConfig


FALLBACKS = {   # kind (see `solvers.linalg.fallback`) -> what it means, for the summary line
    "ridge": "rank-deficient Gram matrix, the ridge stands in for unexcited directions (expected with "
             "few calibration tokens)",
    "eigh": "Gram matrix not positive definite, eigendecomposition with clamped eigenvalues",
    "identity": "zero Gram matrix (the layer saw only zero inputs), plain SVD",
    "plain_svd": "zero Fisher information, plain SVD",
}


def format_fallbacks(fallbacks: dict[str, list[str]], n_layers: int) -> list[str]:
    """One line per kind of fallback: how many layers, what it means, where the names are."""
    return [f"note: {len(names)} of {n_layers} layers: {FALLBACKS.get(kind, kind)} (layers in report.json "
            "\"fallbacks\"; --verbose prints them)" for kind, names in fallbacks.items()]


def unique_params(model) -> int:
    """Parameters of `model`, counting tied tensors once."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def compression_report(config: CompressConfig, result: CompressionResult, model_source: str,
                       dense_params: int, compressed_params: int, calib_desc: str) -> dict:
    """Everything about one compression except evaluation and disk figures (added by the caller)."""
    linears = result.linears
    dense_linear = sum(f.dense_params for f in linears)
    kept = {f.name: sum(result.ranks[f.name]) for f in linears if f.name in result.ranks}
    compressed_linear = sum(kept[f.name] * (f.in_features + f.out_features) if f.name in kept else f.dense_params
                            for f in linears)
    return {
        "lrinfer_version": __version__,
        "model": model_source,
        "method": config.method,
        "ratio": config.ratio,
        "achieved_ratio": achieved_ratio(linears, kept),
        "selection": config.selection,
        "allocation": config.allocation,
        "config": config.to_dict(),
        "calibration": {"choice": config.calib, "source": calib_desc, "n_samples": config.n_samples,
                        "seq_len": config.seq_len, "seed": config.seed},
        "ranks": result.ranks,
        "params": {"linears_dense": dense_linear, "linears_compressed": compressed_linear,
                   "model_dense": dense_params, "model_compressed": compressed_params},
        "hidden_error": {"final": result.hidden_error[-1] if result.hidden_error else None,
                         "per_block": result.hidden_error},
        "compress_seconds": round(result.seconds, 2),
        "refinement": {"method": config.refinement, "options": config.refinement_options,
                       "per_block": {str(b): r for b, r in sorted(result.refinement.items())}},
        "host": {"torch": torch.__version__, "python": platform.python_version()},
    }


def format_summary(report: dict) -> str:
    """A few human-readable lines."""
    p = report["params"]
    final = report["hidden_error"]["final"]
    lines = [
        f"method {report['method']} ({report['selection']} layers, {report['allocation']} ranks), "
        f"target ratio {report['ratio']:.0%}, achieved {report['achieved_ratio']:.2%} of the linears",
        f"parameters: linears {p['linears_dense']:,} -> {p['linears_compressed']:,}; "
        f"model {p['model_dense']:,} -> {p['model_compressed']:,}",
        f"calibration: {report['calibration']['n_samples']} x {report['calibration']['seq_len']} tokens "
        f"of {report['calibration']['source']}; final hidden-state error "
        f"{'n/a' if final is None else f'{final:.4f}'}; "
        f"{report['compress_seconds']:.0f} s",
    ]
    if refined := summarize_refinement(report.get("refinement", {}).get("per_block", {}).values()):
        lines.append(f"refinement ({report['refinement']['method']}): block output error "
                     f"{refined['error_before']:.4f} -> {refined['error_after']:.4f} (mean over "
                     f"{refined['blocks']} blocks)"
                     + (f", on held-apart sequences {refined['heldout_before']:.4f} -> {refined['heldout_after']:.4f}"
                        if "heldout_after" in refined else "") + f"; {refined['seconds']:.0f} s")
    if "recipe_search" in report:
        lines.append(f"recipe search ({report['recipe_search']['criterion']}):")
        for t in sorted(report["recipe_search"]["trials"], key=lambda t: t["heldout_ppl"]):
            lines.append(f"  {t['heldout_ppl']:10.3f}  {t['label']}")
    lines += format_fallbacks(report.get("fallbacks", {}), len(report.get("ranks", {})))
    if "bytes_on_disk" in report:
        lines.append(f"on disk: {report['bytes_on_disk'] / 2**20:.1f} MiB in {report.get('out')}")
    for key, label in (("ppl_dense", "dense"), ("ppl", "compressed")):
        for e in report.get(f"{key}_by_data", {key: report[key]} if key in report else {}).values():
            lines.append(f"perplexity ({label}): {e['ppl']:.2f}  [{e['data']}, seq_len {e['seq_len']}, "
                         f"{e['windows']} windows]")
    return "\n".join(lines)
