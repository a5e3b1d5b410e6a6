"""Peak memory while loading and while generating: dense vs lrinfer checkpoints at several ratios.

Each measurement runs in a fresh subprocess (`--child`): it imports torch, transformers and
lrinfer.runtime.hf, warms up (builds the architecture on meta, calls the op once) so one-off import costs
are not counted, resets the kernel's peak-RSS mark (VmHWM, via /proc/self/clear_refs), then:
  lazy_load_mb  peak RSS increase over from_pretrained / load_checkpoint alone. safetensors files
                are mmapped, so weights that were not copied are not resident yet.
  load_mb       peak RSS increase over loading plus one 1-token forward, which reads every weight:
                what a usable loaded model costs (the number to compare)
  generate_mb   peak RSS increase after also generating --gen tokens greedily
  params_mb     bytes of the loaded parameters; disk_mb: bytes of the safetensors files
and, when CUDA is available, torch.cuda.max_memory_allocated after loading and after generating.
Loaders: `hf` = AutoModelForCausalLM.from_pretrained (dense and compressed), `lrinfer` =
lrinfer.load_checkpoint (compressed only; it reads the whole file into memory).

    python bench/memory.py                               # SmolLM2-135M, ratios 0.2 0.4 0.6
    python bench/memory.py --ratios 0.2 0.6 --gen 16 --out bench/results/memory_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status() -> dict:
    """Fields of /proc/self/status in MiB (VmHWM: peak RSS, VmRSS, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: int(rows[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if k in rows}


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); falls back to the process-lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    st = _status()
    return st["VmHWM"] if "VmHWM" in st else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up(path: str) -> None:
    """Import and initialise what every load needs (modeling code, accelerate, the op), so the
    measured peaks hold the model and not one-off import costs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lrinfer.runtime.kernels import lowrank_linear

    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(cfg)
    with contextlib.suppress(ImportError):
        import accelerate  # noqa: F401  (device_map= imports it)
    lowrank_linear(torch.ones(2, 8), torch.ones(8, 2), torch.ones(8, 2))


def child(path: str, loader: str, gen: int, device: str) -> dict:
    """Runs in the subprocess: load `path`, touch every weight, generate; return the peaks (MiB)."""
    import torch
    from transformers import AutoModelForCausalLM

    import lrinfer
    import lrinfer.runtime.hf  # noqa: F401  (registers quant_method "lrinfer")

    cuda = device.startswith("cuda")
    _warm_up(path)
    _reset_peak()
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if loader == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device)
    elif loader == "lrinfer":
        model, _ = lrinfer.load_checkpoint(path, device=device)
    else:
        raise ValueError(f"loader must be hf or lrinfer; got {loader!r}")
    if cuda:
        torch.cuda.synchronize()
    out = {"load_s": time.perf_counter() - t0, "lazy_load_mb": _peak_rss_mb() - base, "baseline_mb": base,
           "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    # safetensors weights are mmapped: they become resident when first read. One 1-token forward
    # reads every weight once, so this peak is what a usable loaded model costs.
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    out["load_mb"] = _peak_rss_mb() - base
    if cuda:
        out["cuda_load_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if gen:
        ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, do_sample=False,
                           pad_token_id=0)
        out["generate_mb"] = _peak_rss_mb() - base
        if cuda:
            out["cuda_generate_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure(path: str | os.PathLike, loader: str = "hf", gen: int = 16, device: str = "cpu") -> dict:
    """Run `child` in a fresh Python process and return its JSON."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--loader", loader,
           "--gen", str(gen), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed for {path} ({loader}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_factors(model, ratio: float, multiple: int = 8) -> dict:
    """Random FactorPairs with the uniform-allocation ranks of `ratio` for every compressible linear
    (memory depends only on shapes; used where solving would take too long, e.g. tests)."""
    import torch

    import lrinfer

    g = torch.Generator().manual_seed(0)
    out = {}
    for info in lrinfer.compressible_linears(model):
        k = lrinfer.rank_for_ratio(info.in_features, info.out_features, ratio, multiple)
        out[info.name] = lrinfer.FactorPair(torch.randn(info.out_features, k, generator=g) / k**0.5,
                                            torch.randn(info.in_features, k, generator=g) / info.in_features**0.5)
    return out


def make_checkpoints(model, ratios, work: Path, calib_ids=None, tokenizer=None, base_model: str = "model",
                     factors: str = "svd") -> dict:
    """Write `work/dense` (transformers' save_pretrained) and `work/svd-<ratio>` (lrinfer checkpoints)
    from the dense `model` (left unchanged). factors="svd": `lrinfer.offline.compress` with plain SVD;
    "random": random factors of the same ranks. Returns {label: dir}."""
    import lrinfer

    work = Path(work)
    dirs = {"dense": work / "dense"}
    model.save_pretrained(dirs["dense"])
    if tokenizer is not None:
        tokenizer.save_pretrained(dirs["dense"])
    for r in ratios:
        m = copy.deepcopy(model)
        if factors == "svd":
            ranks = lrinfer.compress(m, lrinfer.CompressConfig(method="svd", ratio=r), calib_ids,
                                     progress=False).ranks
        elif factors == "random":
            pairs = random_factors(m, r)
            lrinfer.patch(m, pairs)
            ranks = {n: [p.rank, p.rank2] for n, p in pairs.items()}
        else:
            raise ValueError(f"factors must be svd or random; got {factors!r}")
        label = f"svd-{r:g}"
        dirs[label] = lrinfer.save_checkpoint(m, tokenizer, work / label,
                                              {"method": "svd" if factors == "svd" else "random", "ratio": r,
                                               "ranks": ranks}, base_model=base_model, overwrite=True)
        del m
    return dirs


def run(dirs: dict, gen: int, device: str, loaders=("hf", "lrinfer")) -> list[dict]:
    """Measure every checkpoint with every loader (dense: hf only), one fresh process each."""
    rows = []
    for label, path in dirs.items():
        for loader in loaders:
            if label == "dense" and loader != "hf":
                continue
            ratio = 0.0 if label == "dense" else float(label.split("-")[1])
            disk = sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20
            rows.append({"checkpoint": label, "ratio": ratio, "loader": loader, "disk_mb": disk,
                         **measure(path, loader, gen, device)})
    return rows


def table(rows: list[dict]) -> str:
    cols = ["checkpoint", "loader", "disk_mb", "params_mb", "lazy_load_mb", "load_mb", "generate_mb", "load_s"]
    if any("cuda_load_mb" in r for r in rows):
        cols += ["cuda_load_mb", "cuda_generate_mb"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r.get(c, float('nan')):.1f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                for c in cols))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--loader", default="hf", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model spec for lrinfer.load_model (default: packaged SmolLM2-135M)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--gen", type=int, default=16, help="tokens generated after loading (0: skip)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--work", default="out/memory-bench", help="where the checkpoints are written")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/memory_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(args.child, args.loader, args.gen, device)))
        return

    import lrinfer
    work = Path(args.work)
    model, tok, source = lrinfer.load_model(args.model)
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF file: weights are already dequantized
        model.hf_quantizer.remove_quantization_config(model)
    calib = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))  # svd ignores data
    t0 = time.perf_counter()
    dirs = make_checkpoints(model, args.ratios, work, calib, tok, base_model=source)
    build_s = time.perf_counter() - t0
    rows = run(dirs, args.gen, device)
    slug = "gpu" if device.startswith("cuda") else "cpu"
    out = Path(args.out or REPO / "bench" / "results" / f"memory_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": source, "device": device, "gen_tokens": args.gen, "method": "svd",
              "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
              "command": "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "build_s": build_s, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
