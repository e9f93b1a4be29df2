"""The SQLite schema of the log and its migrations, keyed by ``PRAGMA user_version``."""

from __future__ import annotations

# "EVBS": marks a SQLite file as an event log, so a foreign database is recognised.
APPLICATION_ID = 0x45564253

# Each entry migrates from version i to i + 1. Append, never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY,
        id         TEXT NOT NULL,
        topic      TEXT NOT NULL,
        key        TEXT,
        payload    BLOB NOT NULL,
        headers    BLOB,
        created_at REAL NOT NULL
    );
    CREATE TABLE idempotency (
        key        TEXT PRIMARY KEY,
        seq        INTEGER NOT NULL,
        id         TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE subscriptions (
        name       TEXT PRIMARY KEY,
        topics     TEXT NOT NULL,
        cursor     INTEGER NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE dead_letters (
        subscription    TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        id              TEXT NOT NULL,
        topic           TEXT NOT NULL,
        key             TEXT,
        payload         BLOB NOT NULL,
        headers         BLOB,
        created_at      REAL NOT NULL,
        attempts        INTEGER NOT NULL,
        error_type      TEXT NOT NULL,
        error_message   TEXT NOT NULL,
        traceback       TEXT NOT NULL,
        first_failed_at REAL NOT NULL,
        last_failed_at  REAL NOT NULL,
        PRIMARY KEY (subscription, seq)
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
