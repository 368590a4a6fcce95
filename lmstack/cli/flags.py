"""Command-line flags from dataclasses, the same way in every `lmstack` command.

Each field becomes one kebab-case flag (`max_new_tokens` -> `--max-new-tokens`) whose dest is the
field's dotted path (`train.optim.lr`), whose help is the first sentence of the field's docstring
and whose default is the field's. A field holding a dataclass is a section: its fields are flags
`--<field>.<subfield>` (or plain `--<subfield>` with flat=True) in a help group of their own.

    parser = make_parser("lmstack sample", __doc__)
    add_fields(parser, SampleArgs)
    args = build(SampleArgs, parser.parse_args(argv))

On the command line a bool flag alone means true (`--stream`, or `--stream false`), an optional
value takes `none`, a list takes its items one after another and a dict takes JSON.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import re
import textwrap
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import NoneType, UnionType


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks in the description; each option's help ends with its
    default unless it names it itself ("(default: ..."), and its metavar is the flag's last word
    (`--train.optim.lr LR`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not action.required and "(default" not in text
                and action.default is not argparse.SUPPRESS):
            text += f" (default: {_show(action.default)})".replace("%", "%%")
        return text

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return action.option_strings[0].lstrip("-").rsplit(".", 1)[-1].upper()


def make_parser(prog: str, description: str | None, usage: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for one command; flags must be spelt out (no prefix abbreviations)."""
    return argparse.ArgumentParser(prog=prog, description=description, usage=usage,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def add_fields(parser: argparse.ArgumentParser, cls: type, *, flat: bool = False,
               rename: dict[str, str] | None = None, skip: set[str] = frozenset(),
               helps: dict[str, str] | None = None, defaults: dict | None = None) -> None:
    """One flag per field of the dataclass `cls` and of the dataclasses inside it. The other
    arguments are keyed by dest: rename gives a flag another name than its field's, skip leaves
    fields out (they keep their default), helps stands in for missing field docstrings and
    defaults replaces field defaults (a config file's values)."""
    rename, helps, defaults = rename or {}, helps or {}, defaults or {}
    for section, kind in _sections(cls):
        docs = _docstrings(kind)
        group = parser.add_argument_group(section[:-1], docs[""]) if section else parser
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            dest = section + f.name
            if dest in skip or dataclasses.is_dataclass(hints[f.name]):
                continue
            text = helps.get(dest) or docs.get(f.name)
            if not text:
                raise TypeError(f"{kind.__name__}.{f.name} has no docstring for its --help; "
                                "write one, or pass the text in helps=")
            name = rename.get(dest) or (f.name if flat else dest).replace("_", "-")
            default = defaults.get(dest, _default(f))
            group.add_argument(f"--{name}", dest=dest, default=default, help=text.replace("%", "%%"),
                               required=default is dataclasses.MISSING,
                               **_type_options(hints[f.name]))


def build(cls: type, ns: argparse.Namespace, prefix: str = ""):
    """The dataclass `cls` from parsed flags, inner sections first, so that each one's
    __post_init__ checks run; fields without a flag keep their default."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = build(hints[f.name], ns, f"{dest}.")
        elif hasattr(ns, dest):
            values[f.name] = getattr(ns, dest)
    return cls(**values)


def dests(cls: type) -> list[str]:
    """The dotted path of every non-dataclass field: what a config file may set."""
    found = []
    for section, kind in _sections(cls):
        hints = typing.get_type_hints(kind)
        found += [section + f.name for f in dataclasses.fields(kind)
                  if not dataclasses.is_dataclass(hints[f.name])]
    return found


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# ----------------------------------------------------------------------------- helpers

def _sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dest prefix, dataclass) for `cls` and every dataclass-valued field inside it."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def _docstrings(cls: type) -> dict[str, str]:
    """{field: first sentence of its docstring}, and {"": the class's docstring}. A field's
    docstring is the string literal under it (the convention jsonargparse and litgpt read too)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs = {"": " ".join((ast.get_docstring(node) or "").split())}
    for stmt, after in itertools.pairwise(node.body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = _first_sentence(after.value.value)
    return docs


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(text.split()), maxsplit=1)[0]


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


_TYPES: dict[type, Callable] = {int: int, float: float, str: str, Path: str, dict: json.loads}


def _type_options(hint) -> dict:
    """add_argument keywords for a field annotated `hint`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not NoneType]
        # str | Path | nn.Module (a model) is a path on the command line
        options = _type_options(rest[0] if len(rest) == 1 else str)
        return {**options, "type": _or_none(options["type"])} if NoneType in args else options
    if typing.get_origin(hint) is list:
        return {"type": _TYPES[args[0]], "nargs": "*"}
    if hint is bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "{true,false}"}
    if hint not in _TYPES:
        raise TypeError(f"no command-line type for a field annotated {hint}")
    return {"type": _TYPES[hint]}


def _or_none(kind: Callable) -> Callable:
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _show(value) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'
