"""The installed ``eventbus`` command as an operator uses it at night: it refuses what
would hurt, says when a list is partial, and behaves in a pipe."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event
from eventbus.cli._parser import build_parser
from eventbus.storage import DeadRecord, Record, SQLiteStorage, WriteBatch

EVENTBUS = str(Path(sys.executable).parent / "eventbus")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed command; never raises for its exit status."""
    return subprocess.run(
        [EVENTBUS, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


async def write_dead_letters(path: Path, seqs: range, subscriptions: tuple[str, ...]) -> None:
    store = SQLiteStorage(path)
    await store.open()
    try:
        await store.commit(
            WriteBatch(
                dead=[
                    DeadRecord(
                        sub,
                        Record(seq, f"ev-{seq:05d}", "orders", None, b"\x01", None, 1.0),
                        3,
                        "builtins.ValueError" if seq % 2 else "builtins.KeyError",
                        f"event {seq} failed",
                        "Traceback (most recent call last):\n",
                        1.0,
                        2.0,
                    )
                    for seq in seqs
                    for sub in subscriptions
                ]
            )
        )
    finally:
        await store.close()


def count_dead(path: Path) -> int:
    async def count() -> int:
        store = SQLiteStorage(path, read_only=True)
        await store.open()
        try:
            return await store.count_dead_letters()
        finally:
            await store.close()

    return anyio.run(count)


# -- lists that say they are partial (dead letters, workflow runs) -------------------


def test_dlq_list_says_n_of_m_and_how_to_reach_the_next_page(log_path: Path) -> None:
    # Regression: the first 100 were printed with no word of the others.
    anyio.run(write_dead_letters, log_path, range(1, 151), ("a", "b"))
    first = cli("dlq", "list", log_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 101
    assert lines[-1] == "100 of 300 dead letters shown; the next page: --after-seq 50"
    second = cli("dlq", "list", log_path, "--after-seq", "50", "--limit", "25")
    lines = second.stdout.splitlines()
    assert lines[0].split()[:2] == ["51", "a"]
    # This page ends between the two subscriptions' letters of event 63.
    assert lines[-1] == "25 of 300 dead letters shown; the next page: --after-seq 63:a"
    third = cli("dlq", "list", log_path, "--after-seq", "63:a", "--limit", "500")
    lines = third.stdout.splitlines()
    assert lines[0].split()[:2] == ["63", "b"]
    assert lines[-1] == "175 of 300 dead letters shown"

    as_json = cli("dlq", "list", log_path, "-s", "a", "--error-type", "KeyError", "--json")
    assert len(json.loads(as_json.stdout)) == 75
    assert as_json.stderr == ""  # all of them: nothing to say
    partial = cli("dlq", "list", log_path, "--limit", "10", "--json")
    assert len(json.loads(partial.stdout)) == 10  # stdout stays a plain array
    assert "10 of 300 dead letters shown; the next page: --after-seq 5" in partial.stderr


def test_dlq_show_finds_a_letter_past_the_first_page_by_seq(log_path: Path) -> None:
    # Regression: `dlq show FILE SEQ` looked only among the first 100 dead letters.
    anyio.run(write_dead_letters, log_path, range(1, 301), ("a",))
    shown = cli("dlq", "show", log_path, "250", "--json")
    assert shown.returncode == 0, shown.stderr
    (item,) = json.loads(shown.stdout)
    assert (item["seq"], item["id"]) == (250, "ev-00250")
    assert json.loads(cli("dlq", "show", log_path, "ev-00299", "--json").stdout)[0]["seq"] == 299
    missing = cli("dlq", "show", log_path, "301")
    assert missing.returncode == 1
    assert "no dead letter with id or seq '301'" in missing.stderr


def test_workflows_list_says_n_of_m(log_path: Path) -> None:
    async def runs() -> None:
        async with Bus.open(log_path) as bus:

            @bus.workflow("noop")
            async def noop(wf: object, n: int) -> int:
                return n

            for i in range(5):
                await (await bus.start_workflow("noop", i, workflow_id=f"w{i}")).result(10)

    anyio.run(runs)
    listed = cli("workflows", "list", log_path, "--limit", "2")
    assert listed.stdout.splitlines()[-1] == "2 of 5 workflow runs shown; the next page: --after 2"
    rest = cli("workflows", "list", log_path, "--after", "4")
    assert rest.stdout.splitlines()[-1] == "1 of 5 workflow runs shown"


def test_a_listing_piped_into_head_ends_quietly(log_path: Path) -> None:
    # Regression: `eventbus dlq list FILE | head` printed a BrokenPipeError traceback.
    anyio.run(write_dead_letters, log_path, range(1, 3001), ("a",))
    proc = subprocess.Popen(
        [EVENTBUS, "dlq", "list", str(log_path), "--limit", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.readline().split()[0] == "1"
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err


# -- refusing what would hurt --------------------------------------------------------


ON_A_FILE = [
    ["dlq", "redrive"],
    ["dlq", "purge", "--all"],
    ["subscriptions", "drop", "{file}", "billing"],
    ["dlq", "list"],
    ["dlq", "show", "{file}", "1"],
    ["subscriptions", "list"],
    ["workflows", "list"],
    ["workflows", "show", "{file}", "run-1"],
    ["reconcile"],
    ["stats"],
    ["serve"],
    ["migrate", "{file}", "postgresql://app@127.0.0.1/app?schema=moved"],
]


def leaf_commands(parser: object, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command of ``parser`` that takes no further command: ("dlq", "list")."""
    found: set[tuple[str, ...]] = set()
    for action in parser._actions:  # type: ignore[attr-defined]
        if action.__class__.__name__ == "_SubParsersAction":
            for name, child in action.choices.items():
                found |= leaf_commands(child, (*path, name)) or {(*path, name)}
    return found


def test_every_command_is_among_those_checked_on_a_file_that_is_not_a_log() -> None:
    leaves = leaf_commands(build_parser())
    assert ("dlq", "purge") in leaves
    unchecked = [
        leaf for leaf in leaves if not any(list(leaf) == c[: len(leaf)] for c in ON_A_FILE)
    ]
    assert unchecked == []


@pytest.mark.parametrize("command", ON_A_FILE)
def test_a_command_on_a_file_that_is_not_a_log_refuses_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    # Regression: `eventbus dlq redrive typo.db` created an empty log and reported
    # "re-injected 0 dead letters".
    typo = tmp_path / "typo.db"
    args = [a.replace("{file}", str(typo)) for a in command]
    if "{file}" not in command:
        args.append(str(typo))
    missing = cli(*args)
    assert missing.returncode == 2
    assert f"there is no log at {str(typo)!r}" in missing.stderr
    assert list(tmp_path.iterdir()) == []
    typo.write_bytes(b"")  # an empty file is not a log either
    empty = cli(*args)
    assert empty.returncode == 2
    assert "is not an event log" in empty.stderr
    assert typo.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir()] == ["typo.db"]  # no -wal, -shm, .lock


def test_purge_needs_a_filter_or_all_and_dry_run_changes_nothing(log_path: Path) -> None:
    # Regression: `eventbus dlq purge FILE` deleted every dead letter without asking.
    anyio.run(write_dead_letters, log_path, range(1, 11), ("a", "b"))
    refused = cli("dlq", "purge", log_path)
    assert refused.returncode == 2
    assert "--all" in refused.stderr
    assert count_dead(log_path) == 20
    dry = cli("dlq", "purge", log_path, "--all", "--dry-run")
    assert dry.stdout == "would purge 20 dead letters (dry run: nothing changed)\n"
    dry_filtered = cli("dlq", "redrive", log_path, "-s", "a", "--dry-run", "--json")
    assert json.loads(dry_filtered.stdout) == {"dry_run": True, "matching": 10}
    assert count_dead(log_path) == 20
    assert cli("dlq", "purge", log_path, "--error-type", "KeyError").stdout == (
        "purged 10 dead letters\n"
    )
    assert cli("dlq", "purge", log_path, "--all").stdout == "purged 10 dead letters\n"
    assert count_dead(log_path) == 0


def test_version_and_a_help_line_for_every_argument() -> None:
    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout == f"eventbus {metadata.version('eventbus')}\n"
    missing: list[str] = []

    def walk(parser: object, path: str) -> None:
        for action in parser._actions:  # type: ignore[attr-defined]
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {action.dest}")

    walk(build_parser(), "eventbus")
    assert missing == []
    helped = cli("dlq", "purge", "--help")
    assert "--dry-run" in helped.stdout
    assert "the log file" in helped.stdout


# -- subscriptions no handler claims -------------------------------------------------


async def make_two_subscriptions(path: Path) -> None:
    async with Bus.open(path) as bus:
        for name in ("billing", "renamed.old_name"):

            @bus.subscribe("orders", name=name)
            async def handle(event: Event[int], ctx: Context) -> None:
                pass

        for i in range(20):
            await bus.publish("orders", i)
        await bus.drain(timeout=10)


class Waiter(logging.Handler):
    """Sets ``seen`` once a record whose message contains ``words`` is logged."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words
        self.seen = anyio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.records.append(record)
            self.seen.set()


@pytest.mark.anyio
async def test_a_subscription_no_handler_claims_is_warned_about_at_open(log_path: Path) -> None:
    # Regression: a renamed handler left its old subscription in the log, silently
    # holding compaction back for good.
    await make_two_subscriptions(log_path)
    waiter = Waiter("no handler on this bus claimed it")
    logging.getLogger("eventbus.bus").addHandler(waiter)
    try:
        async with Bus.open(log_path) as bus:

            @bus.subscribe("orders", name="billing")
            async def bill(event: Event[int], ctx: Context) -> None:
                pass

            with anyio.fail_after(10):
                await waiter.seen.wait()
            await bus.drain(timeout=10)
    finally:
        logging.getLogger("eventbus.bus").removeHandler(waiter)
    (record,) = waiter.records
    assert record.levelno == logging.WARNING
    assert record.subscription == "renamed.old_name"  # type: ignore[attr-defined]
    assert "eventbus subscriptions drop FILE renamed.old_name" in record.getMessage()


@pytest.mark.anyio
async def test_dropping_an_unclaimed_subscription_lets_compaction_work_again(
    log_path: Path,
) -> None:
    await make_two_subscriptions(log_path)
    config = BusConfig(retention=0)

    async def compact_with_billing_only() -> int:
        async with Bus.open(log_path, config=config) as bus:

            @bus.subscribe("orders", name="billing")
            async def bill(event: Event[int], ctx: Context) -> None:
                pass

            await bus.publish("orders", 99)
            await bus.drain(timeout=10)
            return await bus.compact()

    listed = await anyio.to_thread.run_sync(cli, "subscriptions", "list", log_path, "--json")
    names = [s["name"] for s in json.loads(listed.stdout)]
    assert names == ["billing", "renamed.old_name"]
    dry = await anyio.to_thread.run_sync(
        cli, "subscriptions", "drop", log_path, "renamed.old_name", "--dry-run"
    )
    assert dry.stdout.startswith("would drop subscription 'renamed.old_name' (cursor 20")
    assert await compact_with_billing_only() == 20  # what both subscriptions finished
    assert await compact_with_billing_only() == 0  # the old cursor holds the rest
    dropped = await anyio.to_thread.run_sync(
        cli, "subscriptions", "drop", log_path, "renamed.old_name"
    )
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.startswith("dropped subscription 'renamed.old_name'")
    assert await compact_with_billing_only() == 3
    again = await anyio.to_thread.run_sync(
        cli, "subscriptions", "drop", log_path, "renamed.old_name"
    )
    assert again.returncode == 1
    assert "no subscription named 'renamed.old_name'" in again.stderr


@pytest.mark.anyio
async def test_drop_is_queued_to_the_bus_that_owns_the_log_which_refuses_its_own(
    log_path: Path,
) -> None:
    await make_two_subscriptions(log_path)
    applied = Waiter("queued drop of subscription")
    logging.getLogger("eventbus.bus").addHandler(applied)
    try:
        async with Bus.open(log_path, config=BusConfig(control_interval=0.05)) as bus:

            @bus.subscribe("orders", name="billing")
            async def bill(event: Event[int], ctx: Context) -> None:
                pass

            own = await anyio.to_thread.run_sync(cli, "subscriptions", "drop", log_path, "billing")
            assert own.stdout.startswith("queued drop for the bus that owns")
            with anyio.fail_after(10):
                await applied.seen.wait()
            applied.seen = anyio.Event()
            other = await anyio.to_thread.run_sync(
                cli, "subscriptions", "drop", log_path, "renamed.old_name"
            )
            assert other.stdout.startswith("queued drop")
            with anyio.fail_after(10):
                await applied.seen.wait()
            subs = await bus._log.subscriptions()
    finally:
        logging.getLogger("eventbus.bus").removeHandler(applied)
    refused, done = (r.getMessage() for r in applied.records)
    assert refused.startswith("refused a queued drop of subscription 'billing'")
    assert done == "applied a queued drop of subscription 'renamed.old_name'"
    assert set(subs) == {"billing"}
