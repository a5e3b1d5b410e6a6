"""Peak memory of `lrinfer compress` against depth, and the memory plan's estimates against it.

Random Llama models of one width at several depths are written as safetensors directories (one shard
per decoder block, generated block by block, so writing them never holds the model), then each is
compressed by `lrinfer compress` in a fresh process: streamed (the default for such a directory), and,
for comparison, with --no-stream (the whole model in memory) and/or by another checkout of lrinfer
(--baseline DIR: e.g. the code before streaming, `git archive <commit> | tar -x -C DIR`). Per run:
peak RSS from wait4 (ru_maxrss), wall time, the report's plan (host_peak, device_peak) and, on CUDA,
torch.cuda.max_memory_allocated.

    # CPU: the depth check of issue 16 (hidden 1024, MLP 2816, 6 and 24 layers)
    python bench/compress_memory.py --layers 6 24 --modes stream no-stream --baseline /tmp/lrinfer_old
    # GPU: a Llama-2-7B-shaped random model, svdllm at 20%, 32 x 2048 calibration tokens
    python bench/compress_memory.py --layers 32 --hidden 4096 --intermediate 11008 --heads 32 \\
        --dtype bfloat16 --device cuda --samples 32 --calib-seq-len 2048 --modes stream --out bench/results/compress_memory_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def make_model_dir(path: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                   vocab: int, dtype: str, seed: int = 0, device: str = "cpu") -> Path:
    """A random Llama as a Hugging Face directory: config.json, one safetensors shard per decoder block
    plus one for the rest, an index, and a small byte-level BPE tokenizer. Weights ~ N(0, 0.02²), norms 1.
    Written block by block (host memory: one block). Returns `path` (reused when complete)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lrinfer.runtime.streaming import build_skeleton

    if (path / "model.safetensors.index.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype=dtype)
    dt = getattr(torch, dtype)
    skeleton = build_skeleton(cfg, dt)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        groups.setdefault(f"block{int(parts[2]):04d}" if parts[:2] == ["model", "layers"] else "rest", []).append(k)
    weight_map = {}
    for g, names in groups.items():
        tensors = {}
        for k in names:
            if k.endswith("norm.weight"):
                t = torch.ones(shapes[k], dtype=dt, device=device)
            else:
                t = (torch.randn(shapes[k], generator=gen, device=device) * 0.02).to(dt)
            tensors[k] = t.cpu()
        fname = f"model-{g}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(torch.Size(s).numel() * dt.itemsize for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(path)
    _tokenizer(path)
    return path


def _tokenizer(path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    text_file = Path(os.environ.get("LRINFER_DATA_DIR", DATA)) / "wikitext-2" / "valid.txt"
    text = text_file.read_text()[:400_000] if text_file.is_file() else "the quick brown fox " * 5000
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=2000, min_frequency=2, special_tokens=["<s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="<s>")
    tok.save_pretrained(path)


def run(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run `cmd`; its wall time, peak RSS (wait4's ru_maxrss, bytes), return code and output tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "rc": proc.returncode, "tail": out[-3000:]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 24])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, as Llama-2-7B)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", help="dtype of the written weights (and the compute dtype)")
    p.add_argument("--method", default="svdllm")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib", default="wikitext2", help="calibration text (wikitext2 or a .txt/.jsonl file)")
    p.add_argument("--data-dir", default=str(DATA) if DATA.is_dir() else None,
                   help="WikiText-2 directory (default ../shared/data when it exists)")
    p.add_argument("--modes", nargs="*", default=["stream", "no-stream"], choices=["stream", "no-stream"])
    p.add_argument("--baseline", default=None, help="another lrinfer checkout to run as 'before' (PYTHONPATH)")
    p.add_argument("--eval", action="store_true", help="also the dense and compressed perplexity (4 windows)")
    p.add_argument("--work", default="out/compress-memory")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/compress_memory_<cpu|gpu>.json)")
    args = p.parse_args(argv)

    work = Path(args.work).resolve()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for layers in args.layers:
        name = f"llama-h{args.hidden}-i{args.intermediate}-l{layers}-{args.dtype}"
        src = make_model_dir(work / name, layers, args.hidden, args.intermediate, args.heads,
                             args.kv_heads or args.heads, args.vocab, args.dtype,
                             device=args.device if args.device.startswith("cuda") else "cpu")
        weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        runs = [(m, None) for m in args.modes] + ([("baseline", args.baseline)] if args.baseline else [])
        for mode, pythonpath in runs:
            out = work / f"{name}-{mode}"
            cmd = [sys.executable, "-m", "lrinfer.cli", "compress", "--model", str(src), "--method", args.method,
                   "--ratio", args.ratio, "--samples", str(args.samples), "--calib-seq-len", str(args.calib_seq_len),
                   "--device", args.device, "--out", str(out), "--overwrite", "--no-progress"]
            cmd += ["--calib", args.calib] + (["--data-dir", args.data_dir] if args.data_dir else [])
            cmd += ["--windows", "4"] if args.eval else ["--no-eval"]
            cmd += ["--no-stream"] if mode == "no-stream" else []
            run_env = {**env, "PYTHONPATH": pythonpath} if pythonpath else env
            r = run(cmd, run_env, Path(pythonpath) if pythonpath else REPO)
            row = {"layers": layers, "mode": mode, "weights_bytes": weights, **{k: v for k, v in r.items() if k != "tail"}}
            if r["rc"] != 0:
                row["tail"] = r["tail"]
            report_file = out / "report.json"
            if r["rc"] == 0 and report_file.is_file():
                rep = json.loads(report_file.read_text())
                plan = rep.get("memory_plan") or {}
                row.update(compress_s=rep.get("compress_seconds"), peak_host_bytes_vmhwm=rep.get("peak_host_bytes"),
                           plan_host_peak=plan.get("host_peak"), plan_device_peak=plan.get("device_peak"),
                           peak_device_bytes=rep.get("peak_device_bytes"), streamed=rep.get("streamed"),
                           resume_bytes_total=(rep.get("resume") or {}).get("bytes_total"),
                           plan_resume_disk=plan.get("resume_disk"), hidden_error=rep["hidden_error"]["final"],
                           ppl=(rep.get("ppl") or {}).get("ppl"), ppl_dense=(rep.get("ppl_dense") or {}).get("ppl"))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
    slug = "gpu" if args.device.startswith("cuda") else "cpu"
    out_file = Path(args.out or REPO / "bench" / "results" / f"compress_memory_{slug}.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    import torch
    result = {"command": "python bench/compress_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                        "vocab": args.vocab, "dtype": args.dtype},
              "calibration": {"samples": args.samples, "seq_len": args.calib_seq_len}, "method": args.method,
              "ratio": args.ratio, "rows": rows}
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out_file}")


def table(rows: list[dict]) -> str:
    mib = lambda b: "" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| layers | mode | weights MiB | peak RSS MiB | plan host MiB | plan / measured | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['plan_host_peak'] / r['peak_rss_bytes']:.2f}" if r.get("plan_host_peak") else "")
        lines.append(f"| {r['layers']} | {r['mode']} | {mib(r['weights_bytes'])} | {mib(r['peak_rss_bytes'])} | "
                     f"{mib(r.get('plan_host_peak'))} | {ratio} | {r['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
