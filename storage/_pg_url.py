"""Where a PostgreSQL log lives: the URL's connection part, its schema, and the rest.

``postgresql://user:secret@db:5432/app?schema=events&sslmode=require`` names the
database ``app`` and, in it, the schema ``events`` that holds the log. The schema can
also come from libpq's ``options`` (``options=-c%20search_path%3Devents``); without
either it is ``eventbus``. ``partitions`` sets how many partitions a new log gets,
``lease`` how many seconds a process's lease on a partition lasts unless renewed
(``_pg_leases``); ``journal_dir`` is accepted and ignored (earlier versions kept a
call journal file per machine). Every other query parameter goes to asyncpg as it is
(``sslmode``, ``connect_timeout``, server settings).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SCHEMES = ("postgresql", "postgres")
DEFAULT_SCHEMA = "eventbus"
# Letters, digits, underscores: an identifier that needs no escaping anywhere (SQL,
# search_path, file names). PostgreSQL truncates identifiers past 63 bytes.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def is_postgres_url(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL log rather than a file."""
    return target.partition("://")[0].lower() in SCHEMES and "://" in target


@dataclass(frozen=True)
class PgTarget:
    """A parsed log URL.

    Attributes:
        dsn: The URL asyncpg connects to (without this library's parameters).
        schema: The schema holding the log.
        display: The URL without its password, for messages.
        journal_dir: The URL's ``journal_dir``, if any (no longer used).
        server_settings: Settings from ``options`` other than ``search_path``.
        partitions: The URL's ``partitions``, if any.
        lease: The URL's ``lease`` (seconds), if any.
    """

    dsn: str
    schema: str
    display: str
    journal_dir: str | None = None
    server_settings: dict[str, str] = field(default_factory=dict)
    partitions: int | None = None
    lease: float | None = None

    @property
    def quoted_schema(self) -> str:
        return f'"{self.schema}"'


def parse(url: str, schema: str | None = None) -> PgTarget:
    """Split a log URL. ``schema``, when given, wins over the URL's.

    Raises:
        ValueError: Not a PostgreSQL URL, or the schema is not a plain identifier.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"not a PostgreSQL URL: {url!r} (it must start with postgresql://)")
    kept: list[tuple[str, str]] = []
    settings: dict[str, str] = {}
    found: str | None = None
    journal: str | None = None
    partitions: int | None = None
    lease: float | None = None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            found = value
        elif key == "journal_dir":
            journal = value
        elif key == "partitions":
            try:
                partitions = int(value)
            except ValueError:
                raise ValueError(
                    f"partitions={value!r} in {_without_password(url)!r}: a whole number"
                ) from None
        elif key == "lease":
            try:
                lease = float(value)
            except ValueError:
                raise ValueError(
                    f"lease={value!r} in {_without_password(url)!r}: a number of seconds"
                ) from None
        elif key == "options":
            for name, setting in _options(value).items():
                if name == "search_path":
                    found = found or _first_in_path(setting)
                else:
                    settings[name] = setting
        else:
            kept.append((key, value))
    chosen = schema or found or DEFAULT_SCHEMA
    if not _IDENTIFIER.fullmatch(chosen):
        raise ValueError(
            f"schema {chosen!r} of {_without_password(url)!r}: use letters, digits and "
            "underscores (at most 63, not starting with a digit)"
        )
    dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    shown = urlunsplit(
        urlsplit(_without_password(url))._replace(query=urlencode([("schema", chosen)]))
    )
    if journal is not None:
        journal = os.path.expanduser(journal)
    return PgTarget(dsn, chosen, shown, journal, settings, partitions, lease)


def _options(value: str) -> dict[str, str]:
    """The ``-c name=value`` (or ``--name=value``) settings of libpq's ``options``."""
    out: dict[str, str] = {}
    tokens = _arguments(value)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "-c" and i + 1 < len(tokens):
            token, i = tokens[i + 1], i + 1
        elif token.startswith("-c") or token.startswith("--"):
            token = token[2:]
        else:
            raise ValueError(f"cannot read the options parameter {value!r}: expected -c name=value")
        name, sep, setting = token.partition("=")
        if not sep:
            raise ValueError(f"cannot read the options parameter {value!r}: expected -c name=value")
        out[name.strip().replace("-", "_")] = setting
        i += 1
    return out


def _arguments(value: str) -> list[str]:
    """Split ``options`` as libpq does: on spaces, except those escaped with a
    backslash (quotes are kept: they mean something to ``search_path``)."""
    tokens: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


def _first_in_path(path: str) -> str:
    """The first schema of a ``search_path`` value, as PostgreSQL reads it (unquoted
    names fold to lower case)."""
    first = path.split(",")[0].strip()
    if len(first) >= 2 and first[0] == first[-1] == '"':
        return first[1:-1]
    return first.lower()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
