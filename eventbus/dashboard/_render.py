"""Rendering: the templates, and the small formatters they use."""

from __future__ import annotations

import datetime

import jinja2
import msgspec

from .._log_access import decoded

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("eventbus.dashboard", "templates"),
    autoescape=jinja2.select_autoescape(("html",)),
    undefined=jinja2.StrictUndefined,
)
_JSON = msgspec.json.Encoder(enc_hook=repr)


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def pretty(raw: bytes | None, compact: bool = False) -> str:
    """A stored (msgpack) value as indented JSON; ``compact`` on one line."""
    if raw is None:
        return ""
    data = _JSON.encode(decoded(raw))
    return data.decode() if compact else msgspec.json.format(data, indent=2).decode()


_ENV.globals.update(when=when, size=size, ms=ms, pretty=pretty)


def render(template: str, /, **context: object) -> str:
    """The template ``template`` filled with ``context``."""
    return _ENV.get_template(template).render(**context)
