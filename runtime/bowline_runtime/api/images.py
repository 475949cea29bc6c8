"""Image content parts: read a data: URL or fetch an http(s) URL, and decode the bytes with Pillow.

Every way an image can be wrong is the client's to fix, so each is a 400 that says which image and
what: a scheme other than data/http/https, base64 that does not decode, a fetch that times out
(`--image-fetch-timeout`, seeded by vLLM's VLLM_IMAGE_FETCH_TIMEOUT), an HTTP error, a redirect to
another scheme, more than `--max-image-bytes` (checked while reading, so a huge body is never held),
bytes Pillow cannot decode, more pixels than MAX_IMAGE_PIXELS, or more images than
`--limit-mm-per-prompt` allows. Fetches of one request run concurrently under one deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Any
from urllib.parse import urljoin, urlsplit

from bowline_runtime.config import parse_mm_limit
from bowline_runtime.engine.errors import RequestRejected

__all__ = ["check_count", "decode_image", "load_image_bytes", "parse_mm_limit"]

PARAM = "messages"
MAX_REDIRECTS = 5
# Pillow's own bomb threshold is 89 M pixels (a warning) and twice that (an error); a vision tower
# resizes to a few hundred pixels a side, so anything near these sizes is a mistake or an attack.
MAX_IMAGE_PIXELS = 64_000_000
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def check_count(count: int, limit: int | None) -> None:
    if limit is not None and count > limit:
        raise RequestRejected(
            f"at most {limit} image(s) may be provided in one request; this one has {count} "
            "(--limit-mm-per-prompt)",
            PARAM,
        )


def _data_url_bytes(url: str, index: int, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestRejected(f"image {index}: a data: URL must be base64 (data:image/png;base64,...)", PARAM)
    if len(payload) * 3 // 4 > max_bytes:
        raise RequestRejected(f"image {index} is too large: over {max_bytes} bytes (--max-image-bytes)", PARAM)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(f"image {index}: the data: URL is not valid base64", PARAM) from None


async def _fetch(client: Any, url: str, index: int, max_bytes: int) -> bytes:
    """GET with redirects followed by hand, each checked to stay on http(s); the body read in chunks."""
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url) as resp:
            if resp.is_redirect:
                target = urljoin(url, resp.headers.get("location", ""))
                if urlsplit(target).scheme not in ("http", "https"):
                    raise RequestRejected(f"image {index}: the URL redirects to a non-http URL", PARAM)
                url = target
                continue
            if resp.status_code >= 400:
                raise RequestRejected(f"image {index}: fetching {url} answered HTTP {resp.status_code}", PARAM)
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise RequestRejected(f"image {index} is too large: over {max_bytes} bytes (--max-image-bytes)", PARAM)
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise RequestRejected(
                        f"image {index} is too large: over {max_bytes} bytes (--max-image-bytes)", PARAM
                    )
            return bytes(body)
    raise RequestRejected(f"image {index}: more than {MAX_REDIRECTS} redirects", PARAM)


async def load_image_bytes(urls: list[str], *, timeout: float, max_bytes: int) -> list[bytes]:
    """The bytes of each image URL, in order (data: URLs decoded, http(s) fetched concurrently)."""
    out: list[bytes | None] = [None] * len(urls)
    remote: list[int] = []
    for i, url in enumerate(urls):
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            out[i] = _data_url_bytes(url, i, max_bytes)
        elif scheme in ("http", "https"):
            remote.append(i)
        else:
            raise RequestRejected(
                f"image {i}: image_url must be a data: URL or an http(s):// URL, not {scheme or 'a bare path'}:", PARAM
            )
    if remote:
        import httpx

        try:
            async with asyncio.timeout(timeout):
                async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
                    fetched = await asyncio.gather(*(_fetch(client, urls[i], i, max_bytes) for i in remote))
        except TimeoutError:
            raise RequestRejected(
                f"fetching the image URL(s) timed out after {timeout:g} s (--image-fetch-timeout)", PARAM
            ) from None
        except httpx.TimeoutException:
            raise RequestRejected(
                f"fetching the image URL(s) timed out after {timeout:g} s (--image-fetch-timeout)", PARAM
            ) from None
        except httpx.HTTPError as exc:
            raise RequestRejected(f"fetching an image URL failed: {exc}", PARAM) from None
        for i, data in zip(remote, fetched, strict=True):
            out[i] = data
    return [b for b in out if b is not None]


def decode_image(data: bytes, index: int) -> Any:
    """A PIL image in RGB, or a 400 naming the image."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise RequestRejected(
                f"image {index} is too large: {image.width}x{image.height} pixels (at most {MAX_IMAGE_PIXELS})", PARAM
            )
        image.load()
        return image.convert("RGB")
    except RequestRejected:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, decompression bombs
        raise RequestRejected(f"image {index} could not be decoded as PNG, JPEG or WebP: {exc}", PARAM) from None
