"""The chaos harness on PostgreSQL: a fresh schema per run, and the books read back
from it (``eventbus.chaos`` reads a SQLite log's the same way)."""

from __future__ import annotations

import uuid
from typing import TypeAlias
from urllib.parse import urlencode

import eventbus.storage as _storage

from .reconcile import check_log

Events: TypeAlias = list[tuple[int, str, bytes]]
State: TypeAlias = list[tuple[str, str, bytes]]
Dead: TypeAlias = list[tuple[str, int, str]]


def log_url(server: str, lease: float) -> str:
    """The URL of a log in a new schema of ``server`` (created at first open), with
    leases of ``lease`` seconds."""
    schema = f"chaos_{uuid.uuid4().hex[:16]}"
    joiner = "&" if "?" in server else "?"
    return f"{server}{joiner}{urlencode({'schema': schema, 'lease': lease})}"


async def read_books(url: str) -> tuple[Events, State, Dead]:
    """What the harness checks, from the log at ``url``: the events of the two
    topics ``(seq, topic, payload)`` in log order, the committed state
    ``(subscription, key, value)`` and the dead letters ``(subscription, seq,
    error type)``."""
    import asyncpg

    target = _storage.PostgresStorage(url, read_only=True).target
    conn = await asyncpg.connect(target.dsn, server_settings={"search_path": target.quoted_schema})
    try:
        events = [
            (int(seq), str(topic), bytes(payload))
            for seq, topic, payload in await conn.fetch(
                "SELECT seq, topic, payload FROM events"
                " WHERE topic IN ('orders', 'payments') ORDER BY seq"
            )
        ]
        state = [
            (str(s), str(k), bytes(v))
            for s, k, v in await conn.fetch("SELECT subscription, key, value FROM state")
        ]
        dead = [
            (str(s), int(q), str(e))
            for s, q, e in await conn.fetch(
                "SELECT subscription, seq, error_type FROM dead_letters"
            )
        ]
    finally:
        await conn.close()
    return events, state, dead


async def unaccounted(url: str) -> int:
    """Events reconciliation cannot account for, on the log at ``url``."""
    store = _storage.PostgresStorage(url, read_only=True)
    await store.open()
    try:
        report = await check_log(store, lease=3600.0)
    finally:
        await store.close()
    return report.lost


async def drop(url: str) -> None:
    """Drop the run's schema."""
    import asyncpg

    target = _storage.PostgresStorage(url, read_only=True).target
    conn = await asyncpg.connect(target.dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {target.quoted_schema} CASCADE")
    finally:
        await conn.close()
