"""Stage 5 of the GPU kit (bench/gpu_kit.py), compression on the GPU, and `--prepare`, what it needs
carried there: the trained student's perplexity on the GPU against the CPU (dense and compressed),
and a Llama-2-7B-shaped random model compressed by svdllm at 20%: wall time and peak device memory."""
from __future__ import annotations

import copy
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch

from kit_core import CARRY, ROOT, Kit, _finish, _log, _start
from kit_report import NO_CUDA, write_json

STUDENT = {"steps": 500, "calib": (32, 256), "eval": (64, 256), "ratio": 0.2, "method": "svdllm"}
STUDENT_TINY = {"steps": 2, "calib": (4, 64), "eval": (4, 64), "ratio": 0.2, "method": "svdllm",
                "chars": 60_000, "vocab": 300, "batch": 2, "seq_len": 64,
                "model_kw": dict(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1)}
LLAMA_CALIB = (32, 2048)


def find_data_dir() -> Path | None:
    import lrinfer

    try:
        d = lrinfer.resolve_data_dir()
    except Exception:
        d = None
    if d is not None and (d / "wikitext-2" / "valid.txt").is_file():
        return d
    carried = CARRY / "data"
    return carried if (carried / "wikitext-2" / "valid.txt").is_file() else None


def _student_source(kit: Kit, data_dir: Path, spec: dict):
    """(model, tokenizer, how) from --student, the carried copy, or trained here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for cand in ([Path(kit.student)] if kit.student else []) + [CARRY / "student", ROOT / "out" / "qwen2-student"]:
        if (cand / "config.json").is_file() and not kit.dry:
            model = AutoModelForCausalLM.from_pretrained(cand, dtype=torch.float32).eval()
            return model, AutoTokenizer.from_pretrained(cand), f"loaded from {cand}"
    import train_student
    from lrinfer.data import load_text

    text, _ = load_text("wikitext2", "calib", data_dir)
    if kit.dry:
        model, tok, rec = train_student.train(text[:spec["chars"]], spec["steps"], spec["batch"], spec["seq_len"],
                                              spec["vocab"], device=kit.device, model_kw=spec["model_kw"],
                                              progress=lambda m: None)
    else:
        model, tok, rec = train_student.train(text, spec["steps"], device=kit.device, progress=kit.log)
    return model, tok, f"trained here on {kit.device} ({spec['steps']} steps, {rec['seconds']} s)"


def student_ppl(model, tok, data_dir: Path, spec: dict, device: str) -> dict:
    """Dense and compressed (spec method/ratio) perplexity of a copy of `model` on `device`."""
    import lrinfer

    windows, desc = lrinfer.eval_windows(tok, "wikitext2", spec["eval"][1], spec["eval"][0], data_dir)
    calib, _ = lrinfer.calibration_batch(tok, "wikitext2", spec["calib"][0], spec["calib"][1], data_dir=data_dir)
    m = copy.deepcopy(model).to(device)
    t = time.perf_counter()
    dense = lrinfer.perplexity(m, windows, progress=False)["ppl"]
    cfg = lrinfer.CompressConfig(method=spec["method"], ratio=spec["ratio"], n_samples=spec["calib"][0],
                                 seq_len=spec["calib"][1])
    lrinfer.compress(m, cfg, calib, progress=False)
    comp = lrinfer.perplexity(m, windows, progress=False)["ppl"]
    return {"device": device, "ppl_dense": dense, "ppl_compressed": comp, "seconds": time.perf_counter() - t,
            "eval": desc, "windows": list(windows.shape), "calib": list(calib.shape)}


def _rel(a, b):
    return abs(a / b - 1) if a and b and math.isfinite(a) and math.isfinite(b) else None


def stage_compress(kit: Kit, prev) -> dict:
    import lrinfer

    t0 = time.perf_counter()
    rec = _start(kit, 5, prev)
    spec = STUDENT_TINY if kit.dry else STUDENT
    complete = True

    # (a) the student: CPU vs GPU perplexity, dense and compressed
    if "student" not in rec:
        data_dir = find_data_dir()
        if data_dir is None:
            rec["student"] = {"status": "skipped", "reason": "no WikiText-2 data here: run `python bench/gpu_kit.py "
                              "--prepare` where ../shared/data exists and pass carry=['out/gpu-kit-carry']"}
        else:
            st = {"data_dir": str(data_dir), "spec": {k: v for k, v in spec.items() if k != "model_kw"}}
            model, tok, st["source"] = _student_source(kit, data_dir, spec)
            st["cpu"] = student_ppl(model, tok, data_dir, spec, "cpu")
            if kit.cuda:
                st["gpu"] = student_ppl(model, tok, data_dir, spec, "cuda")
                st["rel_diff_dense"] = _rel(st["gpu"]["ppl_dense"], st["cpu"]["ppl_dense"])
                st["rel_diff_compressed"] = _rel(st["gpu"]["ppl_compressed"], st["cpu"]["ppl_compressed"])
                ok = [st["rel_diff_dense"], st["rel_diff_compressed"]]
                st["within_1pct"] = all(d is not None and d <= 0.01 for d in ok)
            else:
                st["gpu"] = NO_CUDA
            ref = CARRY / "student_cpu_ref.json"
            if ref.is_file() and "loaded from" in st["source"] and str(CARRY) in st["source"]:
                r = json.loads(ref.read_text())
                st["dev_machine_cpu"] = r
                st["rel_diff_vs_dev_machine_cpu"] = {
                    k: _rel(st["cpu"][k], r.get(k)) for k in ("ppl_dense", "ppl_compressed")}
            st["status"] = "done"
            rec["student"] = st
            kit.log(f"student: {st['source']}; CPU PPL {st['cpu']['ppl_dense']:.3f} / {st['cpu']['ppl_compressed']:.3f}"
                    + (f"; GPU {st['gpu']['ppl_dense']:.3f} / {st['gpu']['ppl_compressed']:.3f}" if kit.cuda else ""))
        kit.save(rec, "incomplete", "in progress")

    # (b) Llama-2-7B-shaped random model, svdllm 20%, 32×2048 calibration tokens
    if "llama" not in rec:
        if kit.expired():
            complete = False
        else:
            rec["llama"] = llama_compress(kit, lrinfer)
    return _finish(kit, rec, complete, t0)


def llama_compress(kit: Kit, lrinfer) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    if kit.dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
        n, T, dtype = 4, 32, torch.float32
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=kit.llama_layers,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096)
        (n, T), dtype = LLAMA_CALIB, torch.bfloat16
    dev = torch.device(kit.device)
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    calib = torch.randint(0, cfg.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    out = {"layers": cfg.num_hidden_layers, "calib": [n, T], "dtype": str(dtype), "method": "svdllm", "ratio": 0.2,
           "weights_GiB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
           "block_GiB": block_bytes / 2**30}
    if kit.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = lrinfer.compress(model, lrinfer.CompressConfig(method="svdllm", ratio=0.2, n_samples=n, seq_len=T),
                           calib, progress=False)
    if kit.cuda:
        torch.cuda.synchronize()
    out["wall_s"] = time.perf_counter() - t
    out["hidden_error_last"] = res.hidden_error[-1] if res.hidden_error else None
    out["seconds_per_block"] = out["wall_s"] / cfg.num_hidden_layers
    if kit.cuda:
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.num_hidden_layers < 32:
            extra = 32 - cfg.num_hidden_layers
            out["estimate_32_layers"] = {
                "wall_s": out["wall_s"] + extra * out["seconds_per_block"],
                "peak_GiB_upper": out["peak_GiB"] + extra * out["block_GiB"],
                "how": f"measured on {cfg.num_hidden_layers} of Llama-2-7B's 32 layers: time scales per block; "
                       "peak + the dense weights of the missing blocks (an upper bound)"}
    else:
        out["peak_GiB"] = NO_CUDA
    kit.log(f"llama-shaped ({cfg.num_hidden_layers} layers) svdllm 20%: {out['wall_s']:.1f} s"
            + (f", peak {out['peak_GiB']:.2f} GiB" if kit.cuda else ""))
    del model
    if kit.cuda:
        torch.cuda.empty_cache()
    return out


def prepare(student: str | None, log=_log) -> dict:
    """out/gpu-kit-carry/: WikiText-2 (valid + test), and the student with its CPU reference if one exists."""
    import lrinfer

    src = lrinfer.resolve_data_dir()
    if src is None or not (src / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit("gpu_kit --prepare: no ../shared/data (or $LRINFER_DATA_DIR) with wikitext-2 here")
    for rel in ("wikitext-2/valid.txt", "wikitext-2-raw/wiki.test.raw"):
        dst = CARRY / "data" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst)
    info = {"data": str(CARRY / "data")}
    cand = Path(student) if student else ROOT / "out" / "qwen2-student"
    if (cand / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dst = CARRY / "student"
        if dst.resolve() != cand.resolve():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(cand, dst)
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        ref = student_ppl(model, AutoTokenizer.from_pretrained(dst), CARRY / "data", STUDENT, "cpu")
        ref.update(host=platform.node(), torch=torch.__version__, source=str(cand))
        write_json(CARRY / "student_cpu_ref.json", ref)
        info["student"] = str(dst)
        info["cpu_ref"] = ref
    else:
        info["student"] = f"none at {cand}: stage 5 will train one on the GPU"
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    info["MiB"] = round(size / 2**20, 1)
    log(json.dumps(info, indent=1))
    log(f"carry with the device tool: carry=['out/gpu-kit-carry'] ({info['MiB']} MiB of the 64 MiB)")
    return info

