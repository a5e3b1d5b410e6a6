"""No folder or module of the checkout may be importable under the name of an installed package.

transformers >= 5.25 imports the Hub's `kernels` package when it is installed; when `tests/kernels/`
was importable as `kernels` (pytest put `tests/` on sys.path), every test that loaded transformers
failed. The tests are one package (`tests/__init__.py`), so pytest puts the checkout's root on
sys.path, not `tests/`, and each test module is `tests.<name>`."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WATCHED = ("kernels", "transformers", "vllm", "triton", "lrinfer", "torch", "safetensors")


def _inside(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root)


def _importable_names(folder: Path) -> set[str]:
    """Top-level names a sys.path entry `folder` makes importable (packages, namespace dirs, modules)."""
    names = set()
    for p in folder.iterdir():
        if p.name.startswith((".", "_")) or p.name == "__pycache__":
            continue
        if p.is_dir() and p.name.isidentifier():
            names.add(p.name)
        elif p.suffix in (".py", ".so") and p.stem.isidentifier():
            names.add(p.stem)
    return names


@pytest.mark.parametrize("name", WATCHED)
def test_watched_packages_resolve_outside_tests(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed here")
    where = [spec.origin, *(spec.submodule_search_locations or [])]
    assert not any(_inside(w, TESTS) for w in where), f"`import {name}` resolves inside tests/: {where}"


def test_tests_folder_is_not_on_sys_path():
    on_path = [p for p in sys.path if p and _inside(p, TESTS)]
    assert not on_path, f"folders inside tests/ are on sys.path (make them packages): {on_path}"


def test_tests_are_one_package():
    """Every folder of tests/ holding test modules is a package of `tests`, so none is imported by its bare name."""
    missing = [str(d.relative_to(REPO)) for d in [TESTS, *TESTS.rglob("*")]
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("test_*.py")) and not (d / "__init__.py").is_file()]
    assert not missing, f"test folders without __init__.py (pytest would put their parent on sys.path): {missing}"


def test_checkout_shadows_no_installed_distribution():
    """The checkout's folders that are on sys.path during the run offer no name an installed
    distribution owns (except lrinfer itself, the package of this checkout)."""
    owned = importlib.metadata.packages_distributions()
    prefix = Path(sys.prefix).resolve()
    clashes = []
    for entry in {Path(p or ".").resolve() for p in sys.path}:
        # the checkout's own folders; an environment kept inside it (.venv/) holds the installed packages
        if entry.is_dir() and entry.is_relative_to(REPO) and not entry.is_relative_to(prefix) \
                and "site-packages" not in entry.parts:
            for name in _importable_names(entry):
                dists = set(owned.get(name, ())) - {"lrinfer"}
                if dists:
                    clashes.append(f"{entry.relative_to(REPO) if entry != REPO else '.'}/{name} (installed by {sorted(dists)})")
    assert not clashes, f"the checkout shadows installed packages: {clashes}"
