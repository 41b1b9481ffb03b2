"""Test data made in code: settings, small images, hand-built PNGs whose headers declare anything.
One definition each, imported by every test module that needs them."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from shared.config import Settings


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    """The service's settings on `redis_url`, with `overrides` (field names of `Settings`)."""
    return Settings(redis_url=redis_url, **overrides)


def png(value: int = 90, size: int = 40) -> bytes:
    """A flat grey PNG: cheap to decode, and its mean pixel (what the stub model reports) is known."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    """A PNG whose header is intact (the api accepts it) but whose pixels are cut: the worker fails it."""
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def jpegs(count: int, seed: int = 11) -> list[bytes]:
    """Small, distinct photo-like JPEGs, cheap to decode (for tests about the plumbing)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, (1, 1, 3))
        noise = rng.integers(-40, 40, (96, 128, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte 8-bit RGB PNG whose IHDR declares `width` x `height` (a decompression bomb's
    header). PIL reads chunks up to the first IDAT before it reports a size, so one small IDAT follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )
