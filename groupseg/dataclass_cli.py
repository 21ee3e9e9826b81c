"""Command-line options generated from a config dataclass: one ``--kebab-case`` flag per field.

Each option takes its type from the field's annotation (``int``, ``float``, ``str``, ``bool`` as
``--flag/--no-flag``, ``Literal[...]`` as choices, ``tuple[float, float]`` as two values, ``dict``
as JSON), its default from the field, and its help from ``field(metadata={"help": ...})`` or else
from the comment after the field in the class's source; ``--help`` shows type and default.
``metadata={"required": True}`` makes an option required. Imports nothing heavy.

>>> from dataclasses import dataclass
>>> from typing import Literal
>>> @dataclass
... class Cfg:
...     steps: int = 10  # optimizer steps
...     mode: Literal["a", "b"] = "a"
>>> p = argparse.ArgumentParser()
>>> add_dataclass_args(p, Cfg)
>>> dataclass_from_args(Cfg, p.parse_args(["--steps", "3", "--mode", "b"]))
Cfg(steps=3, mode='b')
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from typing import Any, Literal

_MISSING = dataclasses.MISSING


def field_comments(cls: type) -> dict[str, str]:
    """``{field name: the comment after it}`` read from the class's source ({} when unavailable)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m and not m.group(2).startswith("noqa"):
            out[m.group(1)] = m.group(2).strip()
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return " ".join(a.__name__ for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _option(hint: Any, default: Any) -> tuple[dict[str, Any], str]:
    """argparse keywords and a type label for a field annotation."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]: X, with None as the default
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}, "flag"
    if origin is Literal:
        choices = list(typing.get_args(hint))
        return {"choices": choices, "type": type(choices[0])}, "one of " + ", ".join(map(str, choices))
    if origin is tuple:
        args = typing.get_args(hint)
        return {"nargs": len(args), "type": args[0]}, _type_name(hint)
    if hint is dict or origin is dict:
        return {"type": json.loads}, "JSON object"
    if hint in (int, float, str):
        return {"type": hint}, hint.__name__
    return {"type": str}, _type_name(hint)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, exclude: typing.Iterable[str] = (),
                       set_defaults: bool = True) -> None:
    """Add one ``--kebab-case`` option per field of the dataclass ``cls`` to ``parser``.

    Args:
        parser: the parser (or argument group) to extend.
        cls: a dataclass whose fields have annotations and defaults.
        exclude: field names to leave out.
        set_defaults: put the field defaults into the parsed namespace; ``False`` leaves options
            not given out of it (for flags that override a config file), the help still shows them.
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        kw, label = _option(hints[f.name], default)
        required = bool(f.metadata.get("required"))
        text = f.metadata.get("help") or comments.get(f.name, "")
        shown = "" if required else f", default: {default!r}"
        kw["help"] = f"{text} [{label}{shown}]".strip().replace("%", "%%")
        if required:
            kw["required"] = True
        else:
            kw["default"] = default if set_defaults else argparse.SUPPRESS
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from the parsed options of ``add_dataclass_args`` (its ``__post_init__`` checks run)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple and v is not None else v
    return cls(**values)
