"""Callbacks: POST a request's final answer to the URL its caller gave."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..types import Status

if TYPE_CHECKING:
    from .api import Api

__all__ = ["Callbacks"]

log = logging.getLogger("flowloom.http")


class Callbacks:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            log.warning("%d callback(s) not sent: the server stopped", len(self.tasks))
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def start(self, name: str, request_id: str, url: str) -> None:
        task = asyncio.get_running_loop().create_task(self._callback(name, request_id, url))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _callback(self, name: str, request_id: str, url: str) -> None:
        """POST the final answer to ``url`` once the request ends: the body and status
        code that ``GET .../result`` would give, with ``X-Request-Id`` and
        ``X-Request-Status`` (and ``X-Hub-Signature-256`` when a secret is set)."""
        api = self.api
        try:
            status = await api.waiter.wait(request_id, api.service.retention, Status.QUEUED)
            if not status.finished:
                return
            answer = await api.answer(name, request_id, status)
            headers = {
                "Content-Type": answer.headers["content-type"],
                "X-Request-Id": request_id,
                "X-Request-Status": status.value,
                "X-Flow": name,
            }
            if api.settings.hmac_secret is not None:
                digest = hmac.new(api.settings.hmac_secret, answer.body, hashlib.sha256)
                headers["X-Hub-Signature-256"] = "sha256=" + digest.hexdigest()
            for attempt in range(3):
                if await anyio.to_thread.run_sync(_post, url, bytes(answer.body), headers):
                    return
                await asyncio.sleep(0.5 * 2**attempt)
            log.warning("callback for request %s to %s failed 3 times", request_id, url)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("callback for request %s to %s failed", request_id, url)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def _post(url: str, body: bytes, headers: Mapping[str, str]) -> bool:
    """POST a callback (blocking, 10 s timeout); True once the receiver took it (2xx)."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _opener.open(request, timeout=10) as response:
            code: int = response.status
            return 200 <= code < 300
    except urllib.error.HTTPError as exc:
        log.warning("callback to %s answered %s", url, exc.code)
        return exc.code < 500 and exc.code != 429  # a 4xx will not get better
    except (OSError, ValueError) as exc:
        log.warning("callback to %s failed: %s", url, exc)
        return False
