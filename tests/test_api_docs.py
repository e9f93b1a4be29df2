"""The public API documents itself: every public async method says what a
cancellation leaves behind."""

from __future__ import annotations

import inspect

import eventbus


def _public_async_methods() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name in eventbus.__all__:
        obj = getattr(eventbus, name)
        if not inspect.isclass(obj):
            if inspect.iscoroutinefunction(obj):
                found.append((name, obj))
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                found.append((f"{name}.{attr}", fn))
    return found


def test_every_public_async_method_documents_cancellation() -> None:
    methods = _public_async_methods()
    assert len(methods) > 20
    missing = [name for name, fn in methods if "Cancellation:" not in (fn.__doc__ or "")]
    assert missing == []


def test_opening_a_bus_documents_cancellation() -> None:
    assert "Cancellation:" in (eventbus.Bus.open.__doc__ or "")
