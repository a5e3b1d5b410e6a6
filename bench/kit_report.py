"""Targets, summary and export of the GPU kit (bench/gpu_kit.py): reads the stage JSON files only."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

NO_CUDA = "skipped: no CUDA device"
STAGES = {
    1: ("tests", "pytest -m gpu tests/kernels (dtypes, CUDA graphs, torch.compile, two streams, PDL)"),
    2: ("sweep", "kernel sweep: six shapes × 20/40/60% × M ∈ {1, 4, 16, 64, 512, 8192}"),
    3: ("tune", "tuner on the six shapes at 40%, then the sweep with the tuned table"),
    4: ("e2e", "decode tokens/s and peak memory, Llama-2-7B-shaped, batch 1/8/32, dense vs 40%, CUDA graphs"),
    5: ("compress", "compression on the GPU: student PPL vs CPU; Llama-2-7B-shaped svdllm 20% time and memory"),
}


def write_json(path: Path, data) -> None:
    """Atomic write (a killed command never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _sweep_rows(out: Path) -> tuple[list, str, dict]:
    """Rows for the targets: stage 3's tuned sweep where it has the case, else stage 2's."""
    rows, src, roof = {}, "", {}
    for n, key in ((2, "rows"), (3, "rows")):
        p = out / f"stage{n}_{STAGES[n][0]}.json"
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        if d.get("dry_run"):
            continue
        roof = d.get("roofline") or roof
        got = [r for r in d.get(key, []) if r.get("tag") != "compile"]
        for r in got:
            rows[(r["model"], r["in"], r["out"], r["reduction"], r["M"])] = {
                **r, "_src": "stage 3 (tuned table)" if n == 3 else "stage 2"}
        if got:
            src = "stage 2" if not src else "stage 3 (tuned table) where measured, else stage 2"
    return list(rows.values()), src, roof


def _speed(r, base):
    res = r.get("results", {})
    if "us" in res.get("ours", {}) and "us" in res.get(base, {}):
        return res[base]["us"] / res["ours"]["us"]
    return None


def evaluate_targets(out: Path) -> list[dict]:
    """Every target of issue 14 with its measured value and whether it was met (None: not measured)."""
    out = Path(out)
    rows, src, roof = _sweep_rows(out)
    targets = []

    def add(name, threshold, value, met, source, note=""):
        targets.append({"target": name, "threshold": threshold, "value": value, "met": met, "source": source,
                        "note": note})

    def pick(i, o, red, M):
        return [r for r in rows if (r["in"], r["out"], r["reduction"], r["M"]) == (i, o, red, M)]

    for (i, o), thr in (((4096, 4096), 1.30), ((4096, 11008), 1.45)):
        rs = pick(i, o, 0.4, 1)
        v = _speed(rs[0], "dense") if rs else None
        add(f"decode M=1, 40%, {i}→{o}: ours vs dense cuBLAS", f"≥ {thr:.2f}×", v,
            None if v is None else v >= thr, rs[0]["_src"] if rs else src,
            f"ours = {rs[0]['method_ours']}" if rs else "")
    m1 = [r for r in rows if r["M"] == 1 and r["k"] >= 1024 and "copy_frac" in r.get("results", {}).get("ours", {})]
    if m1:
        worst = min(m1, key=lambda r: r["results"]["ours"]["copy_frac"])
        v = worst["results"]["ours"]["copy_frac"]
        add("decode M=1, rank ≥ 1024: ours' bytes moved / time vs measured copy bandwidth", "≥ 80%", v, v >= 0.80,
            worst["_src"], f"worst of {len(m1)}: {worst['in']}→{worst['out']} at {worst['reduction']:.0%} (k={worst['k']}); "
                 f"copy {roof.get('copy_GBps', float('nan')):.0f} GB/s")
    else:
        add("decode M=1, rank ≥ 1024: ours vs measured copy bandwidth", "≥ 80%", None, None, src)
    vs = [(r, _speed(r, "unfused")) for r in rows]
    vs = [(r, v) for r, v in vs if v is not None]
    if vs:
        r, v = min(vs, key=lambda t: t[1])
        add("every case: ours never slower than unfused eager", "unfused/ours ≥ 1.00×", v, v >= 1.0, r["_src"],
            f"worst of {len(vs)}: {r['in']}→{r['out']} at {r['reduction']:.0%}, M={r['M']} (ours = {r['method_ours']})"
            + ("; within 2% timing noise: re-time before concluding" if 0.98 <= v < 1.0 else ""))
    else:
        add("every case: ours never slower than unfused eager", "unfused/ours ≥ 1.00×", None, None, src)
    pre = [(r, _speed(r, "dense")) for r in rows if r["M"] == 8192 and r["reduction"] == 0.4]
    pre = [(r, v) for r, v in pre if v is not None]
    if pre:
        r, v = min(pre, key=lambda t: t[1])
        add("prefill M=8192, 40%: ours vs dense (worst shape)", "≥ 1.35×", v, v >= 1.35, r["_src"],
            ", ".join(f"{x['in']}→{x['out']} {s:.2f}×" for x, s in pre))
    else:
        add("prefill M=8192, 40%: ours vs dense (worst shape)", "≥ 1.35×", None, None, src)
    e2e = out / "stage4_e2e.json"
    v, note, src4 = None, "", ""
    if e2e.is_file():
        d = json.loads(e2e.read_text())
        if not d.get("dry_run"):
            src4 = "stage 4"
            hit = [r for r in d.get("rows", []) if r["reduction"] == 0.4 and r["batch"] == 1]
            if hit:
                v = hit[0].get("graph_speedup_vs_dense")
                note = f"eager (no graph): {hit[0].get('eager_speedup_vs_dense') or float('nan'):.2f}×"
    add("e2e Llama-2-7B-shaped, 40%, batch 1, both CUDA-graphed: tokens/s vs dense", "≥ 1.40×", v,
        None if v is None else v >= 1.40, src4, note)
    st, v, note, src5 = None, None, "", ""
    c5 = out / "stage5_compress.json"
    if c5.is_file():
        d = json.loads(c5.read_text())
        if not d.get("dry_run"):
            st = d.get("student", {})
            src5 = "stage 5"
            if isinstance(st.get("gpu"), dict):
                v = max(st.get("rel_diff_dense") or 0, st.get("rel_diff_compressed") or 0)
                note = (f"CPU {st['cpu']['ppl_dense']:.3f}/{st['cpu']['ppl_compressed']:.3f}, GPU "
                        f"{st['gpu']['ppl_dense']:.3f}/{st['gpu']['ppl_compressed']:.3f} (dense/svdllm 20%)")
    add("student perplexity on the GPU vs the CPU (dense and svdllm 20%)", "within 1%", v,
        None if v is None else v <= 0.01, src5, note)
    return targets


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_summary(out: Path) -> str:
    out = Path(out)
    lines = ["# lrinfer GPU kit", ""]
    recs = {}
    for n in STAGES:
        p = out / f"stage{n}_{STAGES[n][0]}.json"
        recs[n] = json.loads(p.read_text()) if p.is_file() else None
    env = next((r["env"] for r in recs.values() if r and r.get("env")), {})
    lines.append(f"GPU: {env.get('gpu', 'none (CPU)')}; torch {env.get('torch')}; triton {env.get('triton')}; "
                 f"transformers {env.get('transformers')}; python {env.get('python')}; "
                 f"launch features {env.get('launch')}")
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for n, r in recs.items():
        if r is None:
            lines.append(f"| {n} {STAGES[n][0]} | not run | | {STAGES[n][1]} |")
            continue
        note = r.get("reason", "")
        if n == 1 and r.get("counts"):
            note = f"{r['counts']}; " + note
        lines.append(f"| {n} {STAGES[n][0]} | {r['status']}{' (dry run)' if r.get('dry_run') and r['status'] != 'dry-run' else ''}"
                     f" | {r.get('seconds', '')} | {note} |")
    targets = evaluate_targets(out)
    dry = all(r is None or r.get("dry_run") for r in recs.values())
    lines += ["", "## Targets (H100/H200, bf16, CUDA-graph timing)", ""]
    if dry:
        lines += ["Dry run only: the targets are GPU measurements, none is measured yet.", ""]
    lines += [
              "| target | threshold | measured | met | source | note |", "|---|---|---|---|---|---|"]
    for t in targets:
        met = {True: "**yes**", False: "**NO**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['threshold']} | {_fmt(t['value'])} | {met} | {t['source']} | {t['note']} |")
    r1 = recs.get(1)
    if r1 and r1.get("failures"):
        lines += ["", "## Failing GPU tests", ""] + [f"- `{f['test']}`: {f['message'][:300]}" for f in r1["failures"][:30]]
    r4 = recs.get(4)
    if r4 and r4.get("rows"):
        lines += ["", "## End to end (stage 4)", "", "| reduction | batch | graph tok/s | eager tok/s | graph × dense | "
                  "peak GiB | weights GiB |", "|---|---|---|---|---|---|---|"]
        for r in r4["rows"]:
            lines.append(f"| {r['reduction']:.0%} | {r['batch']} | {_fmt(r.get('graph_tokens_per_s'))} | "
                         f"{_fmt(r.get('eager_tokens_per_s'))} | {_fmt(r.get('graph_speedup_vs_dense'))} | "
                         f"{_fmt(r.get('peak_GiB'))} | {_fmt(r.get('weights_GiB'))} |")
    r5 = recs.get(5)
    if r5 and r5.get("llama"):
        ll = r5["llama"]
        lines += ["", "## Compression on the device (stage 5)", "",
                  f"Llama-2-7B-shaped, {ll['layers']} layers, svdllm 20%, calibration {ll['calib']}: "
                  f"{_fmt(ll['wall_s'])} s, peak "
                  + (f"{ll['peak_GiB']:.2f} GiB" if isinstance(ll["peak_GiB"], float) else str(ll["peak_GiB"]))
                  + (f"; estimated for 32 layers: {ll['estimate_32_layers']['wall_s']:.0f} s, "
                     f"≤ {ll['estimate_32_layers']['peak_GiB_upper']:.1f} GiB" if ll.get("estimate_32_layers") else "")]
    r3 = recs.get(3)
    if r3 and r3.get("install") and not r3.get("dry_run"):
        lines += ["", f"Tuned table: `{r3['install']}`"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    write_json(out / "summary.json", {"targets": targets,
                                      "stages": {n: (r or {}).get("status", "not run") for n, r in recs.items()}})
    return text


def export(out: Path, dest: Path) -> Path:
    """out/* (files only) as dest/gpu-kit.tgz, and summary.md beside it (what the device tool returns)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / "gpu-kit.tgz"
    tmp = dest / "gpu-kit.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(Path(out).iterdir()):
            if p.is_file() and not p.name.endswith(".tmp"):
                tar.add(p, arcname=p.name)
    os.replace(tmp, tgz)
    if (Path(out) / "summary.md").is_file():
        shutil.copy(Path(out) / "summary.md", dest / "summary.md")
    return tgz


