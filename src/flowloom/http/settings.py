"""The settings of one HTTP app, resolved once from arguments, the service and the
environment."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .addresses import Network, networks

if TYPE_CHECKING:
    from ..service import FlowService

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY", "DEFAULT_WAIT_TIMEOUT", "Settings"]

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_WAIT_TIMEOUT = 30.0
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a request's body may go without a byte arriving


@dataclass(frozen=True)
class Settings:
    token: str | None
    hmac_secret: bytes | None
    max_body: int
    wait_timeout: float
    callbacks: bool
    callback_allow: tuple[Network, ...] = ()
    monitoring: bool = False  # GET /metrics: the service keeps Prometheus metrics
    dashboard: bool = False
    trace_url: str | None = None  # a trace UI's URL with "{trace_id}", for the dashboard
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    @classmethod
    def resolve(
        cls,
        service: FlowService,
        *,
        token: str | None,
        hmac_secret: str | bytes | None,
        max_body: int,
        wait_timeout: float,
        callbacks: bool,
        callback_allow: str | Iterable[str] | None = None,
        dashboard: bool | None = None,
        trace_url: str | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> Settings:
        """Explicit arguments first, then the service's, then the environment:
        ``FLOWLOOM_TOKEN``, ``FLOWLOOM_HMAC_SECRET``, ``FLOWLOOM_CALLBACK_ALLOW``,
        ``FLOWLOOM_TRACE_URL``. The dashboard is served when the service has
        ``enable_monitoring`` on, unless ``dashboard`` says otherwise."""
        if max_body < 0 or not (0 <= wait_timeout < math.inf):
            raise ValueError("max_body and wait_timeout must be >= 0 and finite")
        if not body_timeout > 0:  # NaN too
            raise ValueError("body_timeout must be a positive number of seconds")
        token = token or service.token or os.environ.get("FLOWLOOM_TOKEN") or None
        secret = hmac_secret or service.hmac_secret or os.environ.get("FLOWLOOM_HMAC_SECRET")
        if callback_allow is None:
            callback_allow = service.callback_allow
        if callback_allow is None:
            callback_allow = os.environ.get("FLOWLOOM_CALLBACK_ALLOW")
        return cls(
            token=token,
            hmac_secret=(secret.encode() if isinstance(secret, str) else secret) or None,
            max_body=max_body,
            wait_timeout=float(wait_timeout),
            callbacks=callbacks,
            callback_allow=networks(callback_allow),
            monitoring=getattr(service, "metrics", None) is not None,
            dashboard=bool(service.enable_monitoring) if dashboard is None else dashboard,
            trace_url=trace_url or os.environ.get("FLOWLOOM_TRACE_URL") or None,
            body_timeout=float(body_timeout),
        )
