"""The hook API: what each hook sees, what it may change, and what a failing hook
does to the publish or the call it surrounds."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator

import pytest

from eventbus import (
    Bus,
    BusConfig,
    Context,
    Event,
    HandlerCall,
    Hook,
    HookError,
    HookFailed,
    Message,
    PayloadError,
    Publishing,
    RetryPolicy,
    StepInfo,
    Workflow,
)

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.002, budget_ratio=1.0)
CONFIG = BusConfig(breaker=None, retry=QUICK, reconcile_interval=0)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Recorder(Hook):
    """Records every publish and call it sees."""

    def __init__(self) -> None:
        self.before: list[tuple[str, str]] = []
        self.after: list[Publishing] = []
        self.calls: list[tuple[str, list[int], int, BaseException | None]] = []

    def before_publish(self, publishing: Publishing) -> None:
        self.before.append((publishing.kind, publishing.topic))
        publishing.headers["seen-by"] = "recorder"

    def after_publish(self, publishing: Publishing) -> None:
        self.after.append(publishing)

    @contextlib.asynccontextmanager
    async def around_call(self, call: HandlerCall) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.calls.append(
                (call.subscription, [e.seq for e in call.events], call.attempt, call.error)
            )


async def test_publish_hooks_see_every_way_of_publishing_and_their_headers_are_stored() -> None:
    hook = Recorder()
    seen: list[tuple[str, dict[str, str]]] = []
    async with Bus.open(":memory:", config=CONFIG, hooks=[hook]) as bus:

        @bus.subscribe("orders")
        async def forward(event: Event[int], ctx: Context) -> None:
            await ctx.publish("invoices", event.payload, headers={"mine": "kept"})

        @bus.subscribe("invoices")
        async def invoice(event: Event[int], ctx: Context) -> None:
            seen.append((event.topic, event.headers))

        receipt = await bus.publish("orders", 1, headers={"caller": "x"})
        bus.publish_nowait("orders", 2)
        receipts = await bus.publish_many([Message("orders", 3), Message("orders", 4)])
        await bus.drain(timeout=10, raise_failures=True)

    kinds = [kind for kind, _ in hook.before]
    assert kinds.count("publish") == 1
    assert kinds.count("publish_nowait") == 1
    assert kinds.count("publish_many") == 2
    assert kinds.count("outbox") == 4
    # The hook's header is stored with every event, beside the caller's own.
    assert len(seen) == 4
    assert all(h == {"mine": "kept", "seen-by": "recorder"} for _, h in seen)
    by_kind = {p.kind: p for p in hook.after}
    assert by_kind["publish"].receipt == receipt
    assert [p.receipt for p in hook.after if p.kind == "publish_many"] == receipts
    # Queued, not awaited: the receipt comes with a later commit.
    assert by_kind["publish_nowait"].receipt is None
    assert by_kind["outbox"].receipt is None
    assert all(p.error is None for p in hook.after)
    # The caller's dict is not changed by the hook.
    assert by_kind["publish"].headers == {"caller": "x", "seen-by": "recorder"}


async def test_a_context_variable_travels_from_publisher_to_handler_in_the_headers() -> None:
    got: list[str] = []
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.before_publish
        def carry(publishing: Publishing) -> None:
            publishing.headers["request-id"] = request_id.get()

        @bus.hooks.around_call
        @contextlib.asynccontextmanager
        async def restore(call: HandlerCall) -> AsyncIterator[None]:
            token = request_id.set(call.events[0].headers.get("request-id", "-"))
            try:
                yield
            finally:
                request_id.reset(token)

        @bus.subscribe("a")
        async def first(event: Event[None], ctx: Context) -> None:
            got.append(request_id.get())
            await ctx.publish("b", None)  # carries the handler's request id on

        @bus.subscribe("b")
        async def second(event: Event[None], ctx: Context) -> None:
            got.append(request_id.get())

        token = request_id.set("req-42")
        try:
            await bus.publish("a", None)
        finally:
            request_id.reset(token)
        await bus.drain(timeout=10, raise_failures=True)
    assert got == ["req-42", "req-42"]


async def test_a_failing_before_publish_hook_fails_that_publish_and_writes_nothing() -> None:
    hook = Recorder()
    async with Bus.open(":memory:", config=CONFIG, hooks=[hook]) as bus:

        @bus.hooks.before_publish
        def refuse(publishing: Publishing) -> None:
            if publishing.payload == "bad":
                raise PermissionError("tenant is suspended")

        head = bus.metrics().head
        with pytest.raises(HookFailed) as raised:
            await bus.publish("orders", "bad")
        assert isinstance(raised.value.__cause__, PermissionError)
        assert "refuse" in str(raised.value)
        assert "orders" in str(raised.value)
        assert raised.value.topic == "orders"
        with pytest.raises(HookFailed):
            bus.publish_nowait("orders", "bad")
        with pytest.raises(HookFailed):
            await bus.publish_many([Message("orders", "good"), Message("orders", "bad")])
        await bus.drain(timeout=5)
        assert bus.metrics().head == head  # nothing written, not even the good message
        # The after hooks still ran, with the error, so that what the before hooks
        # began (a span) can end.
        assert [type(p.error) for p in hook.after] == [HookFailed] * 4
        # Other publishes are not affected.
        receipt = await bus.publish("orders", "good")
        assert receipt.seq == head + 1


async def test_a_failing_before_publish_hook_in_the_outbox_fails_the_handler_call() -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.before_publish
        def refuse(publishing: Publishing) -> None:
            if publishing.kind == "outbox":
                raise RuntimeError("no downstream publishes today")

        @bus.subscribe("orders")
        async def forward(event: Event[int], ctx: Context) -> None:
            await ctx.publish("invoices", event.payload)

        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
        assert letter.error_type.endswith("HookFailed")
        assert letter.attempts == QUICK.max_attempts
        assert bus.metrics().head == 1  # no outbox event reached the log


async def test_a_failing_after_publish_hook_is_logged_and_the_publish_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.after_publish
        def broken(publishing: Publishing) -> None:
            raise ValueError("exporter down")

        with caplog.at_level(logging.ERROR, logger="eventbus.hooks"):
            receipt = await bus.publish("orders", 1)
        assert receipt.seq == 1
        assert bus.metrics().head == 1
    (record,) = [r for r in caplog.records if r.name == "eventbus.hooks"]
    assert "broken" in record.getMessage()
    assert "stands" in record.getMessage()
    assert record.exc_info is not None


async def test_after_publish_sees_why_a_publish_failed() -> None:
    hook = Recorder()
    async with Bus.open(":memory:", config=CONFIG, hooks=[hook]) as bus:
        with pytest.raises(PayloadError):
            await bus.publish("orders", object())
    (publishing,) = hook.after
    assert isinstance(publishing.error, PayloadError)
    assert publishing.receipt is None


async def test_around_call_sees_the_subscription_events_attempts_and_outcome() -> None:
    hook = Recorder()
    async with Bus.open(":memory:", config=CONFIG, hooks=[hook]) as bus:

        @bus.subscribe("orders", name="billing")
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload == 2 and event.attempt == 1:
                raise ConnectionError("flaky")

        @bus.subscribe("orders", name="audit")
        async def audit(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                if event.payload == 3 and event.attempt == 1:
                    ctx.fail(event, ValueError("later"))

        await bus.publish_many([Message("orders", i) for i in (1, 2, 3)])
        await bus.drain(timeout=10, raise_failures=True)

    billing = [c for c in hook.calls if c[0] == "billing"]
    # One call per event; the second event's first attempt failed, its retry passed.
    assert sorted(seq for _, seqs, _, _ in billing for seq in seqs) == [1, 2, 2, 3]
    failed = [c for c in billing if c[3] is not None]
    assert [(seqs, attempt, type(err)) for _, seqs, attempt, err in failed] == [
        ([2], 1, ConnectionError)
    ]
    assert ([2], 2, None) in [(seqs, attempt, err) for _, seqs, attempt, err in billing]
    audit_calls = [c for c in hook.calls if c[0] == "audit"]
    first_attempts = [seq for _, seqs, attempt, _ in audit_calls if attempt == 1 for seq in seqs]
    assert first_attempts == [1, 2, 3]  # in batches, as the controller sized them
    assert audit_calls[-1][1:] == ([3], 2, None)


async def test_around_call_reports_events_a_batch_handler_failed_one_by_one() -> None:
    failed: list[dict[int, Exception]] = []
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.around_call
        @contextlib.asynccontextmanager
        async def watch(call: HandlerCall) -> AsyncIterator[None]:
            yield
            failed.append(call.failed)

        @bus.subscribe("orders")
        async def audit(events: list[Event[int]], ctx: Context) -> None:
            for event in events:
                if event.payload == 2 and event.attempt == 1:
                    ctx.fail(event, ValueError("two"))

        await bus.publish_many([Message("orders", i) for i in (1, 2, 3)])
        await bus.drain(timeout=10, raise_failures=True)
    reported = [f for f in failed if f]
    assert [sorted(f) for f in reported] == [[2]]  # once, by the call that failed it
    assert isinstance(reported[0][2], ValueError)
    assert len(failed) >= 2  # and its retry reported no failure


@pytest.mark.parametrize("where", ["enter", "exit"])
async def test_a_failing_around_call_hook_is_the_calls_failure(where: str) -> None:
    ran: list[int] = []
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.around_call
        @contextlib.asynccontextmanager
        async def deny(call: HandlerCall) -> AsyncIterator[None]:
            if where == "enter":
                raise PermissionError("not allowed")
            yield
            raise PermissionError("not allowed")

        @bus.subscribe("orders")
        async def handle(event: Event[int], ctx: Context) -> None:
            ran.append(event.attempt)
            ctx.state.set("count", 1)
            await ctx.publish("downstream", event.payload)

        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
        assert letter.error_type == "builtins.PermissionError"
        assert letter.attempts == QUICK.max_attempts
        # Retried like a handler failure; the calls' writes were dropped each time.
        assert ran == ([] if where == "enter" else [1, 2, 3])
        assert bus.metrics().head == 1
        assert await bus.state("handle").get("count") is None


async def test_a_hook_cannot_turn_a_failed_call_into_a_success() -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.around_call
        @contextlib.asynccontextmanager
        async def swallow(call: HandlerCall) -> AsyncIterator[None]:
            with contextlib.suppress(Exception):
                yield

        @bus.subscribe("orders")
        async def handle(event: Event[int], ctx: Context) -> None:
            await ctx.publish("downstream", event.payload)
            raise LookupError("half done")

        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
        assert letter.error_type == "builtins.LookupError"
        assert bus.metrics().head == 1  # the half-done call's outbox event is dropped


async def test_hooks_added_after_subscribing_apply_and_removed_ones_stop() -> None:
    hook = Recorder()
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.subscribe("orders")
        async def handle(event: Event[int], ctx: Context) -> None:
            pass

        await bus.publish("orders", 1)
        await bus.drain(timeout=5)
        bus.hooks.add(hook)
        assert len(bus.hooks) == 1
        await bus.publish("orders", 2)
        await bus.drain(timeout=5)
        bus.hooks.remove(hook)
        assert len(bus.hooks) == 0
        await bus.publish("orders", 3)
        await bus.drain(timeout=5)
        # Without hooks, the subscription calls the handler itself again.
        sub = bus._subs["handle"]
        assert sub._handler is sub.handler
    assert hook.before == [("publish", "orders")]
    assert [seqs for _, seqs, _, _ in hook.calls] == [[2]]


async def test_registering_something_that_is_not_a_hook_is_refused() -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:
        with pytest.raises(HookError, match="no hook method"):
            bus.hooks.add(object())
        with pytest.raises(HookError, match="no hook method"):
            bus.hooks.add(Hook())  # overrides nothing
        hook = Recorder()
        bus.hooks.add(hook)
        with pytest.raises(HookError, match="already registered"):
            bus.hooks.add(hook)
        with pytest.raises(HookError, match="not a hook registered"):
            bus.hooks.remove(Recorder())
        with pytest.raises(HookError, match="decorates a function"):
            bus.hooks.before_publish(42)  # type: ignore[arg-type]
    with pytest.raises(HookError):
        async with Bus.open(":memory:", config=CONFIG, hooks=[object()]):
            pass


async def test_any_object_with_hook_methods_is_a_hook() -> None:
    class Duck:
        def __init__(self) -> None:
            self.topics: list[str] = []

        def before_publish(self, publishing: Publishing) -> None:
            self.topics.append(publishing.topic)

    duck = Duck()
    async with Bus.open(":memory:", config=CONFIG, hooks=[duck]) as bus:
        await bus.publish("orders", 1)
    assert duck.topics == ["orders"]


async def test_several_hooks_nest_the_first_registered_outermost() -> None:
    order: list[str] = []

    def named(name: str) -> object:
        @contextlib.asynccontextmanager
        async def around(call: HandlerCall) -> AsyncIterator[None]:
            order.append(f"{name} in")
            yield
            order.append(f"{name} out")

        return around

    async with Bus.open(":memory:", config=CONFIG) as bus:
        bus.hooks.around_call(named("outer"))  # type: ignore[arg-type]
        bus.hooks.around_call(named("inner"))  # type: ignore[arg-type]

        @bus.subscribe("orders")
        async def handle(event: Event[int], ctx: Context) -> None:
            order.append("handler")

        await bus.publish("orders", 1)
        await bus.drain(timeout=5, raise_failures=True)
    assert order == ["outer in", "inner in", "handler", "inner out", "outer out"]


async def test_workflow_hooks_surround_runs_and_step_attempts() -> None:
    seen: list[str] = []
    attempts: list[int] = []

    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.around_workflow
        @contextlib.asynccontextmanager
        async def run(wf: Workflow) -> AsyncIterator[None]:
            seen.append(f"run {wf.name} {wf.id}")
            yield
            seen.append("run end")

        @bus.hooks.around_step
        @contextlib.asynccontextmanager
        async def step(info: StepInfo) -> AsyncIterator[None]:
            seen.append(f"step {info.workflow}/{info.step} #{info.attempt}")
            if info.step == "guarded" and info.attempt == 1:
                raise PermissionError("first attempt refused by the hook")
            yield

        async def reserve(n: int) -> int:
            return n + 1

        async def guarded(n: int) -> int:
            attempts.append(n)
            return n * 2

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, n: int) -> int:
            r = await wf.step("reserve", reserve, n)
            return await wf.step("guarded", guarded, r, retry=QUICK)

        handle = await bus.start_workflow("fulfil", 1, workflow_id="w-1")
        assert await handle.result(timeout=10) == 4
    assert seen == [
        "run fulfil w-1",
        "step fulfil/reserve #1",
        "step fulfil/guarded #1",
        "step fulfil/guarded #2",
        "run end",
    ]
    assert attempts == [2]  # the refused attempt never ran the step


async def test_a_failing_around_workflow_hook_fails_the_run() -> None:
    async with Bus.open(":memory:", config=CONFIG) as bus:

        @bus.hooks.around_workflow
        @contextlib.asynccontextmanager
        async def refuse(wf: Workflow) -> AsyncIterator[None]:
            raise PermissionError("no workflows today")
            yield

        @bus.workflow("noop")
        async def noop(wf: Workflow, n: int) -> int:
            return n

        handle = await bus.start_workflow("noop", 1)
        with pytest.raises(Exception, match="no workflows today"):
            await handle.result(timeout=10)
        assert (await handle.status()).status == "failed"
