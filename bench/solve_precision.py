"""Which parts of a whitened solve can run in float32: SVD-LLM's truncation on SmolLM2's real Gram matrices,
old (Cholesky + L⁻¹ + SVD of W·L, float64) against the eigh path in float64 and three float32 variants, as
the relative change of the whitened loss ‖(W − Ŵ) L‖² (what the truncation minimises) and the solve time.

    python bench/solve_precision.py            # blocks 0, 15, 29; 32 x 512 WikiText-2 tokens; ratios 0.2 0.6

Writes bench/results/solve_precision_smollm2.json. The statistics are cached in out/solve-precision/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def gather(blocks: list[int], cache: Path) -> dict:
    """{linear: {"W": float64 weight, "G": float64 Gram}} of the listed SmolLM2 blocks (dense inputs)."""
    if cache.is_file():
        return torch.load(cache)
    import lrinfer
    from lrinfer.runtime.blocks import capture_inputs, run_block
    from lrinfer.offline.calibration import collect_stats
    from lrinfer.runtime.architecture import decoder_blocks
    model, tok, _ = lrinfer.load_model()
    calib, _ = lrinfer.calibration_batch(tok, "wikitext2", 32, 512, 0, lrinfer.resolve_data_dir(None))
    prefix, layers = decoder_blocks(model)
    out = {}
    with torch.no_grad():
        streams = capture_inputs(model, layers, calib, 8, torch.device("cpu"))
        for i, block in enumerate(layers[: max(blocks) + 1]):
            if i in blocks:
                rel = {n: f"{prefix}.{i}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
                stats, dense = collect_stats(block, list(rel), frozenset({"gram"}), streams, streams.calls[i], {}, rel)
                for r, s in stats.items():
                    out[s.name] = {"W": block.get_submodule(r).weight.detach().double().clone(), "G": s.gram.clone()}
            else:
                dense = run_block(block, streams.dense, streams.calls[i])
            streams.dense = dense
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def old_path(W, G, r, damp=1e-6):
    n = G.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(G + damp * G.diagonal().mean() * eye)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    return (U[:, :r] * s[:r]) @ (Linv.t() @ Vh[:r].t()).t()


def variant(W, G, r, mode, damp=1e-6):
    """Ŵ by the eigh path with its decomposition in float32 ("eigh32": Gram formed in float64; "all32": W·L
    and its Gram in float32 too) or by a float32 SVD of the float64 W·L ("svd32")."""
    from lrinfer.offline.solvers.linalg import factor_gram
    w = factor_gram(G, damp)
    A = w.right(W)
    m, n = A.shape
    if mode == "svd32":
        U, s, Vh = torch.linalg.svd(A.float(), full_matrices=False)
        B = (U[:, :r] if m <= n else Vh[:r].t()).double()
    else:
        A_ = A.float() if mode == "all32" else A
        M = A_ @ A_.t() if m <= n else A_.t() @ A_
        B = torch.linalg.eigh(M.float())[1][:, -r:].double()
    return B @ (B.t() @ W) if m <= n else (A @ B) @ w.inv_t(B).t()


def loss(W, What, G, damp=1e-6):
    E = W - What
    Gd = G + damp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=torch.float64)
    return float(torch.einsum("ij,jk,ik->", E, Gd, E))


def main(argv=None) -> None:
    from lrinfer.offline.solvers.linalg import whitened_factors
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.6])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "solve_precision_smollm2.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stats = gather(args.blocks, REPO / "out" / "solve-precision" / f"stats_{'_'.join(map(str, args.blocks))}.pt")
    rows = []
    for name, e in stats.items():
        W, G = e["W"], e["G"]
        out_f, in_f = W.shape
        for ratio in args.ratios:
            r = int((1 - ratio) * out_f * in_f / (out_f + in_f)) // 8 * 8
            t0 = time.process_time()
            ref = loss(W, old_path(W, G, r), G)
            t1 = time.process_time()
            U, V = whitened_factors(W, G, r)
            t2 = time.process_time()
            row = {"linear": name, "shape": [out_f, in_f], "ratio": ratio, "rank": r, "loss_old": ref,
                   "old_s": round(t1 - t0, 4), "eigh64_s": round(t2 - t1, 4),
                   "eigh64": (loss(W, U @ V.t(), G) - ref) / ref}
            for mode in ("eigh32", "all32", "svd32"):
                row[mode] = (loss(W, variant(W, G, r, mode), G) - ref) / ref
            rows.append(row)
            print(f"{name:40s} {ratio} r={r:4d} old {row['old_s']:.3f}s eigh64 {row['eigh64_s']:.3f}s "
                  f"Δ eigh64 {row['eigh64']:+.1e} eigh32 {row['eigh32']:+.1e} all32 {row['all32']:+.1e} "
                  f"svd32 {row['svd32']:+.1e}", flush=True)
    summary = {k: max(abs(r[k]) for r in rows) for k in ("eigh64", "eigh32", "all32", "svd32")}
    summary["old_s"] = sum(r["old_s"] for r in rows)
    summary["eigh64_s"] = sum(r["eigh64_s"] for r in rows)
    Path(args.out).write_text(json.dumps({"command": "python bench/solve_precision.py", "summary": summary,
                                          "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
