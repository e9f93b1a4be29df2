"""The one decision a failed attempt needs: try again after a delay, or give up.

Pure: the caller passes the attempt that failed, the error, the delay used before it
and a random source; nothing here reads a clock.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from .._config import RetryPolicy
from .._errors import PayloadValidationError


class Retry(NamedTuple):
    """Try again after ``delay`` seconds."""

    delay: float


class GiveUp(NamedTuple):
    """Dead-letter the event: ``why`` says whether it ran out of attempts
    (``"attempts"``) or its error is one that is not retried (``"not retryable"``:
    the policy's ``retry_on``/``give_up_on``, or an event that can never succeed)."""

    why: str


Decision = Retry | GiveUp


def decide(
    policy: RetryPolicy,
    attempt: int,
    error: BaseException | None,
    previous_delay: float,
    rng: random.Random,
) -> Decision:
    """What follows the failure of attempt ``attempt`` (1-based) with ``error`` (None:
    the process died during it, which is always retryable). An event that can never
    succeed (:func:`never_succeeds`) is not retried, whatever the policy.

    Args:
        policy: The subscription's retry policy.
        attempt: The attempt that failed.
        error: Its exception, or None for a death.
        previous_delay: The delay that preceded this attempt (0 before the first);
            ``"decorrelated"`` jitter grows from it.
        rng: The jitter's random source.
    """
    if error is not None and never_succeeds(error):
        return GiveUp("not retryable")
    if attempt >= policy.max_attempts:
        return GiveUp("attempts")
    if error is not None and not policy.retryable(error):
        return GiveUp("not retryable")
    return Retry(backoff_delay(policy, attempt, previous_delay, rng))


def never_succeeds(error: BaseException) -> bool:
    """Whether ``error`` is the event's own fault, so that no attempt can succeed: its
    payload does not decode for the handler (:class:`PayloadValidationError`). Such
    a failure is not retried, and says nothing about the health of what the handler
    calls (the circuit breaker does not count it)."""
    return isinstance(error, PayloadValidationError)


def backoff_delay(
    policy: RetryPolicy, failed_attempt: int, previous: float, rng: random.Random
) -> float:
    """Seconds to wait after attempt ``failed_attempt`` (1-based) failed.

    ``previous`` is the delay used before that attempt (for ``"decorrelated"`` jitter:
    the next one is drawn between ``initial_delay`` and three times it). Jitter keeps
    retries of many events from arriving in lockstep; the cap keeps the wait finite.
    """
    base = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (failed_attempt - 1))
    if policy.jitter == "full":
        return rng.uniform(0.0, base)
    if policy.jitter == "equal":
        return base / 2 + rng.uniform(0.0, base / 2)
    if policy.jitter == "decorrelated":
        high = max(policy.initial_delay, previous * 3)
        return min(policy.max_delay, rng.uniform(policy.initial_delay, high))
    return base


def estimated_previous_delay(policy: RetryPolicy, attempt: int) -> float:
    """The delay that most likely preceded ``attempt``, for an event whose history
    was not kept in memory (one recovered from the log): the un-jittered backoff."""
    if attempt <= 1:
        return 0.0
    return min(policy.max_delay, policy.initial_delay * policy.multiplier ** (attempt - 2))
