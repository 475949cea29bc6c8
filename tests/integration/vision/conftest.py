"""The tiny llava served by a real server, transformers' own model and processor as the reference,
and a local HTTP server the image URLs point at."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from vision_helpers import (
    FETCH_TIMEOUT_S,
    IMAGE_LIMIT,
    MAX_IMAGE_BYTES,
    SLOW_S,
    ImageHandler,
    Reference,
    Server,
    image_bytes,
)


@pytest.fixture(scope="module")
def vision_server(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        tiny_llava_dir, tmp_path_factory.mktemp("logs"), "--max-model-len", "512", "--max-num-seqs", "8",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--image-fetch-timeout", str(FETCH_TIMEOUT_S), "--max-image-bytes", str(MAX_IMAGE_BYTES),
        "--limit-mm-per-prompt", f'{{"image": {IMAGE_LIMIT}}}',
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference(tiny_llava_dir: Path) -> Reference:
    return Reference(tiny_llava_dir)


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    """http://127.0.0.1:PORT serving /cat.png, /slow.png, /big.png, /to-file (a redirect to file:), /to-cat."""
    cat = image_bytes(101)
    ImageHandler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, cat, 0.0),
        "/slow.png": (200, {"Content-Type": "image/png"}, cat, SLOW_S),
        "/big.png": (200, {"Content-Type": "image/png"}, b"\0" * (MAX_IMAGE_BYTES + 1), 0.0),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b"", 0.0),
        "/to-cat": (302, {"Location": "/cat.png"}, b"", 0.0),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
