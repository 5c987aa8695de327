"""A TCP proxy on loopback that delivers every answer of the server behind it late.

``SlowProxy(port)`` listens on 127.0.0.1 (a port of its own) and forwards each
connection to ``127.0.0.1:port``: requests go through at once, each chunk of an answer
reaches the client ``delay`` seconds after the server sent it (in order; the delay
may be changed at any time and applies to chunks read from then on). A Redis
behind it stays up and correct, only slow: what a saturated or swapping server, or a
congested link, looks like to its clients. ``upstream`` may be changed at any time:
connections made from then on go there (a DNS name or a virtual IP moved to another
server), those made before stay where they were.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque


class SlowProxy:
    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closing.is_set():  # closed meanwhile: its sockets are gone
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answer, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def _answer(self, server: socket.socket, client: socket.socket) -> None:
        """Read the server's answers as they come; hand each to the client when due."""
        due: deque[tuple[float, bytes]] = deque()  # (when, chunk), in the order read
        ready = threading.Condition()
        done = threading.Event()
        last = 0.0  # answers keep their order when the delay shrinks

        def deliver() -> None:
            while True:
                with ready:
                    while not due and not done.is_set():
                        ready.wait()
                    if not due:
                        break
                    at, chunk = due[0]
                    wait = at - time.monotonic()
                    if wait > 0:
                        ready.wait(wait)
                        continue
                    due.popleft()
                try:
                    client.sendall(chunk)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                client.close()

        threading.Thread(target=deliver, daemon=True).start()
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                last = max(last, time.monotonic() + self.delay)
                with ready:
                    due.append((last, chunk))
                    ready.notify()
        with ready:
            done.set()
            ready.notify()
        server.close()  # the client's side closes once its answers are delivered

    @property
    def url_base(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        with self._lock:
            self._closing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
