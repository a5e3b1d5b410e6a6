"""Decode speed and memory inside vLLM on the CPU: dense SmolLM2 against its svdllm checkpoints.

    python bench/vllm_cpu.py                      # dense, 20%, 40%; batch 1 and 16; writes bench/results/vllm_cpu.*
    python bench/vllm_cpu.py --gemm default op    # each checkpoint on the default path and on the forced op path

Runs from the main environment (which makes the dense Hugging Face directory from the packaged GGUF and
the checkpoints with `lrinfer compress`, when missing). Every model is loaded once, in its own persistent
process of vLLM's environment (`--python`, default .venv-vllm/bin/python; see tests/_vllm.py for how it is
built), so memory is per model; the measurements are interleaved (each repeat visits every model, in a
rotating order), so the load swings of a shared machine hit all of them alike.

Each checkpoint runs with each plugin CPU path in `--gemm`: "default" (no --quantization: config.json's
"lrinfer", the plugin's default, which on the CPU is vLLM's prepacked oneDNN matmuls where vLLM's own dense
linears use them), "op" (quantization lrinfer_ops: the registered lrinfer ops, torch math on the CPU) and
"onednn" (quantization lrinfer_onednn: the prepacked oneDNN matmuls, required).

Per model and batch size B: B prompts of `--prompt-len` random tokens; t1 = time of
generate(max_tokens=1) (prefill + first token), tN = time of generate(max_tokens=N) (ignore_eos).
Decode tokens/s = B·(N−1) / (tN − t1), the median over `--repeats` (min-max beside it). Memory: the
weights as served (the checkpoint's tensors in --dtype), the process's RSS growth while vLLM loads the
model (weights, packed copies, the KV cache: a fixed --kv-mib for every model), and its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --gemm: (label, --quantization passed to vLLM; None = config.json's "lrinfer", the plugin's default)
GEMMS = {"default": ("default", None), "op": ("lrinfer ops", "lrinfer_ops"), "onednn": ("oneDNN, forced", "lrinfer_onednn")}


# --- the child: runs in vLLM's environment ----------------------------------------------------------

def _layers(model) -> dict:
    lowrank = [m for m in model.modules() if type(getattr(m, "quant_method", None)).__name__ == "LrinferLinearMethod"]
    return {"lowrank_layers": len(lowrank),
            "onednn_layers": sum(1 for m in lowrank if getattr(m, "lrinfer_onednn", None) is not None)}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the model's weights as served (every stored tensor in `dtype`; tied tensors are stored once).
    vLLM's CPU linears keep their weights in prepacked oneDNN buffers, not in parameters, so this is read
    from the checkpoint rather than from the loaded model."""
    from safetensors import safe_open
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n * itemsize
    return total


def child(args) -> None:
    """A persistent worker: loads one model, then answers {"B": b} lines on stdin with one timed
    measurement each ({"t1", "tN", "decode_tok_s"}), and {"quit": 1} with its peak RSS."""
    import resource

    import numpy as np
    from vllm import LLM, SamplingParams

    def say(obj):
        print(json.dumps(obj), flush=True)

    rss0 = _rss()
    t0 = time.time()
    llm = LLM(model=args.child, dtype=args.dtype, max_model_len=args.prompt_len + args.new_tokens + 8, seed=0,
              enforce_eager=args.eager, max_num_seqs=max(args.batch), enable_prefix_caching=False,
              kv_cache_memory_bytes=args.kv_mib * 2**20, quantization=args.quantization)
    say({"ready": True, "start_s": round(time.time() - t0, 1), "layers": llm.apply_model(_layers)[0],
         "quantization": llm.llm_engine.vllm_config.model_config.quantization,
         "rss_before_bytes": rss0, "rss_loaded_bytes": _rss()})
    rng = np.random.default_rng(0)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            say({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
            return
        B = cmd["B"]
        if B not in prompts:
            prompts[B] = [{"prompt_token_ids": rng.integers(100, 40000, args.prompt_len).tolist()} for _ in range(B)]
            llm.generate(prompts[B], many, use_tqdm=False)   # warm-up (compiles each shape once)
        t = time.perf_counter()
        llm.generate(prompts[B], one, use_tqdm=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        res = llm.generate(prompts[B], many, use_tqdm=False)
        tn = time.perf_counter() - t
        assert all(len(r.outputs[0].token_ids) == args.new_tokens for r in res)
        say({"t1": t1, "tN": tn, "decode_tok_s": B * (args.new_tokens - 1) / max(tn - t1, 1e-9)})


# --- the parent: main environment ----------------------------------------------------------------

def prepare(work: Path, ratios: list[float], samples: int) -> dict[str, Path]:
    """{label: directory}: work/dense (the packaged SmolLM2 as a Hugging Face directory) and
    work/svdllm-<ratio> (`lrinfer compress --method svdllm --ratio R --samples S --no-eval`), made when missing."""
    dirs = {"dense": work / "dense"}
    if not (dirs["dense"] / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        import lrinfer
        model, tok, _ = lrinfer.load_model()
        # a GGUF-loaded model is marked quantized and refuses save_pretrained: copy it into a plain one
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(dirs["dense"])
        tok.save_pretrained(dirs["dense"])
        del model, plain
    for r in ratios:
        d = work / f"svdllm-{r:g}"
        if not (d / "lrinfer.json").is_file():
            cmd = [sys.executable, "-m", "lrinfer.cli", "compress", "--method", "svdllm", "--ratio", str(r),
                   "--samples", str(samples), "--no-eval", "--no-progress", "--out", str(d)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        dirs[f"svdllm {r:.0%}"] = d
    return dirs


class Worker:
    """One model in its own vLLM process (so memory is per model), driven over stdin/stdout."""

    def __init__(self, python: str, label: str, model_dir: Path, quantization: str | None, args, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
                   OMP_NUM_THREADS=str(args.threads), VLLM_NO_USAGE_STATS="1")
        cmd = [python, __file__, "--child", str(model_dir), "--dtype", args.dtype, "--batch", *map(str, args.batch),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--kv-mib", str(args.kv_mib)]
        if quantization:
            cmd += ["--quantization", quantization]
        if args.eager:
            cmd.append("--eager")
        self.label, self.log = label, log
        self._err = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"vLLM worker {self.label} died:\n{self.log.read_text()[-5000:]}")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask(quit=1)
        self.proc.wait(60)
        self._err.close()
        return out


def summarize(results: dict[str, dict], batches: list[int], weights: dict[str, int]) -> dict:
    out = {}
    for label, r in results.items():
        row = {"weights_MiB": weights[label] / 2**20, "lowrank_layers": r["info"]["layers"]["lowrank_layers"],
               "onednn_layers": r["info"]["layers"].get("onednn_layers", 0),
               "quantization": r["info"]["quantization"],
               "load_rss_MiB": (r["info"]["rss_loaded_bytes"] - r["info"]["rss_before_bytes"]) / 2**20,
               "peak_rss_MiB": r["peak_rss_bytes"] / 2**20}
        for B in batches:
            vals = [x["decode_tok_s"] for x in r["runs"][str(B)]]
            row[f"decode_tok_s_b{B}"] = statistics.median(vals)
            row[f"decode_tok_s_b{B}_min_max"] = [min(vals), max(vals)]
        out[label] = row
    return out


def markdown(summary: dict, meta: dict, batches: list[int]) -> str:
    dense = summary["dense"]
    lines = ["# vLLM on the CPU: decode speed and memory, dense SmolLM2-135M vs svdllm checkpoints", "",
             f"vLLM {meta['vllm']} ({meta['mode']}), {meta['dtype']}, {meta['threads']} OpenMP thread(s), "
             f"{meta['cpu']}; prompt {meta['prompt_len']} random tokens, {meta['new_tokens']} new tokens "
             f"(ignore_eos), median of {meta['repeats']} interleaved repeats (min-max in brackets); KV cache "
             f"{meta['kv_mib']} MiB for every model. Load average at start {meta['loadavg_start']}, "
             f"at end {meta['loadavg_end']} (a shared machine).", "",
             "| model | low-rank layers (oneDNN) | weights (MiB) | RSS growth at load (MiB) | peak RSS (MiB) | "
             + " | ".join(f"decode tok/s, batch {B}" for B in batches) + " |",
             "|---|---|---|---|---|" + "---|" * len(batches)]
    for label, row in summary.items():
        cells = [label, f"{row['lowrank_layers']} ({row['onednn_layers']})", f"{row['weights_MiB']:.1f} ({row['weights_MiB'] / dense['weights_MiB']:.2f}x)",
                 f"{row['load_rss_MiB']:.0f}", f"{row['peak_rss_MiB']:.0f}"]
        for B in batches:
            v = row[f"decode_tok_s_b{B}"]
            lo, hi = row[f"decode_tok_s_b{B}_min_max"]
            cells.append(f"{v:.1f} ({v / dense[f'decode_tok_s_b{B}']:.2f}x; {lo:.1f}-{hi:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's environment")
    ap.add_argument("--work", default=str(ROOT / "out" / "vllm-bench"), help="dense directory and checkpoints")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--samples", type=int, default=8, help="calibration samples for missing checkpoints")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=8, help="timed runs per model and batch size (interleaved)")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads of each vLLM process")
    ap.add_argument("--kv-mib", type=int, default=256, help="KV cache of every model (kv_cache_memory_bytes)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--gemm", nargs="+", default=["default"], choices=list(GEMMS),
                    help="the plugin's CPU path(s) for the checkpoints: default (config.json's quantization "
                         "lrinfer: oneDNN where vLLM's dense linears use it), op (--quantization lrinfer_ops), "
                         "onednn (--quantization lrinfer_onednn); default: default")
    ap.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu"), help="writes OUT.json and OUT.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    prepared = prepare(Path(args.work), args.ratios, args.samples)
    # (label, directory, quantization): the dense model once, each checkpoint once per --gemm path
    jobs = [("dense", prepared.pop("dense"), None)]
    jobs += [(label if len(args.gemm) == 1 else f"{label} ({GEMMS[g][0]})", d, GEMMS[g][1])
             for label, d in prepared.items() for g in args.gemm]
    dirs = {label: d for label, d, _ in jobs}
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    workers = []
    for label, d, q in jobs:   # one at a time, so start-ups (compiles) do not overlap
        t = time.time()
        workers.append(Worker(args.python, label, d, q, args, logs / f"{label.replace(' ', '_').replace('%', '')}.log"))
        print(f"{label}: loaded in {time.time() - t:.0f} s", flush=True)
    results = {w.label: {"info": w.info, "runs": {str(B): [] for B in args.batch}} for w in workers}
    for rep in range(args.repeats):   # interleaved: every repeat visits every model, in a rotating order
        rot = workers[rep % len(workers):] + workers[:rep % len(workers)]
        for w in rot:
            for B in args.batch:
                results[w.label]["runs"][str(B)].append(w.ask(B=B))
        print(f"repeat {rep + 1}/{args.repeats}: " + "; ".join(
            f"{w.label} " + " ".join(f"b{B} {results[w.label]['runs'][str(B)][-1]['decode_tok_s']:.0f}"
                                     for B in args.batch) for w in workers), flush=True)
    for w in workers:
        results[w.label]["peak_rss_bytes"] = w.close()["peak_rss_bytes"]
    vllm_version = subprocess.run([args.python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
    meta = {"vllm": vllm_version, "dtype": args.dtype, "threads": args.threads, "mode": "eager" if args.eager else
            "torch.compile", "cpu": platform.processor() or platform.machine(), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "kv_mib": args.kv_mib,
            "loadavg_start": [round(x, 1) for x in load0], "loadavg_end": [round(x, 1) for x in os.getloadavg()],
            "models": {k: str(v) for k, v in dirs.items()},
            "command": "python bench/vllm_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    summary = summarize(results, args.batch, {label: weight_bytes(d, args.dtype) for label, d in dirs.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=2))
    md = markdown(summary, meta, args.batch)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
