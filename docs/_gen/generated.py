"""Pages of the documentation site generated from the code, as an MkDocs hook.

A page asks for a generated part with a marker on a line of its own::

    <!-- generated: config-reference -->

and :func:`on_page_markdown` puts the part there while the site builds, so the
reference cannot drift from the code: the configuration keys from the config
classes and their docstrings, the command line from its argparse parser, the loggers
from ``eventbus._logging.LOGGERS``, and the benchmark results recorded in
``bench/results/`` if there are any. ``tests/test_docs.py`` checks what they give.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


class MissingDoc(Exception):
    """A setting or command the generated reference cannot describe."""


# -- configuration ------------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style class docstring, as
    ``{name: text}`` (continuation lines joined, reST roles and literals as code)."""
    doc = cls.__doc__ or ""
    lines = doc.expandtabs().splitlines()
    found: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return found
    base: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None if base is not None else current
            continue
        indent = len(line) - len(line.lstrip())
        if base is None:
            base = indent
        if indent < base:
            break
        entry = re.match(r"(\w+):\s*(.*)", line.strip())
        if indent == base and entry:
            current = entry.group(1)
            found[current] = entry.group(2)
        elif current is not None:
            found[current] += " " + line.strip()
    return {name: _markdown(text) for name, text in found.items()}


def _markdown(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # :class:`X` -> `X`
    return text.replace("``", "`").replace("|", "\\|")


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return "tuple of exception types"
    if annotation is type(None):
        return "`None`"
    name = getattr(annotation, "__name__", str(annotation))
    return f"`{name}`"


def _default(field: msgspec.structs.FieldInfo) -> object:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    raise MissingDoc(f"{field.name} has no default")


def _toml_value(value: object) -> str:
    if isinstance(value, msgspec.Struct):
        return f"`{type(value).__name__}()`"
    if value is None:
        return "`None`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`()`" if not value else f"`{value!r}`"
    if isinstance(value, float) and value >= 86400 and value % 86400 == 0:
        return f"`{value:g}` ({value / 86400:g} days)"
    return f"`{value}`"


# What cannot come from TOML or the environment: exception types exist in code only.
_CODE_ONLY = {"retry_on", "give_up_on"}


def _is_policy(annotation: object) -> type | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def config_fields() -> list[tuple[str, str, msgspec.structs.FieldInfo, str]]:
    """Every setting: ``(table, key, field, description)``; ``table`` is ``""`` for
    the top level of ``BusConfig``, else the nested policy's key (``"retry"``).

    Raises:
        MissingDoc: A field has no entry in its class's ``Attributes:`` section.
    """
    from eventbus import BusConfig

    out: list[tuple[str, str, msgspec.structs.FieldInfo, str]] = []

    def walk(cls: type, table: str) -> None:
        docs = attribute_docs(cls)
        for field in msgspec.structs.fields(cls):
            text = docs.get(field.name, "").strip()
            if not text:
                raise MissingDoc(
                    f"{cls.__name__}.{field.name} has no description in the Attributes: "
                    f"section of {cls.__name__}'s docstring; add one"
                )
            out.append((table, field.name, field, text))
        for field in msgspec.structs.fields(cls):
            nested = _is_policy(field.type)
            if nested is not None and not table:
                walk(nested, field.name)

    walk(BusConfig, "")
    return out


def config_reference() -> str:
    """The configuration reference: a table per TOML table (the top level, then
    ``[batch]``, ``[retry]``, ``[breaker]``), each key with its type, default,
    TOML name, environment variable and meaning."""
    from eventbus import BusConfig

    rows = config_fields()
    classes: dict[str, type] = {"": BusConfig}
    for table, key, field, _ in rows:
        if not table:
            nested = _is_policy(field.type)
            if nested is not None:
                classes[key] = nested
    parts: list[str] = []
    for table, cls in classes.items():
        title = "Top level (`BusConfig`)" if not table else f"`[{table}]` (`{cls.__name__}`)"
        parts.append(f"### {title}\n")
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        parts.append(_markdown(summary) + "\n")
        parts.append("| key | type | default | TOML | environment | meaning |")
        parts.append("|---|---|---|---|---|---|")
        for row_table, key, field, text in rows:
            if row_table != table:
                continue
            nested = _is_policy(field.type) if not table else None
            if key in _CODE_ONLY:
                toml = env = "code only"
            elif nested is not None:
                toml = f"`[{key}]` table"
                env = f"`EVENTBUS_{key.upper()}__*`"
                if type(None) in typing.get_args(field.type):
                    env += f", `EVENTBUS_{key.upper()}=none`"
            elif table:
                toml = f"`{key}` in `[{table}]`"
                env = f"`EVENTBUS_{table.upper()}__{key.upper()}`"
            else:
                toml = f"`{key}`"
                env = f"`EVENTBUS_{key.upper()}`"
            parts.append(
                f"| `{key}` | {_type_name(field.type)} | {_toml_value(_default(field))} "
                f"| {toml} | {env} | {text} |"
            )
        parts.append("")
    return "\n".join(parts)


# -- command line -------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser under it, depth first. argparse has
    no public way to walk its subparsers: its actions list is the only map."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subcommands(sub)


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help, by its full ``prog``."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                found[f"{parser.prog} {choice.dest}"] = choice.help or ""
    return found


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to the terminal's width: a fixed one, for a stable page."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def cli_commands() -> list[tuple[str, str, str]]:
    """Every command of ``eventbus`` that does something (not the groups):
    ``(prog, one-line help, --help text)``."""
    from eventbus.cli._parser import build_parser

    root = build_parser()
    helps: dict[str, str] = {}
    with _columns(88):
        parsers = list(_subcommands(root))
        for p in parsers:
            helps.update(_help_of(p))
        out = []
        for p in parsers:
            groups = any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
            if p is root or not groups:
                out.append((p.prog, helps.get(p.prog, ""), p.format_help()))
    return out


def cli_reference() -> str:
    """The command-line reference: every command's ``--help``, as the parser says it."""
    parts: list[str] = []
    for prog, summary, text in cli_commands():
        parts.append(f"### `{prog}`\n")
        if summary:
            parts.append(summary[0].upper() + summary[1:] + ".\n")
        parts.append("```text\n" + text.rstrip() + "\n```\n")
    return "\n".join(parts)


# -- logging ------------------------------------------------------------------------


def loggers_reference() -> str:
    """The bus's loggers, from ``eventbus._logging.LOGGERS``."""
    from eventbus._logging import EVENT_FIELDS, LOGGERS

    rows = ["| logger | what it says |", "|---|---|"]
    rows += [f"| `{name}` | {text} |" for name, text in LOGGERS.items()]
    fields = ", ".join(f"`{f}`" for f in EVENT_FIELDS)
    rows.append("")
    rows.append(f"Records about one event of one subscription carry {fields} as attributes.")
    return "\n".join(rows) + "\n"


# -- benchmark results --------------------------------------------------------------

RESULTS = ROOT / "bench" / "results"


def bench_results(directory: Path = RESULTS) -> str:
    """The results recorded in ``bench/results/``: each Markdown file included under
    a heading of its name, other files listed; a sentence saying where they will be
    when there are none yet."""
    files = sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []
    if not files:
        return (
            "No results are recorded in the repository yet: each script prints its own "
            "report (the figures above come from such reports). Recorded runs, when "
            "there are some, are kept in `bench/results/` and shown here.\n"
        )
    parts = ["Recorded runs, from `bench/results/` in the repository:\n"]
    others = []
    for path in files:
        if path.suffix == ".md":
            body = path.read_text(encoding="utf-8")
            # Their headings sit below this section's.
            body = re.sub(
                r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", body, flags=re.M
            )
            parts.append(f"### `{path.name}`\n\n{body.strip()}\n")
        else:
            others.append(f"- `bench/results/{path.name}`")
    if others:
        parts.append("Other recorded files:\n\n" + "\n".join(others) + "\n")
    return "\n".join(parts)


# -- the hook -----------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    "config-reference": config_reference,
    "cli-reference": cli_reference,
    "loggers": loggers_reference,
    "bench-results": bench_results,
}


def expand(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated part.

    Raises:
        MissingDoc: A marker names no generator.
    """

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise MissingDoc(f"no generated part named {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]().rstrip() + "\n"

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs hook: expand the markers of every page."""
    return expand(markdown)
