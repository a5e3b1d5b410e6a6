"""One shape for the methods of every stage (selection, allocation, solver): a name, a function
whose keyword-only arguments are its options, and a summary. Options are checked by name and by
type (from the function's annotations) when a config is built, before any work."""
from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Callable

from .errors import LrinferError


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    summary: str

    def options(self) -> dict:
        """Keyword-only options of `fn` and their defaults."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY}

    def option_types(self) -> dict:
        """Option -> its annotation (e.g. float, int | None, Literal['out', 'in'])."""
        hints = typing.get_type_hints(self.fn)
        return {k: hints[k] for k in self.options() if k in hints}

    def check(self, options: dict, owner: str) -> None:
        """Raise on an unknown option or a value of the wrong type; `owner` names the method in the message."""
        known = self.options()
        if unknown := set(options) - set(known):
            raise LrinferError(f"{owner} has no option(s) {sorted(unknown)}; its options are {known or 'none'}")
        hints = self.option_types()
        for key, value in options.items():
            if key in hints and not _fits(value, hints[key]):
                raise LrinferError(f"{owner}: option {key}={value!r} is not {type_name(hints[key])}")

    def __call__(self, *args, **options):
        self.check(options, f"'{self.name}'")
        return self.fn(*args, **options)


class Registry(dict):
    """name -> Method (or a subclass, `kind`), for one stage; `lookup` names the choices when a name is unknown."""

    def __init__(self, what: str, kind: type = Method):
        super().__init__()
        self.what, self.kind = what, kind

    def register(self, name: str, summary: str = "", **fields):
        """Decorator registering a function under `name`; `fields` fill the `kind`'s extra fields."""
        def deco(fn):
            self[name] = self.kind(name, fn, summary or (fn.__doc__ or "").strip().split("\n")[0], **fields)
            return fn
        return deco

    def lookup(self, name: str) -> Method:
        if name not in self:
            raise LrinferError(f"unknown {self.what} '{name}'; choose one of: {', '.join(sorted(self))}")
        return self[name]


def _fits(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def type_name(hint) -> str:
    """float | None -> 'a float or None'; Literal['a', 'b'] -> "one of 'a', 'b'"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return f"an {hint.__name__}" if getattr(hint, "__name__", "x")[0] in "aeiou" else f"a {getattr(hint, '__name__', hint)}"


def parse_value(text: str):
    """An option value from the command line or a recipe spec: a JSON literal when it is one
    (3 -> int, 0.5 -> float, null -> None, true -> bool), else the text itself ('whiten_then_plain')."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
