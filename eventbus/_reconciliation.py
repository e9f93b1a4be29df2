"""What a user reconciler gets on each run: the bus, a way to publish corrections, and
a way to flag what it cannot correct."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from eventbus.storage import Receipt


class Publisher(Protocol):
    """What a reconciliation needs of its bus to publish corrections."""

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt: ...


B = TypeVar("B", bound=Publisher)

# Flags kept per reconciler run (all are counted).
_MAX_FLAGS = 100


class ReconciliationBase(Generic[B]):
    """What a user reconciler gets on each run (``eventbus.Reconciliation`` is this
    with ``bus`` typed as the :class:`~eventbus.Bus`).

    Attributes:
        bus: The bus.
        name: The reconciler's name.
    """

    def __init__(self, bus: B, name: str) -> None:
        self.bus = bus
        self.name = name
        self.corrections = 0
        self.flagged = 0
        self._flags: list[str] = []

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Publish a corrective event (as :meth:`Bus.publish`), counted in the report
        unless its idempotency key was already in the log. Give it an idempotency
        key derived from what it corrects, so the next run does not correct twice.

        Cancellation: as for :meth:`Bus.publish`.
        """
        receipt = await self.bus.publish(
            topic, payload, key=key, headers=headers, idempotency_key=idempotency_key
        )
        if not receipt.duplicate:
            self.corrections += 1
        return receipt

    def flag(self, message: str) -> None:
        """Record an inconsistency found in an outside system (logged at warning and
        listed in the report)."""
        self.flagged += 1
        if len(self._flags) < _MAX_FLAGS:
            self._flags.append(str(message))

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self._flags)
