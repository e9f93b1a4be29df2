"""A worker that runs one order-fulfilment workflow and SIGKILLs itself at a chosen
point, like a crash.

    python _workflow_worker.py LOG_FILE SINK_FILE [KILL_AT]

KILL_AT is ``before:STEP`` (the step's running marker is committed, its function
has not started), ``inside:STEP`` (its outside effect is done, its output not yet
checkpointed) or ``after:STEP`` (its output checkpoint is committed, the next step
has not started). The sink records every start and every effect with the step's
idempotency key, and every committed output checkpoint. Prints the workflow's
result as JSON and exits 0 when it finishes.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import anyio
import msgspec

from eventbus import Bus, Workflow
from eventbus.storage import WriteBatch


class Order(msgspec.Struct):
    id: str
    items: list[str]
    amount: int


class Reservation(msgspec.Struct):
    order: str
    slots: list[int]


STEPS = ("reserve", "charge", "sleep", "pack", "label", "ship")


def main(path: str, sink_path: str, kill_at: str) -> None:
    sink = open(sink_path, "a", buffering=1)  # noqa: SIM115 - line-buffered, kept open

    def kill(point: str) -> None:
        if point == kill_at:
            sink.write(f"killed {point} -\n")
            os.kill(os.getpid(), signal.SIGKILL)

    def effect(step: str, key: str) -> None:
        sink.write(f"start {step} {key}\n")
        kill(f"before:{step}")
        sink.write(f"effect {step} {key}\n")
        kill(f"inside:{step}")

    async def reserve(order: Order, idempotency_key: str) -> Reservation:
        effect("reserve", idempotency_key)
        return Reservation(order.id, [i * 10 for i in range(len(order.items))])

    async def charge(r: Reservation, amount: int, idempotency_key: str) -> str:
        effect("charge", idempotency_key)
        return f"ch-{r.order}-{amount}"

    async def pack(r: Reservation, idempotency_key: str) -> int:
        effect("pack", idempotency_key)
        return len(r.slots)

    async def label(order: Order, idempotency_key: str) -> str:
        effect("label", idempotency_key)
        return f"label-{order.id}"

    async def ship(charge_id: str, boxes: int, tag: str, idempotency_key: str) -> str:
        effect("ship", idempotency_key)
        return f"shipped {tag} boxes={boxes} paid={charge_id}"

    async def run() -> None:
        async with Bus.open(path) as bus:
            commit = bus._workflows._commit

            async def commit_then_maybe_die(batch: WriteBatch) -> object:
                result = await commit(batch)
                for step in batch.steps:
                    if step.status == "done":
                        sink.write(f"done {step.name} -\n")
                        kill(f"after:{step.name}")
                return result

            bus._workflows._commit = commit_then_maybe_die

            @bus.workflow("fulfil")
            async def fulfil(wf: Workflow, order: Order) -> dict[str, object]:
                r = await wf.step("reserve", reserve, order)
                charge_id = await wf.step("charge", charge, r, order.amount)
                await wf.sleep(0.05)
                boxes, tag = await wf.gather(
                    wf.step("pack", pack, r), wf.step("label", label, order)
                )
                shipped = await wf.step("ship", ship, charge_id, boxes, tag)
                return {"charge": charge_id, "shipped": shipped}

            handle = await bus.start_workflow(
                "fulfil", Order("o-1", ["a", "b"], 42), workflow_id="order-1"
            )
            result = await handle.result(timeout=30)
            sys.stdout.write(json.dumps(result) + "\n")

    anyio.run(run)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
