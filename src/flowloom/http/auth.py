"""Who may call: the bearer token, and HMAC signatures with the shared secret.

Two signatures (docs/http.md says exactly what each protects):

- ``X-Flowloom-Signature: t=<unix seconds>,sha256=<hex>``: an HMAC-SHA256 of the
  timestamp, the method, the path, the query string, the ``X-Callback-Url`` and
  ``X-Request-Id`` headers and the body (``signature_base``), accepted within
  ``WINDOW`` seconds of the server's clock. A captured call cannot be sent to
  another path, with another query or callback, or after the window.
- GoFlow's body-only ``X-Hub-Signature: sha1=<hex>`` (or ``X-Hub-Signature-256:
  sha256=<hex>``), kept for compatibility on ``POST /flow/{name}`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Collection, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .inputs import BadInput
from .responses import error

__all__ = [
    "WINDOW",
    "BearerAuth",
    "check_body_signature",
    "check_request_signature",
    "sign_request",
    "signature_base",
]

WINDOW = 300  # seconds a signed call stays valid, either side of the server's clock
SIGNATURE = "x-flowloom-signature"
HUB_HEADERS = {"x-hub-signature": "sha1", "x-hub-signature-256": "sha256"}


class BearerAuth:
    """Refuses every request but those to ``public`` paths without the bearer token.
    ``admit(path, headers)``, if given, lets in other requests too (the dashboard's
    page and its session cookie)."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        public: Collection[str],
        admit: Callable[[str, Headers], bool] | None = None,
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.public = frozenset(public)
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            headers = Headers(scope=scope)
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            given = credentials.strip().encode("latin-1")
            bearer = scheme.lower() == "bearer" and hmac.compare_digest(given, self.token)
            if not bearer and not (self.admit and self.admit(scope["path"], headers)):
                response = error(
                    401,
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": 'Bearer realm="flowloom"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def signature_base(
    timestamp: int,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
) -> bytes:
    """What ``X-Flowloom-Signature`` signs: one line each for the timestamp, the method,
    the path, the raw query string, ``X-Callback-Url`` and ``X-Request-Id`` (empty if
    absent), then the body."""
    lines = [
        str(timestamp),
        method.upper(),
        path,
        query,
        headers.get("x-callback-url", ""),
        headers.get("x-request-id", ""),
    ]
    return "\n".join(lines).encode() + b"\n" + body


def sign_request(
    secret: bytes,
    method: str,
    path: str,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timestamp: int | None = None,
) -> str:
    """The ``X-Flowloom-Signature`` value for a call (headers keyed in lower case)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    base = signature_base(stamp, method, path, query, headers or {}, body)
    digest = hmac.new(secret, base, hashlib.sha256).hexdigest()
    return f"t={stamp},sha256={digest}"


def check_request_signature(
    secret: bytes, method: str, path: str, query: str, headers: Headers, body: bytes
) -> None:
    """``BadInput`` (401, or 400 if malformed) unless ``X-Flowloom-Signature`` signs
    this very call within the window."""
    given = headers.get(SIGNATURE)
    if not given:
        raise BadInput(401, "X-Flowloom-Signature is required")
    fields = dict(part.strip().partition("=")[::2] for part in given.split(","))
    stamp, signature = fields.get("t", ""), fields.get("sha256", "")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12 and signature):
        raise BadInput(400, "X-Flowloom-Signature must be t=<unix seconds>,sha256=<hex>")
    if abs(time.time() - int(stamp)) > WINDOW:
        raise BadInput(401, f"X-Flowloom-Signature is older or newer than {WINDOW} s")
    base = signature_base(int(stamp), method, path, query, headers, body)
    expected = hmac.new(secret, base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.lower().encode("latin-1"), expected.encode()):
        raise BadInput(401, "X-Flowloom-Signature does not match the call")


def check_body_signature(headers: Headers, body: bytes, secret: bytes) -> None:
    """GoFlow's ``X-Hub-Signature: sha1=<hex>`` or ``X-Hub-Signature-256:
    sha256=<hex>`` (each header with its own algorithm): an HMAC of the body only. Every
    such header given must match."""
    given = {name: headers[name] for name in HUB_HEADERS if name in headers}
    if not given:
        raise BadInput(401, "X-Flowloom-Signature or X-Hub-Signature is required")
    for name, value in given.items():
        algorithm, _, signature = value.strip().partition("=")
        if algorithm != HUB_HEADERS[name]:
            shown = "X-Hub-Signature-256" if name.endswith("256") else "X-Hub-Signature"
            raise BadInput(400, f"{shown} must be {HUB_HEADERS[name]}=<hex>")
        expected = hmac.new(secret, body, algorithm).hexdigest()
        if not hmac.compare_digest(signature.strip().lower().encode("latin-1"), expected.encode()):
            raise BadInput(401, "X-Hub-Signature does not match the body")
