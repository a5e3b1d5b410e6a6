"""Docs that cannot drift: README.md, docs/*.md and bench/README.md against the code.

- Every `lrinfer ...` command line (fenced shell blocks and inline code, usage synopses included)
  parses with the real parser, `lrinfer.cli.build_parser()`; nothing is run.
- Every `python X.py ...` line names an existing script; a script whose `main(argv)` (or
  `build_parser()`) parses without running also gets its flags parsed (stopped right after parsing).
- Every repository path the docs name (links, inline code, non-shell code blocks, scripts that shell
  lines run) exists.
- docs/usage.md shows every subcommand; bench/README.md has a table row for every bench/*.py.

Placeholders: an upper-case word (`DIR`, `R`, `SAMPLES`), a shell variable (`$n`, `"$OUT"`) or
`<...>` stands for any value of the option's type; `...` and `[`/`]` of a synopsis are dropped, and
`a|b|c` is tried once per alternative. Paths: a token is a repository path when its first component
is one of the repository's source folders (SOURCE_DIRS), or, for a document in a subfolder, a folder
beside it (bench/README.md: `results/...`). So `out/...`, `$OUT`, `../shared`, bare file names,
data files and checkpoint files are never repository paths, and a path holding a `<placeholder>`
names a file a command writes, not one the repository holds.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import importlib.util
import io
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
SOURCE_DIRS = ("bench", "docs", "lrinfer", "tests", ".ci")
SHELL_FENCES = ("", "bash", "sh", "shell", "console")   # "": an unlabelled block, read line by line for paths
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|\$\{?\w+\}?|<[^>]+>)$")
SKIPPED_WORDS = {"do", "then", "else", "time", "exec", "env", "nohup", "!"}
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int
    text: str
    kind: str          # "shell" (fenced shell line), "block" (other fenced line), "inline" (code span)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _snippets(doc: Path) -> list[Snippet]:
    """Fenced code lines (continuations joined) and inline code spans (they may wrap lines)."""
    out, prose = [], []
    fence, lang, pending, start = None, "", "", 0
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)\s*(\S*)", line)
        if fence is None and m:
            fence, lang = m.group(1), m.group(2).lower()
            prose.append((n, ""))
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            elif lang in SHELL_FENCES:
                if not pending:
                    start = n
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                kind = "shell" if lang else "block"
                if not pending and re.match(r"^\s+[\[-]", line) and out and out[-1].doc == doc and out[-1].kind == kind \
                        and out[-1].line >= n - 8:    # a synopsis wrapped without `\`: options go on
                    out[-1] = Snippet(doc, out[-1].line, re.sub(r"\s#.*$", "", out[-1].text) + " " + line, kind)
                else:
                    out.append(Snippet(doc, start, pending + line, kind))
                pending = ""
            elif lang not in ("python", "py", "json", "toml", "yaml"):
                out.append(Snippet(doc, n, line, "block"))
            prose.append((n, ""))
            continue
        prose.append((n, line))
    # inline code: per paragraph, so an unmatched backtick cannot swallow the rest of the file
    for _, para in itertools.groupby(prose, key=lambda nl: bool(nl[1].strip())):
        para = list(para)
        text = "\n".join(line for _, line in para)
        for m in re.finditer(r"`([^`]+)`", text):
            line = para[0][0] + text.count("\n", 0, m.start())
            out.append(Snippet(doc, line, m.group(1).replace("\n", " ").replace("\\|", "|"), "inline"))
    return out


def _links(doc: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative markdown link outside code."""
    found = []
    in_fence = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        if not in_fence:
            for m in re.finditer(r"\]\(([^)\s]+)\)", line):
                target = m.group(1).split("#")[0]
                if target and not re.match(r"^[a-z]+:", target):
                    found.append((n, target))
    return found


ALL = [s for d in DOCS for s in _snippets(d)]


def _tokens(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split, lex.commenters = True, "#"
    toks = []
    for t in lex:
        if t.endswith(";") and t != ";":
            toks += [t[:-1], ";"]
        else:
            toks.append(t)
    return toks


def _commands(s: Snippet) -> list[list[str]]:
    """The simple commands of a snippet: split at shell operators, leading VAR=value and keywords dropped."""
    try:
        toks = _tokens(s.text)
    except ValueError as e:     # unbalanced quotes: not a command line anyone can paste
        return [["__unparsable__", str(e)]] if "lrinfer " in s.text else []
    cmds, cur = [], []
    for t in toks + [";"]:
        if t in OPERATORS:
            while cur and (re.match(r"^\w+=", cur[0]) or cur[0] in SKIPPED_WORDS):
                cur.pop(0)
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    return cmds


def _variants(args: list[str], elided: str | None = None) -> list[list[str]]:
    """A synopsis as concrete argument lists: brackets dropped, `...` dropped (or read as the value
    `elided`), `a|b` once per alternative."""
    args = [a.strip("[]") for a in args]
    args = [elided if a in ("...", "…") else a for a in args if a]
    args = [a for a in args if a is not None]
    alts = [a.split("|") if "|" in a and not a.startswith("|") else [a] for a in args]
    first = [a[0] for a in alts]
    out = [first]
    for i, a in enumerate(alts):
        out += [first[:i] + [alt] + first[i + 1:] for alt in a[1:]]
    return out


def _line_error(parse, args: list[str]) -> str | None:
    """The first error of `parse` over the line's variants; `...` is first dropped, then read as a value."""
    def first_error(elided):
        return next(filter(None, (parse(argv) for argv in _variants(args, elided))), None)
    err = first_error(None)
    return first_error("VALUE") and err if err and "..." in args else err


def _relax_types(parser: argparse.ArgumentParser) -> None:
    """Let a placeholder stand for any value of an option's type (choices stay strict)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _relax_types(sub)
        elif callable(action.type) and not getattr(action.type, "_relaxed", False):
            def typed(value, _type=action.type):
                return value if PLACEHOLDER.match(value) else _type(value)
            typed.__name__, typed._relaxed = getattr(action.type, "__name__", "value"), True
            action.type = typed


class _Parsed(Exception):
    """Raised right after a script's parser accepted its arguments, so the script never runs."""


def _parse_error(parse) -> str | None:
    """None if `parse()` parsed; else argparse's one-line error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse()
    except _Parsed:
        return None
    except SystemExit as e:
        if e.code in (0, None):   # --help
            return None
        lines = [l for l in err.getvalue().splitlines() if l.strip()]
        return lines[-1] if lines else f"exit {e.code}"
    return None


@lru_cache(maxsize=None)
def _lrinfer_parser() -> argparse.ArgumentParser:
    from lrinfer.cli import build_parser
    parser = build_parser()
    _relax_types(parser)
    return parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _lrinfer_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@lru_cache(maxsize=None)
def _script_parse(path: Path):
    """A function argv -> error or None for a script that can parse without running; None if it cannot."""
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    main = defs.get("main")
    if "build_parser" not in defs and not (main and (main.args.args or main.args.vararg)):
        return None
    saved = list(sys.path)
    sys.path.insert(0, str(path.parent))     # scripts import their neighbours (bench/kit_core.py)
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module      # dataclasses look their module up while the class is built
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[spec.name]
    finally:
        sys.path[:] = saved

    def parse(argv):
        if hasattr(module, "build_parser"):
            parser = module.build_parser()
            _relax_types(parser)
            return _parse_error(lambda: (parser.parse_args(argv), _raise_parsed()))
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            _relax_types(self)
            original(self, args, namespace)
            raise _Parsed
        argparse.ArgumentParser.parse_args = parse_then_stop
        try:
            return _parse_error(lambda: module.main(argv))
        finally:
            argparse.ArgumentParser.parse_args = original
    return parse


def _raise_parsed():
    raise _Parsed


# --- command lines -------------------------------------------------------------------------------


def _lrinfer_lines():
    for s in ALL:
        for cmd in _commands(s):
            if cmd[0] == "__unparsable__":
                yield s, cmd
            elif cmd[0] == "lrinfer":
                yield s, cmd[1:]


def test_docs_have_lrinfer_command_lines():
    lines = list(_lrinfer_lines())
    assert len(lines) > 30, f"the extractor found only {len(lines)} `lrinfer ...` lines"
    assert {args[0] for _, args in lines if args} >= {"compress", "eval", "serve", "plan", "bench"}


def test_every_lrinfer_command_line_parses():
    failures = []
    for s, args in _lrinfer_lines():
        if args and args[0] == "__unparsable__":
            failures.append(f"{s.where}: `{s.text}`: {args[1]}")
            continue
        if s.kind == "inline" and len(args) <= 1:        # `lrinfer bench` names a subcommand
            if args and args[0] not in _subcommands():
                failures.append(f"{s.where}: `lrinfer {args[0]}`: no such subcommand")
            continue
        err = _line_error(lambda argv: _parse_error(lambda: _lrinfer_parser().parse_args(argv)), args)
        if err:
            failures.append(f"{s.where}: `lrinfer {shlex.join(args)}`: {err}")
    assert not failures, "documented commands the parser refuses:\n" + "\n".join(failures)


def test_every_python_script_line_names_a_script_that_parses():
    failures, parsed = [], 0
    for s in ALL:
        for cmd in _commands(s):
            if cmd[0] not in ("python", "python3") or len(cmd) < 2 or not cmd[1].endswith(".py"):
                continue
            script = REPO / cmd[1]
            if not script.is_file():
                failures.append(f"{s.where}: `{shlex.join(cmd)}`: {cmd[1]} does not exist")
                continue
            parse = _script_parse(script)
            if parse is None:
                continue
            parsed += 1
            err = _line_error(parse, cmd[2:])
            if err:
                failures.append(f"{s.where}: `{shlex.join(cmd)}`: {err}")
    assert not failures, "documented script lines that fail:\n" + "\n".join(failures)
    assert parsed > 10, f"only {parsed} script lines were parsed"


# --- paths ---------------------------------------------------------------------------------------


def _expand(path: str) -> list[str]:
    """`a.json|md` -> a.json, a.md; `s{20,40}.json` -> s20.json, s40.json."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if m:
        return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]
    if "|" in path:
        first, *alts = path.split("|")
        stem = first.rsplit(".", 1)[0]
        return [first] + [f"{stem}.{alt}" for alt in alts]
    return [path]


def _repo_path(token: str, doc: Path) -> Path | None:
    """The repository path a token names (see the module docstring), else None."""
    token = token.strip("'\"`()[],;:").rstrip(".")
    if not token or "://" in token or token.startswith(("-", "$", "~", "/")):
        return None
    head = token.split("/")[0]
    if head in SOURCE_DIRS and "/" in token:
        return REPO / token
    if doc.parent != REPO and "/" in token and head not in (".", "..") and (doc.parent / head).exists():
        return doc.parent / token
    return None


def _named_paths():
    for s in ALL:
        if s.kind == "shell":        # shell lines: the scripts they run and the paths pytest gets
            for cmd in _commands(s):
                if cmd[0] in ("python", "python3") and len(cmd) > 1 and cmd[1].endswith(".py"):
                    yield s.where, cmd[1], s.doc
                elif cmd[0] == "pytest" or cmd[:3] == ["python", "-m", "pytest"]:
                    yield from ((s.where, a, s.doc) for a in cmd[1:] if not a.startswith("-"))
            continue
        for token in s.text.split():
            yield s.where, token, s.doc


def test_every_named_repository_path_exists():
    missing, checked = [], 0
    for where, token, doc in _named_paths():
        path = _repo_path(token, doc)
        if path is None or "<" in str(path):     # a <placeholder>: a file some command writes
            continue
        checked += 1
        rel = str(path.relative_to(REPO))
        if not all(glob.glob(str(REPO / p)) for p in _expand(rel)):
            missing.append(f"{where}: {token}")
    for doc in DOCS:                 # links: relative to the document, wherever they point
        for line, target in _links(doc):
            checked += 1
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)}:{line}: link ({target})")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)
    assert checked > 40, f"only {checked} paths were checked"


def test_library_cites_only_documents_in_the_repo():
    """A `.md` file that lrinfer's docstrings cite is a repository path (`../...` is outside, by design)."""
    missing = []
    for py in sorted((REPO / "lrinfer").rglob("*.py")):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            for name in re.findall(r"[\w./-]*\.md\b", line):
                if not name.startswith("../") and not (REPO / name).is_file():
                    missing.append(f"{py.relative_to(REPO)}:{n}: {name}")
    assert not missing, "documents cited by lrinfer/ that the repository does not hold:\n" + "\n".join(missing)


# --- coverage ------------------------------------------------------------------------------------


def test_usage_shows_every_subcommand():
    usage = REPO / "docs" / "usage.md"
    shown = {args[0] for s, args in _lrinfer_lines() if s.doc == usage and s.kind == "shell" and args}
    missing = sorted(set(_subcommands()) - shown)
    assert not missing, f"docs/usage.md has no command line for: {missing}"


def test_bench_readme_lists_every_script():
    text = (REPO / "bench" / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`([\w.]+\.py)`", text, re.M))
    scripts = {p.name for p in (REPO / "bench").glob("*.py")}
    assert not scripts - rows, f"bench/README.md has no table row for: {sorted(scripts - rows)}"
    assert not rows - scripts, f"bench/README.md has rows for scripts that are gone: {sorted(rows - scripts)}"


@pytest.mark.parametrize("text, expect", [
    ("lrinfer serve DIR [vLLM server options]", "unrecognized arguments"),
    ("lrinfer compress --ratio R --method svdllm|nosuch", "invalid choice"),
    ("lrinfer compress --samples many", "invalid int value"),
])
def test_the_checker_refuses_wrong_lines(text, expect):
    args = _commands(Snippet(REPO / "README.md", 1, text, "shell"))[0][1:]
    errors = [_parse_error(lambda: _lrinfer_parser().parse_args(argv)) for argv in _variants(args)]
    assert any(e and expect in e for e in errors), errors


def test_usage_pipeline_snippet_runs(tmp_path, tiny_hf_dir, monkeypatch):
    """docs/usage.md, "Python: the whole pipeline": the snippet runs as written, with a tiny model in place
    of its model path, a temporary directory in place of its output, and a short text as WikiText-2."""
    section = (REPO / "docs" / "usage.md").read_text().split("### Python: the whole pipeline", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"path/to/hf-model"' in code and '"out/my-model"' in code
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 150
    root = tiny_hf_dir(tmp_path, text, layers=1, hidden=32, intermediate=64)
    for name in ("wikitext-2/valid.txt", "wikitext-2-raw/wiki.test.raw"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text(text)
    monkeypatch.setenv("LRINFER_DATA_DIR", str(tmp_path / "data"))
    code = code.replace('"path/to/hf-model"', repr(str(root / "model"))).replace('"out/my-model"',
                                                                              repr(str(tmp_path / "out")))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "docs/usage.md", "exec"), {})
    assert printed.getvalue().startswith(str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ppl"]["data"].endswith("wiki.test.raw") and report["calibration"]["n_samples"] == 32
