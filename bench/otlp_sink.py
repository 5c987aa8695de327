"""An OTLP/HTTP receiver that discards what it gets: ``python -m bench.otlp_sink PORT``.

The benchmark's observed systems export their spans here, so that the figures include
building, batching, encoding and sending every span, but no collector's work (a
collector would run on another machine). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.server
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


if __name__ == "__main__":
    main()
