"""Handlers: checking a subscribe call's topics and handler, recognising batch
handlers and typed payloads, and choosing a subscription's batch controller."""

from __future__ import annotations

import functools
import inspect
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Container, Iterable

from eventbus.backpressure import (
    AIMDController,
    BatchController,
    FixedController,
    GradientController,
    NaturalController,
)

from .._config import BatchPolicy
from .._errors import SubscriptionError
from .._event import Event
from .._payloads import PayloadType, as_decoded, payload_type, type_name
from ._context import Context

logger = logging.getLogger("eventbus.bus")  # about subscriptions at open

# A subscription new to the log that starts at the earliest event warns when more
# events than this are in the log: usually a renamed subscription, not a new one.
REPLAY_WARNING = 10_000

EventHandler = Callable[[Event[typing.Any], Context], Awaitable[None]]
BatchHandler = Callable[[list[Event[typing.Any]], Context], Awaitable[None]]
Handler = EventHandler | BatchHandler


_SHAPE = (
    "async def handler(event: Event, ctx: Context) -> None, or a batch handler "
    "async def handler(events: list[Event], ctx: Context) -> None"
)


def check_topics(topic: object) -> frozenset[str]:
    """The topics of a ``subscribe`` call: one name, or an iterable of names.

    Raises:
        SubscriptionError: ``topic`` is a function (``@bus.subscribe`` used without
            parentheses), not a ``str`` or an iterable of them, empty, or holds an
            empty name.
    """
    if callable(topic) and not isinstance(topic, str):
        raise SubscriptionError(
            f"subscribe() was given {_name(topic)} as its topic: @bus.subscribe needs "
            'parentheses and the topic, as in @bus.subscribe("orders", name="billing")'
        )
    if isinstance(topic, str):
        topics: list[object] = [topic]
    elif isinstance(topic, Iterable) and not isinstance(topic, bytes | bytearray):
        topics = list(topic)
    else:
        raise SubscriptionError(
            f"subscribe needs a topic name (str) or an iterable of topic names, got "
            f"{type(topic).__name__} {topic!r}"
        )
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise SubscriptionError(
            f"subscribe needs one or more non-empty topic names (str), got {topic!r}"
        )
    return frozenset(typing.cast(list[str], topics))


def check_handler(handler: object) -> bool:
    """Refuse a handler that could never be called as one; return whether it is a
    batch handler (see :func:`is_batch_handler`).

    A handler must be an ``async def`` function (or an object whose ``__call__`` is
    one) that takes ``(event, ctx)`` positionally, in that order.

    Raises:
        SubscriptionError: A plain ``def`` (or a lambda), a signature that cannot
            take two positional arguments, or one that names ``ctx`` first or
            annotates its parameters in the reversed order.
    """
    name = _name(handler)
    if not callable(handler):
        raise SubscriptionError(f"the handler must be {_SHAPE}; got {name}")
    if not (
        inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
    ):
        raise SubscriptionError(
            f"handler {name} is not a coroutine function: declare it with async def "
            f"(a lambda cannot be one). Expected {_SHAPE}"
        )
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"cannot inspect handler {name}: {exc}") from exc
    try:
        signature.bind(None, None)
    except TypeError:
        raise SubscriptionError(
            f"handler {name}{signature} must take two positional parameters, "
            f"(event, ctx) or (events: list[Event], ctx): {_SHAPE}"
        ) from None
    if _reversed(handler, signature):
        raise SubscriptionError(
            f"handler {name}{signature} takes its parameters in the reversed order; "
            f"the event comes first, then the context: {_SHAPE}"
        )
    return is_batch_handler(handler)


def subscription_name(handler: object, name: object, known: Container[str]) -> str:
    """The durable name of a subscription: ``name`` if given, else the handler's
    ``__name__``.

    The default is the function's own name (``billing`` for ``async def billing``),
    so it stays the same under ``python -m``, when the function moves to another
    module, or is defined inside ``main``; renaming the function renames it. A
    handler without a plain name (a ``functools.partial``, a callable object) needs
    ``name=``. A log whose subscription is known under the module-qualified name
    earlier versions used by default keeps that name.

    Raises:
        SubscriptionError: ``name`` is not a non-empty ``str``, or it is None and
            the handler has no plain name.
    """
    if name is not None:
        if not isinstance(name, str) or not name:
            raise SubscriptionError(f"name must be a non-empty str, got {name!r}")
        return name
    short = getattr(handler, "__name__", None)
    if not isinstance(short, str) or not short.isidentifier():
        raise SubscriptionError(
            f"handler {_name(handler)} has no plain function name to use as the "
            "subscription's name; pass name= (the durable name its position is kept under)"
        )
    qualified = f"{getattr(handler, '__module__', '')}.{getattr(handler, '__qualname__', '')}"
    if short not in known and qualified in known:
        return qualified
    return short


def warn_of_replay(name: str, events: int) -> None:
    """Log a warning when a subscription new to the log will replay ``events``
    events, more than :data:`REPLAY_WARNING`."""
    if events > REPLAY_WARNING:
        logger.warning(
            "subscription %r is new to this log and starts at its earliest event: it "
            "will read up to %d events already in the log. If it is an existing "
            "subscription under a new name (the default name is the handler's function "
            "name), pass its old name with name=; to skip the backlog, subscribe with "
            'start="latest"',
            name,
            events,
        )


def _name(obj: object) -> str:
    return repr(getattr(obj, "__qualname__", None) or obj)


def _reversed(handler: object, signature: inspect.Signature) -> bool:
    """True when the first parameter is the context (by annotation, or by name when
    unannotated) or the second the event."""
    params = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][:2]
    if len(params) < 2:
        return False
    first, second = params
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # noqa: BLE001 - an unresolvable string annotation: read its text
        hints = {}
    first_hint = hints.get(first.name, first.annotation)
    second_hint = hints.get(second.name, second.annotation)
    if _is_context(first_hint) or _is_event(second_hint):
        return True
    unannotated = first.annotation is inspect.Parameter.empty
    return unannotated and first.name in ("ctx", "context") and second.name.startswith("event")


def _is_context(annotation: object) -> bool:
    if isinstance(annotation, str):
        return annotation.replace(" ", "").rsplit(".", 1)[-1] == "Context"
    return isinstance(annotation, type) and issubclass(annotation, Context)


def _is_event(annotation: object) -> bool:
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        if text.startswith(("list[", "typing.List[", "List[")):
            text = text[text.index("[") + 1 : -1]
        return text.split("[", 1)[0].rsplit(".", 1)[-1] == "Event"
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation) or (None,)
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Event)


def is_batch_handler(handler: Callable[..., object]) -> bool:
    """True when the handler's first parameter is annotated ``list[...]`` (string
    annotations included)."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"cannot inspect handler {handler!r}: {exc}") from exc
    if len(params) < 2:
        raise SubscriptionError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must take two "
            "parameters, (event, ctx) or (events: list[Event], ctx)"
        )
    first = params[0]
    annotation: object = first.annotation
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").lower()
        try:
            annotation = typing.get_type_hints(handler).get(first.name, annotation)
        except Exception:  # noqa: BLE001 - an unresolvable string: judge it by its text
            return text.startswith(("list[", "typing.list["))
    return bool(typing.get_origin(annotation) is list or annotation is list)


def handler_payload_type(handler: object) -> PayloadType | None:
    """The type a handler wants its payloads decoded as: ``T`` when its first
    parameter is annotated ``Event[T]`` or ``list[Event[T]]``.

    None (payloads stay the built-in values the bus decodes, at no cost) for no
    annotation, a bare ``Event``, and ``Event[Any]``, ``Event[object]``,
    ``Event[dict[str, Any]]``. String annotations (``from __future__ import
    annotations``) are resolved in the handler's module, and in the namespace of the
    code that subscribes it (a type defined in the function that subscribes).

    Raises:
        SubscriptionError: The annotation names a type that cannot be found at run
            time, or one msgspec cannot decode to.
    """
    try:
        params = [
            p
            for p in inspect.signature(handler).parameters.values()  # type: ignore[arg-type]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return None  # check_handler says what is wrong with it
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    first = params[0]
    annotation: object = first.annotation
    if isinstance(annotation, str):
        annotation = _resolve(handler, first.name, annotation)
        if annotation is None:
            return None
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation) or (None,)
    origin = typing.get_origin(annotation) or annotation
    if not (isinstance(origin, type) and issubclass(origin, Event)):
        return None
    args = typing.get_args(annotation)
    if not args or isinstance(args[0], typing.TypeVar) or as_decoded(args[0]):
        return None
    try:
        return payload_type(args[0])
    except TypeError as exc:
        raise SubscriptionError(
            f"handler {_name(handler)} takes Event[{type_name(args[0])}], a type msgspec "
            f"cannot decode payloads to ({exc}): use a msgspec.Struct, a dataclass, a "
            "TypedDict or another type msgspec supports, or Event[Any] to take payloads "
            "as built-in types"
        ) from exc


# String annotations that ask for no decoding: resolving them is not needed.
_UNTYPED_TEXT = frozenset(
    f"{event}{arg}"
    for event in ("Event", "eventbus.Event")
    for arg in ("", "[Any]", "[typing.Any]", "[object]", "[dict]", "[dict[str,Any]]")
)


def _resolve(handler: object, name: str, text: str) -> object:
    """The object a string annotation names (None: an untyped ``Event`` that need
    not be found).

    Raises:
        SubscriptionError: It names ``Event[...]`` of something that cannot be found.
    """
    target: object = inspect.unwrap(handler)  # type: ignore[arg-type]
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = type(target).__call__  # a callable object
    target = getattr(target, "__func__", target)
    holder = types.SimpleNamespace(__annotations__={name: text})
    try:
        return typing.get_type_hints(
            holder, getattr(target, "__globals__", {}), _subscriber_namespace()
        )[name]
    except Exception as exc:  # any failure to evaluate the text
        bare = text.replace(" ", "")
        if bare.startswith(("list[", "typing.List[", "List[")):
            bare = bare[bare.index("[") + 1 : -1]
        if bare in _UNTYPED_TEXT or bare.split("[", 1)[0].rsplit(".", 1)[-1] != "Event":
            return None
        raise SubscriptionError(
            f"handler {_name(handler)} takes {text!r}, which cannot be resolved ({exc}) "
            "in the handler's module or where it is subscribed: import or define the type "
            "at run time (not only under TYPE_CHECKING), or take Event[Any] for payloads "
            "as built-in types"
        ) from exc


def _subscriber_namespace() -> dict[str, object]:
    """The local names of the code that called ``subscribe`` (the first frame outside
    this package), where a type used only in a handler's annotation may live."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module != "eventbus" and not module.startswith("eventbus."):
                return dict(frame.f_locals)
            frame = frame.f_back
        return {}
    finally:
        del frame  # a frame holds its locals: no cycle through this one


def make_controller(policy: BatchPolicy) -> BatchController:
    if policy.mode == "natural":
        return NaturalController(policy.min_size, policy.max_size)
    if policy.mode == "fixed":
        return FixedController(policy.max_size, policy.max_wait, policy.min_size)
    if policy.mode == "aimd":
        return AIMDController(policy.min_size, policy.max_size, policy.target_latency)
    return GradientController(policy.min_size, policy.max_size, policy.target_latency)
