"""An operator's web dashboard: lag, dead letters, workflow runs and reconciliation in
a browser, server-rendered and updating live (install the ``dashboard`` extra).

Two ways to run it:

- ``eventbus serve FILE`` reads a log file, also beside the bus that owns it (as the
  command line does; changes are queued for the owner);
- :func:`app` mounts it in your own ASGI application next to a live bus, which adds
  what only the running process knows (throughput, handler latency, calls in flight,
  breakers)::

      api.mount("/ops", eventbus.dashboard.app(bus, token=os.environ["OPS_TOKEN"]))

Read-only unless ``allow_actions``; with a token, every request must carry it.
"""

from __future__ import annotations

from starlette.applications import Starlette

from .._bus import Bus
from ._app import build
from ._base import Dashboard
from ._security import Token
from ._source import BusSource, FileSource

__all__ = ["Token", "app", "file_app", "serve"]


def app(bus: Bus, *, allow_actions: bool = False, token: Token = None) -> Starlette:
    """The dashboard of a live bus, as an ASGI application to mount in your own
    (Starlette, FastAPI: ``api.mount("/ops", app(bus))``). Serve it on the bus's event
    loop (the usual case: the server that runs your application opened the bus).

    Args:
        bus: An open bus.
        allow_actions: Offer redrive, purge, cancel and reconcile (off: read-only, and
            their endpoints answer 403).
        token: A token every request must carry (``Authorization: Bearer``, or
            ``?token=`` once, which sets a cookie), or a callable that says whether a
            presented token is good; None for no token.
    """
    dashboard = Dashboard(BusSource(bus), where="live bus", allow_actions=allow_actions)
    return build(dashboard, token, owns_source=False)


def file_app(
    path: str, *, allow_actions: bool = False, token: Token = None, lease: float | None = None
) -> Starlette:
    """The dashboard of a log file (what ``eventbus serve FILE`` serves): read-only
    opens, changes applied directly when no bus owns the file and queued for the
    owner otherwise, as the command line does.

    Args:
        path: An existing log file (a missing one is refused on the first request).
        allow_actions: As for :func:`app`.
        token: As for :func:`app`.
        lease: Seconds past due after which a reconciliation pass counts a retry as
            overdue (default ``BusConfig().reconcile_lease``).
    """
    dashboard = Dashboard(FileSource(path, lease=lease), where=path, allow_actions=allow_actions)
    return build(dashboard, token, owns_source=True)


def serve(
    path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_actions: bool = False,
    token: Token = None,
) -> None:
    """Serve :func:`file_app` with uvicorn until interrupted (``eventbus serve``)."""
    import uvicorn

    application = file_app(path, allow_actions=allow_actions, token=token)
    uvicorn.run(application, host=host, port=port, log_level="warning")
