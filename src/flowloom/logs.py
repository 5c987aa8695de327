"""Logging for flowloom's long-running entry points: workers, the server, the CLI.

flowloom logs to the standard ``logging`` module under ``flowloom.*`` and, as a
library, configures nothing: an application that runs flows in its own process
decides where records go (``flowloom`` has a ``NullHandler``). The blocking entry
points (``start_worker``, ``start``, ``start_server``, ``flowloom.http.serve``,
``flowloom worker``/``serve``) are programs of their own, so they send records to
stderr from ``INFO`` up when the application has not configured logging itself.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FORMAT", "configure", "safe_url"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int | str | None = None) -> None:
    """Log flowloom's records to stderr at ``level`` (default ``INFO``), unless logging is
    configured already; then only an explicit ``level`` is applied, to flowloom's logger.

    Other libraries' records go to stderr at ``WARNING`` and above.
    """
    logger = logging.getLogger("flowloom")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=FORMAT)
        logger.setLevel(logging.INFO if level is None else level)
    elif level is not None:
        logger.setLevel(level)


def safe_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    netloc = f"{user}:***@{host}{port}" if user else f":***@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))
