"""Generated test images, and the local HTTP server (curate.localserver) under the name the tests use.

    with serve_images(folder) as (base_url, requests):
        ...  # fetch f"{base_url}/a.jpg"; `requests` lists the paths the server was asked for

Missing files answer 404.
"""

from __future__ import annotations

import io
from pathlib import Path

from curate.localserver import RequestLog, serve_directory

serve_images = serve_directory
__all__ = ["RequestLog", "image_bytes", "serve_images", "write_image", "write_truncated_jpeg"]


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
