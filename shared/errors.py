"""Typed errors that carry a machine-readable code, a human message and the HTTP status they map to."""

from __future__ import annotations


class InferqError(Exception):
    """Base of every error a client may see: `code` is stable snake_case, `message` is for humans."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ImageError(InferqError):
    """The bytes are not an image we can classify (empty, corrupt, unsupported, too large)."""

    code = "invalid_image"
    http_status = 400


class EmptyImage(ImageError):
    code = "empty_image"


class UnsupportedImageFormat(ImageError):
    code = "unsupported_image_format"
    http_status = 415


class CorruptImage(ImageError):
    code = "corrupt_image"


class ImageTooLarge(ImageError):
    """Too many pixels: refused before the pixels are decoded (decompression-bomb guard)."""

    code = "image_too_large"
    http_status = 413


class ArtifactError(InferqError):
    """The model artifact is missing, tampered with, or does not match what loads it."""

    code = "artifact_invalid"


class QueuedBytesFull(InferqError):
    """MAX_QUEUED_BYTES of images are already waiting in Redis: retry once workers have drained some.

    `retry_after` (seconds) is filled in by whoever knows the completion rate (the api)."""

    code = "queued_bytes_full"
    http_status = 429

    def __init__(self, message: str, *, queued: int, limit: int, incoming: int) -> None:
        super().__init__(message)
        self.queued = queued
        self.limit = limit
        self.incoming = incoming
        self.retry_after: int | None = None


class RedisFull(InferqError):
    """Redis is at (or within REDIS_HEADROOM_BYTES of) its `maxmemory`: no new work is taken until
    workers have freed images. Reads, long-polls and cancels keep working."""

    code = "redis_full"
    http_status = 503
    retry_after = 5
