"""`lrinfer plot DIR`: PNG figures of a compressed checkpoint (needs matplotlib: pip install 'lrinfer[plot]').

  ranks.png    kept rank per decoder block, one line per module kind (from the manifest's ranks
               and tensor shapes), as a fraction of the full rank min(in, out)
  spectra.png  singular values σ_i/σ_1 of the DENSE weights of a few layers, with the kept rank
               k (+ k2) marked. A checkpoint stores only the factors, so the dense spectrum cannot
               be recovered from it: the dense model is loaded from --model (default: the
               manifest's base_model) and this figure is skipped when it cannot be. For
               data-aware methods (svdllm, asvd, ...) the truncation happened in a transformed
               space: the line marks how many directions are kept, not which.
  ppl.png      perplexity vs ratio per method, from --results FILE: a JSON list of
               {method, ratio, ppl} (or {"runs": [...]} as bench/methods_table.py writes; runs
               with a "spec" are grouped by it). A dense run (ratio 0) is a dashed line.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

from lrinfer.errors import LrinferError

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("lrinfer plot needs matplotlib: pip install 'lrinfer[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _block_and_kind(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    block = next((int(p) for p in parts if p.isdigit()), None)
    return block, parts[-1]


def _full_ranks(manifest: dict) -> dict[str, int]:
    """name -> min(in, out) from the stored factor shapes (V [in, k], U [out, k])."""
    t = manifest.get("tensors", {})
    out = {}
    for name in manifest.get("ranks", {}):
        v, u = t.get(f"{name}.V"), t.get(f"{name}.U")
        if v and u:
            out[name] = min(v["shape"][0], u["shape"][0])
    return out


def plot_ranks(manifest: dict, path: Path) -> Path:
    """Kept rank (k + k2) / min(in, out) per block, one line per module kind."""
    plt = _pyplot()
    full = _full_ranks(manifest)
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for name, rk in manifest["ranks"].items():
        block, kind = _block_and_kind(name)
        k = sum(rk) if isinstance(rk, (list, tuple)) else rk
        series[kind].append((block if block is not None else 0, k / full[name] if name in full else k))
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("v", "-."), ("D", "-"), ("x", "--"), ("+", ":")]
    for i, kind in enumerate(sorted(series)):  # overlapping kinds (equal shapes) stay visible
        pts = sorted(series[kind])
        marker, ls = styles[i % len(styles)]
        ax.plot([b for b, _ in pts], [f for _, f in pts], marker=marker, ls=ls, ms=4, mfc="none", label=kind)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("kept rank / full rank" if full else "kept rank")
    ax.set_title(f"rank allocation: {manifest.get('method')} at ratio {manifest.get('ratio')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_layers(ranks: dict, count: int = 4) -> list[str]:
    """A few compressed layers spread over depth and kinds: first, middle and last block."""
    names = list(ranks)
    blocks = sorted({b for b, _ in map(_block_and_kind, names) if b is not None})
    if not blocks:
        return names[:count]
    picks = []
    for b, kind in ((blocks[0], "q_proj"), (blocks[len(blocks) // 2], "down_proj"), (blocks[-1], "v_proj"),
                    (blocks[-1], "up_proj")):
        hit = [n for n in names if _block_and_kind(n) == (b, kind)]
        picks.extend(hit[:1])
    return picks or names[:count]


def plot_spectra(model, ranks: dict, layers: list[str], path: Path) -> Path:
    """σ_i/σ_1 of each dense `model.<layer>.weight` (float64 SVD) with the kept rank marked."""
    import torch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(layers):
        W = model.get_submodule(name).weight.detach().to(torch.float64)
        s = torch.linalg.svdvals(W)
        s = (s / s[0]).numpy()
        rk = ranks[name]
        k = sum(rk) if isinstance(rk, (list, tuple)) else rk
        line, = ax.semilogy(range(1, len(s) + 1), s, label=f"{name} (k={k}/{len(s)})")
        ax.axvline(k, color=line.get_color(), ls="--", lw=1)
    return _finish(fig, ax, path, "index i", "σ_i / σ_1 (dense weight)", "singular values; dashed: kept rank", 7)


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size: int):
    """Label, grid, legend, save as PNG and close; returns `path`."""
    plt = _pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_results(file: str | Path) -> list[dict]:
    """Rows {method, ratio, ppl} from a JSON list or a {"runs": [...]} object."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LrinferError(f"--results {file}: unreadable ({e})") from None
    rows = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise LrinferError(f"{file}: expected a JSON list of {{method, ratio, ppl}} or {{\"runs\": [...]}}")
    bad = [r for r in rows if not {"method", "ratio", "ppl"} <= set(r)]
    if bad:
        raise LrinferError(f"{file}: rows need method, ratio and ppl; got {sorted(bad[0])}")
    return rows


def plot_ppl(rows: list[dict], path: Path, title: str = "") -> Path:
    """Perplexity (log scale) vs ratio, one line per method (or spec); dense as a dashed line."""
    plt = _pyplot()
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    dense = [r["ppl"] for r in rows if r["method"] == "dense" or r["ratio"] == 0]
    for r in rows:
        if r["method"] == "dense" or r["ratio"] == 0:
            continue
        series[r.get("spec") or r["method"]].append((float(r["ratio"]), float(r["ppl"])))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in sorted(series):
        pts = sorted(series[label])
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if dense:
        ax.axhline(dense[0], color="k", ls="--", lw=1, label=f"dense ({dense[0]:.2f})")
    ratios = [x for pts in series.values() for x, _ in pts]
    ax.set_xlim(0, min(1.0, max(ratios, default=0.5) + 0.1))
    ax.set_yscale("log")
    return _finish(fig, ax, path, "compression ratio (fraction of linear parameters removed)", "perplexity",
                   title or "perplexity vs ratio", 8)


def _load_dense(spec: str | None):
    """The dense model only (no tokenizer needed): a local HF directory, a directory holding one
    .gguf file (what `base_model` records for GGUF sources), else `load_model(spec)`."""
    if spec and (Path(spec) / "config.json").is_file():
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(spec)
    if spec and Path(spec).is_dir() and len(ggufs := sorted(Path(spec).glob("*.gguf"))) == 1:
        spec = str(ggufs[0])
    from lrinfer.runtime.models import load_model
    return load_model(spec)[0]


def plot_checkpoint(path: str | Path, out: str | Path | None = None, results: str | Path | None = None,
                    model: str | None = None, layers: list[str] | None = None, spectra: bool = True) -> dict:
    """Write ranks.png, spectra.png (when a dense model is available) and ppl.png (with `results`)
    into `out` (default DIR/plots). Returns {"files": [...], "skipped": {figure: reason}}."""
    from lrinfer.runtime.checkpoint import read_manifest

    _pyplot()  # fail early, with the install hint
    path = Path(path)
    manifest = read_manifest(path)
    out = Path(out) if out else path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files, skipped = [str(plot_ranks(manifest, out / "ranks.png"))], {}
    if spectra:
        spec = model or manifest.get("base_model")
        names = layers or default_layers(manifest["ranks"])
        unknown = [n for n in names if n not in manifest["ranks"]]
        if unknown:
            raise LrinferError(f"--layers: {unknown} are not compressed layers of {path}")
        try:
            dense = _load_dense(spec)
        except Exception as e:  # noqa: BLE001  (any load failure only skips this figure)
            skipped["spectra.png"] = f"could not load the dense model {spec!r} ({e}); pass --model"
            log.warning("spectra.png skipped: %s", skipped["spectra.png"])
        else:
            files.append(str(plot_spectra(dense, manifest["ranks"], names, out / "spectra.png")))
    else:
        skipped["spectra.png"] = "--no-spectra"
    if results:
        files.append(str(plot_ppl(read_results(results), out / "ppl.png", Path(results).name)))
    else:
        skipped["ppl.png"] = "no --results file"
    return {"files": files, "skipped": skipped}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `plot` to the CLI's subparsers."""
    p = subparsers.add_parser("plot", help="PNG figures: rank allocation, singular-value spectra, perplexity vs ratio")
    p.add_argument("dir", help="compressed checkpoint directory")
    p.add_argument("--out", default=None, help="output directory (default DIR/plots)")
    p.add_argument("--results", default=None,
                   help="JSON list of {method, ratio, ppl} (or bench/methods_table.py's output) for ppl.png")
    p.add_argument("--model", default=None,
                   help="dense model for the spectra (default: the checkpoint's base_model)")
    p.add_argument("--layers", default=None, help="comma-separated compressed layer names for spectra.png")
    p.add_argument("--no-spectra", action="store_true", help="skip spectra.png (no dense model load)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--debug", action="store_true")
    return p


def run(args) -> dict:
    """The `lrinfer plot` command: returns {"files": [...], "skipped": {...}}."""
    return plot_checkpoint(args.dir, args.out, args.results, args.model,
                           args.layers.split(",") if args.layers else None, spectra=not args.no_spectra)
