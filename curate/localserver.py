"""A static file server on 127.0.0.1 (a free port) in a background thread.

The offline demo serves its generated images with it, standing in for the web that
`curate download` fetches from; the tests use it the same way. Loopback only.

    with serve_directory(folder) as (base_url, requests):
        ...  # f"{base_url}/a.jpg" is folder/a.jpg; `requests` lists the paths asked for
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class RequestLog:
    """The request paths the server received, in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self._paths: list[str] = []
        self._lock = threading.Lock()

    def add(self, path: str) -> None:
        with self._lock:
            self._paths.append(path)

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)

    def clear(self) -> None:
        with self._lock:
            self._paths.clear()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log: RequestLog
    delay: float = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.log.add(self.path)
        if self.delay:
            time.sleep(self.delay)
        super().do_GET()

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the access log
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hung up (an interrupted download) is not an error of the server."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_directory(directory: str | Path, delay: float = 0.0) -> Iterator[tuple[str, RequestLog]]:
    """Serve `directory` over HTTP on 127.0.0.1 (a random free port) in a background thread.

    `delay`: seconds each request waits before it is answered (a slow server).
    """
    log = RequestLog()
    handler_class = type("Handler", (_QuietHandler,), {"log": log, "delay": delay})
    handler = functools.partial(handler_class, directory=str(directory))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="curate-localserver", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
