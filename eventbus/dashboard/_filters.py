"""The dead-letter filters as a page's query and an action's form carry them."""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping

import msgspec

_STATUSES = ("running", "completed", "failed", "cancelled")


def parse_time(text: str | None) -> float | None:
    """A ``datetime-local`` value (UTC), an ISO date/time or a unix time; None if
    empty.

    Raises:
        ValueError: It is none of those.
    """
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a unix time nor a date and time such as 2026-11-27T03:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def time_text(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


class Filter(msgspec.Struct, frozen=True):
    """Which dead letters a page shows, or an action touches."""

    subscription: str | None = None
    error_type: str | None = None
    since: float | None = None
    until: float | None = None

    @classmethod
    def parse(cls, values: Mapping[str, str]) -> Filter:
        """From a query or a form (empty fields are no filter).

        Raises:
            ValueError: A time does not parse.
        """
        return cls(
            subscription=values.get("subscription") or None,
            error_type=(values.get("error_type") or "").strip() or None,
            since=parse_time(values.get("since")),
            until=parse_time(values.get("until")),
        )

    @property
    def since_text(self) -> str:
        return time_text(self.since)

    @property
    def until_text(self) -> str:
        return time_text(self.until)

    @property
    def by_time(self) -> bool:
        return self.since is not None or self.until is not None

    def fields(self) -> Iterator[tuple[str, str]]:
        """The filter as form fields, those set only."""
        if self.subscription:
            yield "subscription", self.subscription
        if self.error_type:
            yield "error_type", self.error_type
        if self.since is not None:
            yield "since", self.since_text
        if self.until is not None:
            yield "until", self.until_text

    def describe(self) -> str:
        parts = [
            f"subscription {self.subscription}" if self.subscription else "",
            f"error type {self.error_type}" if self.error_type else "",
            f"last failed since {self.since_text} UTC" if self.since is not None else "",
            f"last failed before {self.until_text} UTC" if self.until is not None else "",
        ]
        shown = ", ".join(p for p in parts if p)
        return f"every dead letter matching: {shown}" if shown else "every dead letter in the log"


def dead_cursor(text: str | None) -> tuple[int, str | None]:
    """``SEQ`` or ``SEQ:SUBSCRIPTION``, where the previous page ended ((0, None) if
    empty or malformed)."""
    seq, sep, subscription = (text or "").partition(":")
    if not seq.isdigit():
        return 0, None
    return int(seq), subscription if sep and subscription else None


def workflow_status(text: str | None) -> str | None:
    """A workflow status to filter on, or None for every status."""
    return text if text in _STATUSES else None


STATUSES = _STATUSES
