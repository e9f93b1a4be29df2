"""A FastAPI service on the bus: publish from an endpoint, handle in the background.

    pip install 'eventbus[prometheus]' fastapi uvicorn
    APP_DB=app.db uvicorn examples.fastapi_app:app        # several workers: see below

- The bus is opened in the app's lifespan and closed (draining handlers) at shutdown.
- ``POST /orders`` publishes an order with the request's ``Idempotency-Key`` header
  as its idempotency key: a client that retries after a timeout gets the first
  request's receipt back (``duplicate: true``), and the order is billed once.
- ``billing`` keeps a running total per customer in its state and publishes an
  invoice through the outbox (both committed with the order's acknowledgement);
  ``mailer`` handles the invoices.
- ``GET /metrics`` is the Prometheus text format (``eventbus.prometheus``).
- ``GET /healthz`` is 200 while every subscription's lag and the dead letters stay
  under their thresholds, 503 otherwise, with the numbers either way.

Settings come from ``EVENTBUS_*`` variables (``BusConfig.from_env()``). Several
workers: a SQLite log has one owner unless every process opens it shared, so
``uvicorn --workers 4`` alone makes every worker after the first fail at startup
with ``LogLocked``, and ``EVENTBUS_SHARED=true uvicorn examples.fastapi_app:app
--workers 4`` runs them all on one file: each publishes and answers, one at a time
dispatches the handlers, another takes over when it dies. ``/metrics`` then shows
the numbers of whichever worker answered the scrape. To divide the handlers' work
among processes or machines, use the PostgreSQL log (``APP_DB=postgresql://...``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

import eventbus.prometheus
from eventbus import Bus, BusConfig, Context, Event, InvalidEvent, RetryPolicy


class Order(BaseModel):
    customer: str
    amount: int


class Accepted(BaseModel):
    seq: int
    id: str
    duplicate: bool


def subscribe_handlers(bus: Bus) -> None:
    """The service's subscriptions."""

    @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=3))
    async def bill(event: Event[dict[str, object]], ctx: Context) -> None:
        customer = str(event.payload["customer"])
        amount = event.payload["amount"]
        if not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"order {event.id}: amount must be a positive int, got {amount!r}")
        total = await ctx.state.get(customer, 0)
        assert isinstance(total, int)  # what this handler stores there
        ctx.state.set(customer, total + amount)
        # Outbox: committed in the same transaction as this order's acknowledgement.
        await ctx.publish("invoices", {"customer": customer, "amount": amount}, key=customer)

    @bus.subscribe("invoices", name="mailer")
    async def mail(events: list[Event[dict[str, object]]], ctx: Context) -> None:
        # A real service would send mail here, with ctx.idempotency_key_for(event).
        sent = await ctx.state.get("sent", 0)
        assert isinstance(sent, int)
        ctx.state.set("sent", sent + len(events))


def create_app(
    path: str,
    *,
    max_lag: int = 10_000,
    max_dead_letters: int = 0,
) -> FastAPI:
    """The service on the log at ``path``.

    Args:
        path: The log: a SQLite file, ``":memory:"`` or a PostgreSQL URL.
        max_lag: ``/healthz`` fails once a subscription is this many events behind.
        max_dead_letters: ``/healthz`` fails once more dead letters than this wait.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Bus.open(path, config=BusConfig.from_env()) as bus:
            subscribe_handlers(bus)
            app.state.bus = bus
            app.state.registry = CollectorRegistry()
            eventbus.prometheus.collector(bus, registry=app.state.registry)
            yield
        # Leaving the block drained the handlers in flight and closed the log.

    app = FastAPI(title="orders", lifespan=lifespan)

    def bus_of(request: Request) -> Bus:
        bus: Bus = request.app.state.bus
        return bus

    @app.post("/orders", status_code=201)
    async def place_order(
        order: Order,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Accepted:
        try:
            receipt = await bus_of(request).publish(
                "orders",
                order.model_dump(),
                key=order.customer,
                idempotency_key=idempotency_key,
            )
        except InvalidEvent as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        if receipt.duplicate:
            response.status_code = 200  # the same order, accepted before
        return Accepted(seq=receipt.seq, id=receipt.id, duplicate=receipt.duplicate)

    @app.get("/customers/{customer}")
    async def customer_total(customer: str, request: Request) -> dict[str, object]:
        total = await bus_of(request).state("billing").get(customer, 0)
        return {"customer": customer, "total": total}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        data = generate_latest(request.app.state.registry)
        return Response(content=data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz(request: Request, response: Response) -> dict[str, object]:
        bus = bus_of(request)
        lag = {name: s.lag for name, s in bus.metrics().subscriptions.items()}
        dead = await bus.dead_letters.count()
        problems = [f"{name} is {n} events behind" for name, n in lag.items() if n > max_lag]
        if dead > max_dead_letters:
            problems.append(f"{dead} dead letters wait (bus.dead_letters)")
        if problems:
            response.status_code = 503
        return {"ok": not problems, "problems": problems, "lag": lag, "dead_letters": dead}

    return app


app = create_app(os.environ.get("APP_DB", "app.db"))
