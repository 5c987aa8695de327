"""Who may call: the bearer token (every endpoint but the public ones) and the HMAC
signature of an execute call."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .inputs import BadInput
from .responses import error

__all__ = ["BearerAuth", "check_signature"]


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


def check_signature(headers: Headers, body: bytes, secret: bytes) -> None:
    """GoFlow's ``X-Hub-Signature: sha1=<hex>`` (or ``sha256=``, or the
    ``X-Hub-Signature-256`` header GitHub sends): an HMAC of the body with the secret."""
    given = headers.get("x-hub-signature-256") or headers.get("x-hub-signature")
    if not given:
        raise BadInput(401, "X-Hub-Signature is required")
    algorithm, _, signature = given.strip().partition("=")
    if algorithm not in ("sha1", "sha256"):
        raise BadInput(400, "X-Hub-Signature must be sha1=<hex> or sha256=<hex>")
    expected = hmac.new(secret, body, algorithm).hexdigest()
    if not hmac.compare_digest(signature.strip().lower().encode("latin-1"), expected.encode()):
        raise BadInput(401, "X-Hub-Signature does not match the body")
