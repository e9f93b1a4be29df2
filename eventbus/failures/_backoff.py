"""Backoff delays for a :class:`RetryPolicy`: exponential, capped, jittered."""

from __future__ import annotations

import random

from .._config import RetryPolicy


def backoff_delay(
    policy: RetryPolicy, failed_attempt: int, previous: float, rng: random.Random
) -> float:
    """Seconds to wait after attempt ``failed_attempt`` (1-based) failed.

    ``previous`` is the last delay used (for ``"decorrelated"`` jitter). Jitter keeps
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
