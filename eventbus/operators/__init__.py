"""Stateful stream operators on durable subscriptions: a keyed reduce, event-time
windows (tumbling and sliding) and a windowed join.

Each operator is one batch subscription whose state lives in ``ctx.state`` and whose
outputs go through ``ctx.publish``, so its state, its outputs and its position in
the log commit in one transaction. After a crash (``kill -9`` included) an operator
resumes from its own last commit: no event is applied twice, no output is published
twice or lost, and no other operator replays anything.

::

    from eventbus import operators

    totals = operators.reduce(bus, "payments", name="totals",
                              fn=lambda acc, e: acc + e.payload["amount"], initial=0)
    minutes = operators.tumbling(bus, "payments", name="per-minute", size=60,
                                 aggregate=lambda acc, e: acc + e.payload["amount"],
                                 initial=0, emit="payments-per-minute", lateness=5,
                                 time=lambda e: e.payload["ts"])
    await totals.get("customer-7")

**State is partitioned by key.** The bus runs events of different keys concurrently
(a retried event runs on the retry lane beside the main lane) and keeps each key in
publish order; an operator therefore keeps everything an event touches (accumulator,
open windows, join buffers, watermark, late count) in one record per key, read and
written once per batch. State shared between keys would lose updates whenever the
retry lane runs, which it does after every crash.

**Watermarks are per key.** A key's watermark is the greatest event time the operator
has seen for that key, minus ``lateness``; it is stored in the key's record, so it is
recovered with the cursor. As each key's events arrive in publish order, whatever the
batching, retries or crashes, every result (window totals, join pairs, which events
are late) is a function of the log alone (a dead letter redriven later is taken
where it is redriven). As in Kafka Streams, a key that receives no more events
keeps its last windows open: read them with ``open_windows()``.

**Grouping by something else.** With ``key=``, a first subscription (``NAME:by-key``)
republishes each event, exactly once through its outbox, to the internal topic
``NAME:by-key`` keyed by ``key(event)``; the operator reads that topic. The events
of one operator key then arrive in the order that step forwards them: log order,
except around a failure or a crash.

An operator's name is durable: registered again under the same name (after a
restart), it resumes its state. Changing its window size, slide or function under an
existing name mixes old and new state: register the new version under a new name.

Errors: bad arguments raise ``TypeError`` or ``ValueError`` at registration. An event
the operator cannot use (no key, an event time that is not a finite number) is
dead-lettered at once with :class:`OperatorInputError`; an exception from your own
function is retried under the subscription's ``RetryPolicy``, and later events of
its key wait behind it.
"""

from ._operators import (
    Join,
    OperatorInputError,
    Reduce,
    Window,
    Windows,
    join,
    reduce,
    sliding,
    tumbling,
)

__all__ = [
    "Join",
    "OperatorInputError",
    "Reduce",
    "Window",
    "Windows",
    "join",
    "reduce",
    "sliding",
    "tumbling",
]
