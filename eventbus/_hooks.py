"""Hooks: user code the bus runs around its publishes, handler calls and workflow runs.

A hook is middleware for what the bus does on its own: carry a request id or a
tenant from the publisher to the handler in the event's headers, log with that
context, check authorisation before a handler runs, trace (``eventbus.otel`` is
built on this module). Five points, each optional:

- ``before_publish(publishing)`` (plain function): before an event is encoded; may
  change ``publishing.headers``, which are stored with the event. Raising fails
  that publish with :class:`~eventbus.HookFailed`: nothing is written.
- ``after_publish(publishing)`` (plain function): once the event is committed
  (``publish``, ``publish_many``) or queued (``publish_nowait``, ``ctx.publish``),
  or once the publish failed (``publishing.error``). Raising is logged to
  ``eventbus.hooks``; the publish stands.
- ``around_call(call)``: an async context manager around each handler call; it
  sees the subscription, the event(s), the attempt, and the outcome. Raising (on
  the way in or out) is the call's failure, retried or dead-lettered like the
  handler's own.
- ``around_workflow(wf)`` and ``around_step(step)``: async context managers around
  a workflow run's execution in this process and around each attempt of a step.
  Raising fails the run (or the step's attempt) like the workflow's own code.

Nothing here runs, and nothing costs anything per event, while no hook is
registered: the bus checks one attribute per publish and calls handlers directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, TypeVar, cast

from eventbus.storage import Receipt

from ._errors import HookError, HookFailed
from ._event import Event, Message
from .dispatch import Context
from .workflows import StepInfo, Workflow

__all__ = [
    "AfterPublish",
    "AroundCall",
    "AroundStep",
    "AroundWorkflow",
    "BeforePublish",
    "HandlerCall",
    "Hook",
    "Hooks",
    "PublishKind",
    "Publishing",
]

logger = logging.getLogger("eventbus.hooks")

#: How an event is being published: ``bus.publish``, ``bus.publish_nowait``,
#: ``bus.publish_many`` or a handler's ``ctx.publish`` (the outbox).
PublishKind = Literal["publish", "publish_nowait", "publish_many", "outbox"]


class Publishing:
    """One event on its way to the log, as ``before_publish`` and ``after_publish``
    hooks see it (the same object for both).

    Attributes:
        kind: How it is published: ``"publish"``, ``"publish_nowait"``,
            ``"publish_many"`` or ``"outbox"`` (``ctx.publish`` in a handler).
        topic: Its topic.
        payload: Its payload, as given (not encoded yet).
        key: Its ordering key, or None.
        headers: Its headers, a dict of its own: a ``before_publish`` hook may add,
            change or remove entries, and they are stored with the event.
        idempotency_key: Its idempotency key, or None (always None in the outbox).
        receipt: In ``after_publish``: the receipt once committed. None for
            ``publish_nowait`` and the outbox (committed later, by the log writer,
            and for the outbox only if the handler call succeeds), and when the
            publish failed.
        error: In ``after_publish``: why the publish failed (a before-publish hook's
            :class:`~eventbus.HookFailed`, an encoding error, the commit's error), or
            None.
        notes: Room for hooks to carry something from ``before_publish`` to
            ``after_publish`` (a span, a start time); key it by something of your
            own, such as the hook object.
    """

    __slots__ = (
        "error",
        "headers",
        "idempotency_key",
        "key",
        "kind",
        "notes",
        "payload",
        "receipt",
        "topic",
    )

    def __init__(
        self,
        kind: PublishKind,
        topic: str,
        payload: object,
        key: str | None,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
    ) -> None:
        self.kind: PublishKind = kind
        self.topic = topic
        self.payload = payload
        self.key = key
        # A copy: the caller's dict is left as it was. Anything but a dict is kept as
        # it is, for the encoder to refuse with its usual error.
        self.headers: dict[str, str] = (
            dict(headers) if isinstance(headers, dict) else {} if headers is None else headers
        )
        self.idempotency_key = idempotency_key
        self.receipt: Receipt | None = None
        self.error: BaseException | None = None
        self.notes: dict[object, object] = {}

    def __repr__(self) -> str:
        return f"<Publishing {self.kind} topic={self.topic!r} key={self.key!r}>"


class HandlerCall:
    """One handler call, as ``around_call`` hooks see it.

    Attributes:
        subscription: The subscription's name.
        topics: The topics it subscribes to.
        events: The events of the call: one for a per-event handler, the batch for
            a batch handler (``list[Event]``).
        batch: Whether the handler is a batch handler.
        attempt: The call's attempt (1 on first delivery; in a batch, the highest of
            its events').
        context: The handler's :class:`~eventbus.Context`.
        error: Once the handler returned: the exception it raised, or None. A hook
            sees the same exception on its way out of the ``async with``.
    """

    __slots__ = ("attempt", "batch", "context", "error", "events", "subscription", "topics")

    def __init__(
        self,
        subscription: str,
        topics: frozenset[str],
        events: list[Event[Any]],
        batch: bool,
        context: Context,
    ) -> None:
        self.subscription = subscription
        self.topics = topics
        self.events = events
        self.batch = batch
        self.attempt = context.attempt
        self.context = context
        self.error: BaseException | None = None

    @property
    def failed(self) -> dict[int, Exception]:
        """Events of a batch the handler failed one by one with ``ctx.fail``, by seq
        (read it on the way out; those go to the retry lane, the rest count as
        handled)."""
        return dict(self.context.buffer.failed)

    def __repr__(self) -> str:
        return (
            f"<HandlerCall {self.subscription!r} events={len(self.events)} attempt={self.attempt}>"
        )


BeforePublish = Callable[[Publishing], None]
AfterPublish = Callable[[Publishing], None]
AroundCall = Callable[[HandlerCall], AbstractAsyncContextManager[object]]
AroundWorkflow = Callable[[Workflow], AbstractAsyncContextManager[object]]
AroundStep = Callable[[StepInfo], AbstractAsyncContextManager[object]]

F = TypeVar("F", bound=Callable[..., object])

_KINDS = ("before_publish", "after_publish", "around_call", "around_workflow", "around_step")


class Hook:
    """Base class of a hook object for ``bus.hooks.add(...)``: override any of the
    methods; the others are not called (and cost nothing).

    ``before_publish`` and ``after_publish`` are plain methods (``publish_nowait``
    and ``ctx.publish`` are not async); the three ``around_*`` methods return an
    async context manager, typically by being written as::

        @contextlib.asynccontextmanager
        async def around_call(self, call: HandlerCall) -> AsyncIterator[None]:
            ...  # before the handler
            yield
            ...  # after it (in a try/finally to see failures too)

    An object that does not derive from this class works too: each of the five
    methods it has is registered.
    """

    def before_publish(self, publishing: Publishing) -> None:
        """Before an event is encoded: may change ``publishing.headers``. Raising
        fails the publish with :class:`~eventbus.HookFailed` (nothing written)."""

    def after_publish(self, publishing: Publishing) -> None:
        """After the event was committed or queued (``publishing.receipt``), or
        failed (``publishing.error``). Raising is logged; the publish stands."""

    def around_call(self, call: HandlerCall) -> AbstractAsyncContextManager[object]:
        """Around one handler call. Raising is the call's failure."""
        return contextlib.nullcontext()

    def around_workflow(self, wf: Workflow) -> AbstractAsyncContextManager[object]:
        """Around a workflow run's execution in this process (once per resume).
        Raising fails the run."""
        return contextlib.nullcontext()

    def around_step(self, step: StepInfo) -> AbstractAsyncContextManager[object]:
        """Around each attempt of a workflow step (not around a replayed one).
        Raising fails that attempt (retried by the step's policy)."""
        return contextlib.nullcontext()


def _hook_name(fn: object) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__qualname__}.{getattr(fn, '__name__', '?')}"
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


class Hooks:
    """``bus.hooks``: the hooks registered on one bus, in the order they run.

    Register a hook object with :meth:`add`, or single functions with the
    decorators (:meth:`before_publish`, :meth:`after_publish`, :meth:`around_call`,
    :meth:`around_workflow`, :meth:`around_step`); :meth:`remove` takes either
    back. Changes apply from the next publish or call on.

    Several hooks of one kind nest: the first registered is the outermost (its
    ``before_publish`` runs first, its ``around_call`` is entered first and left
    last).
    """

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._on_change = on_change
        self._entries: list[tuple[object, str, Callable[..., Any]]] = []
        #: The registered functions of each kind, in order (read by the bus).
        self.before: tuple[BeforePublish, ...] = ()
        self.after: tuple[AfterPublish, ...] = ()
        self.calls: tuple[AroundCall, ...] = ()
        self.runs: tuple[AroundWorkflow, ...] = ()
        self.steps: tuple[AroundStep, ...] = ()

    # -- registering ------------------------------------------------------------------

    def add(self, hook: object) -> None:
        """Register a hook object (a :class:`Hook`, or any object with some of its
        methods): each hook method it has runs from now on.

        Raises:
            HookError: It has none of the hook methods, or it is registered already.
        """
        if any(owner is hook for owner, _, _ in self._entries):
            raise HookError(f"hook {hook!r} is already registered on this bus")
        found: list[tuple[object, str, Callable[..., Any]]] = []
        for kind in _KINDS:
            method = getattr(hook, kind, None)
            if method is None or not callable(method):
                continue
            if isinstance(hook, Hook) and getattr(type(hook), kind) is getattr(Hook, kind):
                continue  # not overridden: nothing to run
            found.append((hook, kind, method))
        if not found:
            raise HookError(
                f"{hook!r} has no hook method; a hook has one or more of {', '.join(_KINDS)} "
                "(derive it from eventbus.Hook), or register a function with a decorator "
                "such as @bus.hooks.before_publish"
            )
        self._entries.extend(found)
        self._changed()

    def remove(self, hook: object) -> None:
        """Unregister a hook object or a function registered with a decorator.

        Raises:
            HookError: It is not registered.
        """
        kept = [entry for entry in self._entries if entry[0] is not hook]
        if len(kept) == len(self._entries):
            raise HookError(f"{hook!r} is not a hook registered on this bus")
        self._entries = kept
        self._changed()

    def _register(self, kind: str, fn: F) -> F:
        if not callable(fn):
            raise HookError(f"@bus.hooks.{kind} decorates a function, got {fn!r}")
        if any(owner is fn and k == kind for owner, k, _ in self._entries):
            raise HookError(f"{_hook_name(fn)} is already registered as {kind} on this bus")
        self._entries.append((fn, kind, fn))
        self._changed()
        return fn

    def before_publish(self, fn: BeforePublish) -> BeforePublish:
        """Decorator: run ``fn(publishing)`` before each event is encoded."""
        return self._register("before_publish", fn)

    def after_publish(self, fn: AfterPublish) -> AfterPublish:
        """Decorator: run ``fn(publishing)`` after each event is committed, queued or
        failed."""
        return self._register("after_publish", fn)

    def around_call(self, fn: AroundCall) -> AroundCall:
        """Decorator: enter ``fn(call)`` (an async context manager) around each
        handler call."""
        return self._register("around_call", fn)

    def around_workflow(self, fn: AroundWorkflow) -> AroundWorkflow:
        """Decorator: enter ``fn(wf)`` (an async context manager) around each
        workflow run's execution."""
        return self._register("around_workflow", fn)

    def around_step(self, fn: AroundStep) -> AroundStep:
        """Decorator: enter ``fn(step)`` (an async context manager) around each
        attempt of a workflow step."""
        return self._register("around_step", fn)

    def __len__(self) -> int:
        """How many hook objects and functions are registered."""
        return len({id(owner) for owner, _, _ in self._entries})

    def _changed(self) -> None:
        def of(kind: str) -> tuple[Any, ...]:
            return tuple(fn for _, k, fn in self._entries if k == kind)

        self.before = of("before_publish")
        self.after = of("after_publish")
        self.calls = of("around_call")
        self.runs = of("around_workflow")
        self.steps = of("around_step")
        self._on_change()

    # -- publishing -------------------------------------------------------------------

    @property
    def publishing(self) -> bool:
        """Whether a publish or after-publish hook is registered."""
        return bool(self.before or self.after)

    def prepare(
        self,
        kind: PublishKind,
        topic: str,
        payload: object,
        key: str | None,
        headers: dict[str, str] | None,
        idempotency_key: str | None = None,
    ) -> Publishing:
        """A :class:`Publishing` with every before-publish hook run on it.

        Raises:
            HookFailed: A hook raised (the after-publish hooks have run, with the
                error set).
        """
        publishing = Publishing(kind, topic, payload, key, headers, idempotency_key)
        for fn in self.before:
            try:
                fn(publishing)
            except Exception as exc:
                error = HookFailed(_hook_name(fn), topic, exc)
                error.__cause__ = exc
                self.finish(publishing, error=error)
                raise error from exc
        return publishing

    def prepare_many(self, messages: Iterable[Message]) -> tuple[list[Publishing], list[Message]]:
        """Before-publish hooks for each message of a ``publish_many``, and the
        messages with the headers they set.

        Raises:
            HookFailed: A hook raised for one message (the after-publish hooks of
                every message prepared so far have run with the error).
        """
        done: list[Publishing] = []
        out: list[Message] = []
        for message in messages:
            try:
                publishing = self.prepare(
                    "publish_many",
                    message.topic,
                    message.payload,
                    message.key,
                    message.headers,
                    message.idempotency_key,
                )
            except HookFailed as exc:
                for other in done:
                    self.finish(other, error=exc)
                raise
            done.append(publishing)
            out.append(
                Message(
                    publishing.topic,
                    message.payload,
                    message.key,
                    publishing.headers or None,
                    message.idempotency_key,
                )
            )
        return done, out

    def finish(
        self,
        publishing: Publishing,
        receipt: Receipt | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Run every after-publish hook on ``publishing``; log what they raise."""
        publishing.receipt = receipt
        publishing.error = error
        for fn in self.after:
            try:
                fn(publishing)
            except Exception:
                logger.exception(
                    "after_publish hook %s raised for an event on topic %r (the publish itself %s)",
                    _hook_name(fn),
                    publishing.topic,
                    "failed" if error is not None else "stands",
                )

    # -- around handler calls and workflows -------------------------------------------

    def wrap_handler(
        self,
        handler: Callable[[object, Context], Awaitable[None]],
        subscription: str,
        topics: frozenset[str],
        batch: bool,
    ) -> Callable[[object, Context], Awaitable[None]]:
        """``handler`` called inside the around-call hooks registered at each call.

        The hooks cannot make a failed call succeed: if the handler raised, the call
        fails with that exception even when a hook swallowed it (its outbox and
        state writes would otherwise commit half done).
        """
        hooks = self

        async def hooked(arg: object, ctx: Context) -> None:
            around = hooks.calls
            if not around:
                await handler(arg, ctx)
                return
            events = cast("list[Event[Any]]", arg if batch else [arg])
            call = HandlerCall(subscription, topics, events, batch, ctx)
            async with _nest(around, call):
                try:
                    await handler(arg, ctx)
                except BaseException as exc:
                    call.error = exc
                    raise
            if call.error is not None:
                raise call.error

        hooked.__name__ = getattr(handler, "__name__", "handler")
        hooked.__qualname__ = getattr(handler, "__qualname__", "handler")
        return hooked

    def around_run(self, wf: Workflow) -> AbstractAsyncContextManager[object]:
        """The around-workflow hooks, nested, for one run's execution."""
        return _nest(self.runs, wf)

    def around_attempt(self, step: StepInfo) -> AbstractAsyncContextManager[object]:
        """The around-step hooks, nested, for one attempt of a step."""
        return _nest(self.steps, step)


T = TypeVar("T")


def _nest(
    factories: tuple[Callable[[T], AbstractAsyncContextManager[object]], ...], arg: T
) -> AbstractAsyncContextManager[object]:
    """``factory(arg)`` for each factory, nested, the first outermost (one hook's
    own context manager as it is: no layer around it)."""
    if len(factories) == 1:
        return factories[0](arg)
    return _stack(factories, arg)


@contextlib.asynccontextmanager
async def _stack(
    factories: tuple[Callable[[T], AbstractAsyncContextManager[object]], ...], arg: T
) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for factory in factories:
            await stack.enter_async_context(factory(arg))
        yield
