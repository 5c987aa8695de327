"""The dashboard: a single page served at ``/dashboard`` that reads the public HTTP API.

Its assets are built from ``dashboard/`` (see its ``build.mjs``) into
``flowloom/static/dashboard`` and ship inside the package: serving them needs no network
and no npm. The page loads nothing from any other host (its Content-Security-Policy says
so to the browser).

With a token set, the page and its assets are public (they hold no data) and its API
calls are authenticated by a session cookie that ``POST /dashboard/login`` sets when
given the token in a form: the token never appears in a URL, and the cookie holds an
expiry and an HMAC of it, never the token itself. The cookie is ``HttpOnly`` and
``SameSite=Strict``, and the API accepts it only on calls that carry the
``X-Flowloom-Dashboard`` header, which a page of another site cannot send (no CORS).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Mapping
from importlib import resources

from starlette.datastructures import Headers
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = [
    "COOKIE",
    "PUBLIC_PATHS",
    "SESSION_SECONDS",
    "admits",
    "has_session",
    "routes",
    "session_cookie",
]

COOKIE = "flowloom_session"
HEADER = "x-flowloom-dashboard"
SESSION_SECONDS = 12 * 3600
MAX_LOGIN_BODY = 4096
PUBLIC_PATHS = (
    "/dashboard",
    "/dashboard/",
    "/dashboard/config",
    "/dashboard/login",
    "/dashboard/logout",
)
PUBLIC_PREFIX = "/dashboard/static/"

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _sign(token: str, expires: int) -> str:
    key = token.encode()
    return hmac.new(key, f"flowloom-dashboard:{expires}".encode(), hashlib.sha256).hexdigest()


def session_cookie(token: str, now: float | None = None) -> str:
    """A session cookie's value for ``token``: its expiry and an HMAC of it."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{expires}.{_sign(token, expires)}"


def has_session(headers: Headers, token: str, now: float | None = None) -> bool:
    """Whether a request carries a live session cookie for ``token`` and the dashboard's
    header (without which a cookie alone proves nothing: another site's form can send it)."""
    if HEADER not in headers:
        return False
    cookies = headers.get("cookie", "")
    for part in cookies.split(";"):
        name, _, value = part.strip().partition("=")
        if name != COOKIE:
            continue
        expires, _, signature = value.partition(".")
        if not expires.isdigit() or len(expires) > 12:
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(signature.encode(), _sign(token, int(expires)).encode())
    return False


def admits(path: str, headers: Headers, token: str) -> bool:
    """Whether a request without the bearer token may pass: the page, its assets, login
    and logout (they hold no data) always; any other with a live session."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX) or has_session(headers, token)


def routes(token: str | None, trace_url: str | None) -> list[BaseRoute]:
    """The dashboard's routes: the page, its assets, its settings, login and logout."""
    assets = resources.files("flowloom").joinpath("static", "dashboard")
    page = assets.joinpath("index.html").read_bytes()

    async def index(request: HTTPRequest) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def slash(request: HTTPRequest) -> Response:
        return RedirectResponse("/dashboard", status_code=308)

    async def config(request: HTTPRequest) -> Response:
        """Whether the page must ask for the token (so that it need not try the API and
        log a 401 first), and, to those signed in, the trace UI's URL."""
        signed_in = token is None or has_session(request.headers, token)
        body = {
            "auth": token is not None,
            "signed_in": signed_in,
            "trace_url": trace_url if signed_in else None,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def login(request: HTTPRequest) -> Response:
        if token is None:
            return JSONResponse({"error": "this server needs no token"}, status_code=400)
        given = await _form_token(request)
        if given is None:
            return JSONResponse({"error": "send the token as form field 'token'"}, 400)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "wrong token"}, status_code=401)
        response = Response(status_code=204)
        response.set_cookie(
            COOKIE,
            session_cookie(token),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: HTTPRequest) -> Response:
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return [
        Route("/dashboard", index, methods=["GET"]),
        Route("/dashboard/", slash, methods=["GET"]),
        Route("/dashboard/config", config, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", logout, methods=["POST"]),
        Mount(
            "/dashboard/static",
            app=StaticFiles(packages=[("flowloom", "static/dashboard")]),
            name="dashboard-static",
        ),
    ]


async def _form_token(request: HTTPRequest) -> str | None:
    """The ``token`` field of a small url-encoded form body, else None."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return None
    try:
        fields: Mapping[str, list[str]] = urllib.parse.parse_qs(
            body.decode(), strict_parsing=False, max_num_fields=10
        )
    except (UnicodeDecodeError, ValueError):
        return None
    values = fields.get("token")
    return values[0] if values and len(values) == 1 else None
