"""Failures: backoff, the records a failure leaves (retries, dead letters) and the
dead-letter API."""

from ._breaker import CircuitBreaker, RetryBudget
from ._dead_letters import (
    CONTROL_DECODER,
    CONTROL_ENCODER,
    ControlCommand,
    DeadLetter,
    DeadLettered,
    DeadLetterPage,
    DeadLetters,
)
from ._policy import (
    Decision,
    GiveUp,
    Retry,
    backoff_delay,
    decide,
    estimated_previous_delay,
    never_succeeds,
)
from ._records import (
    PROCESS_DIED,
    dead_record,
    error_type_name,
    event_record,
    format_error,
    retry_record,
)

__all__ = [
    "CircuitBreaker",
    "Decision",
    "GiveUp",
    "Retry",
    "RetryBudget",
    "decide",
    "estimated_previous_delay",
    "never_succeeds",
    "CONTROL_DECODER",
    "CONTROL_ENCODER",
    "PROCESS_DIED",
    "ControlCommand",
    "DeadLetter",
    "DeadLetterPage",
    "DeadLettered",
    "DeadLetters",
    "backoff_delay",
    "dead_record",
    "error_type_name",
    "event_record",
    "format_error",
    "retry_record",
]
