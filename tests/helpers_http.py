"""A local HTTP image server for tests (127.0.0.1 only, a free port), and generated test images.

    with serve_images(folder) as (base_url, requests):
        ...  # fetch f"{base_url}/a.jpg"; `requests` lists the paths the server was asked for

Missing files answer 404. Reuse it for end-to-end tests of `curate download`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
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
def serve_images(directory: str | Path, delay: float = 0.0) -> Iterator[tuple[str, RequestLog]]:
    """Serve `directory` over HTTP on 127.0.0.1 (a random free port) in a background thread.

    `delay`: seconds each request waits before it is answered (a slow server).
    """
    log = RequestLog()
    handler_class = type("Handler", (_QuietHandler,), {"log": log, "delay": delay})
    handler = functools.partial(handler_class, directory=str(directory))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A solid-colour image encoded as PNG or JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: str | Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    """Write an image whose format follows the suffix (.png or .jpg)."""
    path = Path(path)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(image_bytes(color, size, fmt))
    return path


def write_truncated_jpeg(path: str | Path, size: tuple[int, int] = (64, 48), keep: float = 0.5) -> Path:
    """A JPEG cut after `keep` of its bytes (a broken download)."""
    data = image_bytes((200, 40, 40), size, "JPEG")
    path = Path(path)
    path.write_bytes(data[: max(16, int(len(data) * keep))])
    return path
