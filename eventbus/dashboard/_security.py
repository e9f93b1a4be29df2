"""Who may use the dashboard: the token every request must carry (when one is set),
and the form token every action must carry (CSRF)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: A fixed token, or a callable that says whether a presented token is good.
Token = str | Callable[[str], bool] | None

COOKIE = "eventbus_dashboard_token"
#: The header that may carry the form token of an action instead of the form field.
CSRF_HEADER = "x-csrf-token"


def token_ok(token: Token, given: str | None) -> bool:
    """Whether ``given`` is the token (compared in constant time)."""
    if token is None:
        return True
    if not given:
        return False
    if callable(token):
        return bool(token(given))
    return hmac.compare_digest(token.encode(), given.encode())


def presented(request: Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, the cookie set after a
    first visit with ``?token=``, or that query parameter."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE) or request.query_params.get("token")


class Guard:
    """ASGI middleware: refuses (401) every request without the token. A page opened
    with ``?token=...`` sets it as a cookie (HttpOnly, SameSite=Strict) and redirects
    to the same address without it, so it leaves the address bar and the history."""

    def __init__(self, app: ASGIApp, token: Token) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = presented(request)
        if not token_ok(self.token, given):
            response = PlainTextResponse(
                "401: this dashboard needs its token. Open it once as ...?token=TOKEN (the "
                "value given to `eventbus serve --token` or to app(bus, token=...)), or send "
                "the header Authorization: Bearer TOKEN.",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="eventbus"'},
            )
            await response(scope, receive, send)
            return
        if "token" in request.query_params and given == request.query_params["token"]:
            rest = [(k, v) for k, v in parse_qsl(request.url.query) if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            redirect = RedirectResponse(target, status_code=303)
            redirect.set_cookie(
                COOKIE,
                given or "",
                httponly=True,
                samesite="strict",
                path=scope.get("root_path") or "/",
            )
            await redirect(scope, receive, send)
            return
        await self.app(scope, receive, send)


def csrf_ok(expected: str, form: dict[str, str], request: Request) -> bool:
    """Whether an action carries this dashboard's form token, in its form or header."""
    given = form.get("csrf") or request.headers.get(CSRF_HEADER) or ""
    return hmac.compare_digest(expected.encode(), given.encode())
