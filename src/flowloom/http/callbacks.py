"""Callbacks: POST a request's final answer to the URL its caller gave.

Bounded on every side, so that no receiver, however slow, holds up anything else:

- at most ``max_pending`` callbacks wait for their requests at a time (past it,
  execute answers 429 before running anything);
- they wait without threads: the backend tells when a request ends (``Backend.listen``),
  or, on a backend that cannot, one task checks every waiting request once a ``sweep``;
- at most ``in_flight`` POSTs are sent at once, on one async connection pool, each attempt
  within a total ``deadline`` (connect, headers and body together);
- at most ``attempts`` attempts, ``backoff`` doubling between them; a 4xx other than
  408 and 429 is final;
- each attempt resolves the host again and sends to the address it checked (a name
  cannot be switched to an internal address between the check and the POST);
- the server's shutdown cancels them all at once and logs how many were not sent.

The URL's credentials go to the receiver (as basic auth) but never into a log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import httpcore
import httpx

from ..backends import Backend
from ..types import Status
from . import addresses
from .auth import sign_request

if TYPE_CHECKING:
    from .api import Api

__all__ = ["Callbacks", "Target", "parse_url"]

log = logging.getLogger("flowloom.http")

MAX_URL = 2048
HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
FINAL = "final"  # the receiver refused for good
SEND_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError)


@dataclass(frozen=True)
class Target:
    """A checked callback URL."""

    url: httpx.URL

    @property
    def shown(self) -> str:
        """The URL for a log: no credentials, no query."""
        return str(self.url.copy_with(username=None, password=None, query=None, fragment=None))

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)


def parse_url(value: str) -> Target:
    """``ValueError`` with the reason unless ``value`` is an absolute http(s) URL."""
    if len(value) > MAX_URL:
        raise ValueError(f"longer than {MAX_URL} characters")
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(str(exc) or "malformed URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http(s) URL")
    if not (HOSTNAME.fullmatch(url.raw_host.decode("ascii")) or ":" in url.host):
        raise ValueError(f"{url.host!r} is not a host name or address")
    if url.port is not None and not 0 < url.port < 65536:
        raise ValueError("the port must be from 1 to 65535")
    return Target(url)


@dataclass
class _Pending:
    name: str
    request_id: str
    target: Target
    since: float = field(default_factory=time.monotonic)


class Callbacks:
    def __init__(
        self,
        api: Api,
        *,
        max_pending: int = 10_000,
        in_flight: int = 16,
        attempts: int = 3,
        deadline: float = 10.0,
        backoff: float = 0.5,
        sweep: float = 1.0,
        resolver: addresses.Resolver = addresses.resolve,
    ) -> None:
        self.api = api
        self.max_pending = max_pending
        self.attempts = attempts
        self.deadline = deadline
        self.backoff = backoff
        self.sweep = sweep
        self.resolver = resolver
        self.waiting: dict[str, list[_Pending]] = {}  # request id -> its callbacks
        self.fresh: set[str] = set()  # ids to check at once (they may have ended already)
        self.sending: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(in_flight)
        self._in_flight = in_flight
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._client: httpcore.AsyncConnectionPool | None = None
        self._unlisten: Callable[[], None] | None = None
        self._listening = False

    @property
    def pending(self) -> int:
        """Callbacks not yet sent: waiting for their request, or being delivered."""
        return sum(len(w) for w in self.waiting.values()) + len(self.sending)

    def full(self) -> bool:
        return self.pending >= self.max_pending

    async def target(self, value: str) -> Target:
        """The checked target of ``value``: ``ValueError`` with the reason if it is
        malformed or resolves to an address callbacks may not go to."""
        target = parse_url(value)
        host = target.url.host
        await addresses.check(host, target.port, self.api.settings.callback_allow, self.resolver)
        return target

    def start(self, name: str, request_id: str, target: Target, status: Status) -> None:
        """Send the answer to ``target`` once the request ends (at once if ``status``
        has ended)."""
        pending = _Pending(name, request_id, target)
        if status.finished:
            self._deliver(pending, status)
            return
        self.waiting.setdefault(request_id, []).append(pending)
        self.fresh.add(request_id)
        self._ensure_watching()
        self._wake.set()

    # -- waiting for ends ------------------------------------------------------------------
    def _ensure_watching(self) -> None:
        if not self._listening:
            self._listening = True
            loop = asyncio.get_running_loop()
            loop_thread = threading.get_ident()

            def ended(request_id: str, status: Status, _result: bytes | None) -> None:
                if threading.get_ident() == loop_thread:  # the loop holds the subscription
                    self._ended(request_id, status)
                    return
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self._ended, request_id, status)

            def lost() -> None:  # ends may have been missed: check every waiting request
                if threading.get_ident() == loop_thread:
                    self._check_all()
                    return
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._check_all)

            self._unlisten = self.api.service.backend.listen(ended, lost)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _check_all(self) -> None:
        self.fresh.update(self.waiting)
        self._wake.set()

    def _ended(self, request_id: str, status: Status | None) -> None:
        for pending in self.waiting.pop(request_id, ()):
            self._deliver(pending, status)
        self.fresh.discard(request_id)

    async def _watch(self) -> None:
        """Check new requests at once, all of them when the backend may have missed
        ends (``lost``), and all of them every ``sweep`` until none waits; when the
        backend tells of ends itself that periodic check is only a safety net, every
        ``max(sweep, 30)`` seconds."""
        backend = self.api.service.backend
        every = self.sweep if self._unlisten is None else max(self.sweep, 30.0)
        last_sweep = time.monotonic()
        while self.waiting:
            self._wake.clear()  # before the reads: a request added during them wakes again
            full = time.monotonic() - last_sweep >= every
            ids = list(self.waiting) if full else list(self.fresh)
            self.fresh.clear()
            if full:
                last_sweep = time.monotonic()
            if ids:
                try:
                    found = await anyio.to_thread.run_sync(_statuses, backend, ids)
                except Exception as exc:  # the backend is down: check again next sweep
                    log.warning("callbacks: cannot read request statuses: %s", exc)
                    found = {}
                for request_id, status in found.items():
                    if status is None or status.finished:
                        self._ended(request_id, status)
            self._expire()
            with anyio.move_on_after(every):
                await self._wake.wait()

    def _expire(self) -> None:
        oldest = time.monotonic() - self.api.service.retention
        for request_id, callbacks in list(self.waiting.items()):
            if callbacks[0].since < oldest:
                self._ended(request_id, None)

    # -- sending ---------------------------------------------------------------------------
    def _deliver(self, pending: _Pending, status: Status | None) -> None:
        if status is None:
            log.warning(
                "callback for request %s to %s not sent: the request has expired",
                pending.request_id,
                pending.target.shown,
            )
            self.api.service.observers.callback_sent("failed")
            return
        task = asyncio.get_running_loop().create_task(self._send(pending, status))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, pending: _Pending, status: Status) -> None:
        """POST the final answer: the body and status code that ``GET .../result`` would
        give, with ``X-Request-Id``, ``X-Request-Status``, ``X-Flow`` (and both
        signatures when a secret is set)."""
        name, request_id, target = pending.name, pending.request_id, pending.target
        try:
            answer = await self.api.answer(name, request_id, status)
        except Exception as exc:  # the request expired, the backend is down...
            log.warning("callback for request %s to %s not sent: %s", request_id, target.shown, exc)
            self.api.service.observers.callback_sent("failed")
            return
        body = bytes(answer.body)
        headers = {
            "Content-Type": answer.headers["content-type"],
            "X-Request-Id": request_id,
            "X-Request-Status": status.value,
            "X-Flow": name,
        }
        secret = self.api.settings.hmac_secret
        if secret is not None:
            digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
            headers["X-Hub-Signature-256"] = "sha256=" + digest
            query = target.url.query.decode("latin-1")
            headers["X-Flowloom-Signature"] = sign_request(
                secret, "POST", target.url.path, query, {}, body
            )
        reason = "no attempt"
        for attempt in range(self.attempts):
            if attempt:
                await anyio.sleep(self.backoff * 2 ** (attempt - 1))
            outcome = await self._attempt(target, body, headers)
            if outcome is None or outcome == FINAL:
                sent = "delivered" if outcome is None else "rejected"
                self.api.service.observers.callback_sent(sent)
                return
            reason = outcome
        log.warning(
            "callback for request %s to %s failed %d times, last: %s",
            request_id,
            target.shown,
            self.attempts,
            reason,
        )
        self.api.service.observers.callback_sent("failed")

    async def _attempt(self, target: Target, body: bytes, headers: dict[str, str]) -> str | None:
        """One POST within the deadline: None once the receiver took it (2xx), "final"
        if it refused for good, else why it failed."""
        async with self._slots:
            try:
                with anyio.fail_after(self.deadline):
                    address = await addresses.check(
                        target.url.host,
                        target.port,
                        self.api.settings.callback_allow,
                        self.resolver,
                    )
                    code = await self._post(target, address, body, headers)
            except TimeoutError:
                return f"no answer within {self.deadline:g} s"
            except ValueError as exc:
                return str(exc)
            except (
                httpcore.TimeoutException,
                httpcore.NetworkError,
                httpcore.ProtocolError,
            ) as exc:
                return type(exc).__name__
        if 200 <= code < 300:
            return None
        if 400 <= code < 500 and code not in (408, 429):
            log.warning("callback to %s answered %d: not sent again", target.shown, code)
            return FINAL
        return f"answered {code}"

    async def _post(
        self, target: Target, address: addresses.Address, body: bytes, headers: dict[str, str]
    ) -> int:
        """POST to ``address``, the checked one, with the URL's host in ``Host`` (and as
        the TLS server name); the answer's status code (its body is not read). httpcore,
        not httpx: httpx logs every URL it calls, query included."""
        url = target.url
        sent = {**headers, "Host": url.netloc.decode("ascii").rpartition("@")[2]}
        if url.username:
            userinfo = f"{url.username}:{url.password}".encode()
            sent["Authorization"] = "Basic " + base64.b64encode(userinfo).decode()
        timeout = dict.fromkeys(("connect", "read", "write", "pool"), self.deadline)
        async with self._http().stream(
            "POST",
            httpcore.URL(
                scheme=url.raw_scheme,
                host=str(address).encode(),
                port=target.port,
                target=url.raw_path,
            ),
            headers=list(sent.items()),
            content=body,
            extensions={"timeout": timeout, "sni_hostname": url.host},
        ) as response:
            return response.status

    def _http(self) -> httpcore.AsyncConnectionPool:
        if self._client is None:
            # no connection kept open: receivers are many and each is called rarely
            self._client = httpcore.AsyncConnectionPool(
                max_connections=self._in_flight, max_keepalive_connections=0
            )
        return self._client

    async def close(self) -> None:
        """Cancel every callback not yet sent, and say how many."""
        waiting = sum(len(w) for w in self.waiting.values())
        sending = len(self.sending)
        if waiting or sending:
            log.warning(
                "%d callback(s) not sent: the server stopped (%d waiting for their request, "
                "%d being delivered)",
                waiting + sending,
                waiting,
                sending,
            )
        self.waiting.clear()
        tasks = [*self.sending, *([self._watcher] if self._watcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._unlisten is not None:
            self._unlisten()
        if self._client is not None:
            await self._client.aclose()


def _statuses(backend: Backend, request_ids: list[str]) -> dict[str, Status | None]:
    return {request_id: backend.wait(request_id, 0) for request_id in request_ids}
