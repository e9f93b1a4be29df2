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
    # 2: the retry lane, and the crash-loop marker of the batch in flight.
    """
    CREATE TABLE retries (
        subscription    TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        id              TEXT NOT NULL,
        topic           TEXT NOT NULL,
        key             TEXT,
        payload         BLOB NOT NULL,
        headers         BLOB,
        created_at      REAL NOT NULL,
        attempt         INTEGER NOT NULL,
        due_at          REAL,
        first_failed_at REAL,
        error_type      TEXT NOT NULL,
        error_message   TEXT NOT NULL,
        traceback       TEXT NOT NULL,
        running         INTEGER NOT NULL,
        PRIMARY KEY (subscription, seq)
    ) WITHOUT ROWID;
    ALTER TABLE subscriptions ADD COLUMN inflight_upto INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX dead_letters_by_seq ON dead_letters (seq);
    CREATE TABLE control (
        id         INTEGER PRIMARY KEY,
        command    BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 3: handler state committed with acknowledgements, and recorded outside effects.
    """
    CREATE TABLE state (
        subscription TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        BLOB NOT NULL,
        PRIMARY KEY (subscription, key)
    ) WITHOUT ROWID;
    CREATE TABLE effects (
        key        TEXT PRIMARY KEY,
        result     BLOB NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: what each subscription acknowledged as done (ranges of seq, for
    # reconciliation), and workflow runs with their step checkpoints.
    """
    CREATE TABLE acked (
        subscription TEXT NOT NULL,
        lo           INTEGER NOT NULL,
        hi           INTEGER NOT NULL,
        PRIMARY KEY (subscription, lo)
    ) WITHOUT ROWID;
    CREATE INDEX acked_by_hi ON acked (subscription, hi);
    INSERT INTO acked (subscription, lo, hi)
        SELECT name, 1, cursor FROM subscriptions WHERE cursor > 0;
    CREATE TABLE workflows (
        num           INTEGER PRIMARY KEY,
        id            TEXT NOT NULL UNIQUE,
        name          TEXT NOT NULL,
        status        TEXT NOT NULL,
        input         BLOB NOT NULL,
        output        BLOB,
        error_type    TEXT NOT NULL,
        error_message TEXT NOT NULL,
        traceback     TEXT NOT NULL,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        deadline      REAL,
        runs          INTEGER NOT NULL
    );
    CREATE INDEX workflows_by_status ON workflows (status, name);
    CREATE TABLE workflow_steps (
        workflow_id   TEXT NOT NULL,
        position      INTEGER NOT NULL,
        name          TEXT NOT NULL,
        status        TEXT NOT NULL,
        attempts      INTEGER NOT NULL,
        started_at    REAL NOT NULL,
        finished_at   REAL,
        output        BLOB,
        error_type    TEXT NOT NULL,
        error_message TEXT NOT NULL,
        PRIMARY KEY (workflow_id, position)
    ) WITHOUT ROWID;
    """,
    # 5: how many of a step's attempts the process stopped during, apart from those
    # that raised. A step found running in an older log starts counting at 0.
    """
    ALTER TABLE workflow_steps ADD COLUMN died INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: the PostgreSQL log's partitions and leases, for several processes at once. A
    # SQLite log is dispatched by one process at a time (its lock file) and keeps its
    # tables as they were.
    """
    SELECT 1;
    """,
    # 7: which process of a shared log runs each workflow run (until expires_at,
    # renewed while it runs), with a fencing epoch bumped whenever it changes hands.
    """
    CREATE TABLE workflow_claims (
        workflow_id TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        expires_at  REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 8: the PostgreSQL log's fence locks its lease rows in a fixed order. A SQLite
    # log keeps its tables as they were.
    """
    SELECT 1;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
