"""Request validation: everything here runs before anything is written to Redis.

Uploads are judged by their bytes (`shared.preprocess.inspect_image` sniffs magic bytes and parses
the header only), never by the filename or the declared content type: the content type only
decides how the body is read (raw or multipart).

Budget of `check_image`, whatever the upload holds: at most 50 ms of CPU and 64 MB of memory
(`tests/test_bounded_inspection.py` holds it to that on crafted decode bombs). Inspection never
walks frames or pixel data; structures past the caps of `shared.image_structure.check_structure` are
refused `422 image_too_complex` before PIL parses them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from flask import Request, g
from werkzeug.datastructures import FileStorage
from werkzeug.wsgi import LimitedStream

from api.errors import ApiError, payload_too_large
from shared.config import Settings
from shared.errors import ImageError
from shared.jobs import DEFAULT_LANE, LANES
from shared.preprocess import ImageInfo, inspect_image

RAW_IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
        "application/octet-stream",
    }
)
MULTIPART = "multipart/form-data"
IMAGE_FIELD = "image"
# Room for the multipart envelope (boundaries, part headers, small extra fields) on top of one
# MAX_UPLOAD_BYTES image, so a multipart upload of a maximal image is not refused for its wrapper.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Werkzeug refuses multipart bodies with more parts than this with 413; the image count limit
# (422 too_many_images) is checked on what is left, so the parser never builds thousands of parts.
_EXTRA_FORM_PARTS = 16

_INT_RE = re.compile(r"^\+?[0-9]{1,6}$")
_DEADLINE_RE = re.compile(r"^\+?[0-9]{1,12}$")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Upload:
    data: bytes
    info: ImageInfo


def parse_top_k(request: Request, settings: Settings) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return settings.default_top_k
    raw = raw.strip()
    if not _INT_RE.match(raw) or not 1 <= int(raw) <= settings.max_top_k:
        raise ApiError(
            f"top_k must be an integer from 1 to {settings.max_top_k}, got {raw[:40]!r}",
            code="invalid_top_k",
            http_status=422,
        )
    return int(raw)


def parse_priority(request: Request) -> str:
    """The lane of `priority=high|low` (default high); anything else is 422 `invalid_priority`."""
    raw = request.args.get("priority")
    if raw is None:
        return DEFAULT_LANE
    if raw not in LANES:
        raise ApiError(
            f"priority must be one of {', '.join(LANES)}, got {raw[:40]!r}",
            code="invalid_priority",
            http_status=422,
        )
    return raw


def parse_deadline_ms(request: Request, settings: Settings) -> int | None:
    """`deadline_ms`: a whole number of milliseconds from 1 to MAX_DEADLINE_MS, or absent."""
    raw = request.args.get("deadline_ms")
    if raw is None:
        return None
    value = raw.strip()
    if not _DEADLINE_RE.match(value) or not 1 <= int(value) <= settings.max_deadline_ms:
        raise ApiError(
            f"deadline_ms must be an integer number of milliseconds from 1 to {settings.max_deadline_ms}, "
            f"got {raw[:40]!r}",
            code="invalid_deadline",
            http_status=422,
        )
    return int(value)


def parse_wait(request: Request, settings: Settings) -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    # float() accepts "nan" and "inf": neither is a number of seconds.
    if not math.isfinite(wait) or not 0 <= wait <= settings.max_wait_seconds:
        raise ApiError(
            f"wait must be a number of seconds from 0 to {settings.max_wait_seconds:g}, got {raw[:40]!r}",
            code="invalid_wait",
            http_status=422,
        )
    return wait


def parse_idempotency_key(request: Request) -> str | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY_RE.match(raw):
        raise ApiError(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            code="invalid_idempotency_key",
            http_status=400,
        )
    return raw


def limit_body(request: Request, limit: int, too_large: ApiError | None = None) -> ApiError:
    """Refuse a body over `limit` from its Content-Length, before reading a byte of it, with
    `too_large` (default: a 413 that states `limit`); returns that error, for the caller's own checks.

    Bodies without a Content-Length (chunked) are bounded while they are read: Werkzeug stops
    reading at `request.max_content_length`. It stops *silently* when the body ends exactly there,
    so the cap is `limit + 1` and reaching it means "too large" (see `body_overflowed`).
    """
    error = too_large or payload_too_large(limit)
    g.inferq_body_too_large = error  # also the answer to Werkzeug's own 413 (api.errors)
    if request.content_length is not None and request.content_length > limit:
        raise error
    request.max_content_length = limit + 1
    return error


def body_overflowed(request: Request) -> bool:
    """After reading a body without Content-Length: did it reach the `limit + 1` cap?"""
    stream = request.stream
    return request.content_length is None and isinstance(stream, LimitedStream) and stream.is_exhausted


def check_image(data: bytes, settings: Settings, index: int | None = None) -> Upload:
    """Sniff and header-parse one upload; ImageErrors keep their code and status (400/413/415)."""
    where = "" if index is None else f"image {index}: "
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            f"{where}the image is {len(data):,} bytes; at most {settings.max_upload_bytes:,} are accepted",
            code="payload_too_large",
            http_status=413,
            extra=_index(index),
        )
    try:
        info = inspect_image(data, settings.max_image_pixels)
    except ImageError as exc:
        raise ApiError(
            f"{where}{exc.message}", code=exc.code, http_status=exc.http_status, extra=_index(index)
        ) from exc
    return Upload(data=data, info=info)


def read_job_upload(request: Request, settings: Settings) -> Upload:
    """The one image of `POST /v1/jobs`: a raw body, or the `image` file of a multipart form."""
    mimetype = request.mimetype
    if mimetype == MULTIPART:
        # The envelope's allowance is ours, not a limit the client needs to know: the message
        # states MAX_UPLOAD_BYTES.
        too_large = limit_body(
            request,
            settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
            payload_too_large(settings.max_upload_bytes, per_image=True),
        )
        request.max_form_parts = 1 + _EXTRA_FORM_PARTS
        files = _image_files(request, too_large)
        if len(files) > 1:
            raise ApiError(
                f"send exactly one {IMAGE_FIELD!r} file (got {len(files)}); use POST /v1/batches for several",
                code="too_many_images",
                http_status=400,
            )
        return check_image(_read_file(files[0], settings), settings)
    if mimetype in RAW_IMAGE_TYPES:
        limit_body(request, settings.max_upload_bytes)
        data = request.get_data(cache=False)
        if len(data) > settings.max_upload_bytes:  # a chunked body that reached the cap
            raise payload_too_large(settings.max_upload_bytes)
        return check_image(data, settings)
    # The body is never read, so its size does not matter here.
    raise _unsupported_media_type(mimetype, raw_allowed=True)


def read_batch_uploads(request: Request, settings: Settings) -> list[Upload]:
    """Every `image` file of a `POST /v1/batches` form, ALL validated before the caller enqueues any."""
    if request.mimetype != MULTIPART:
        raise _unsupported_media_type(request.mimetype, raw_allowed=False)
    too_large = limit_body(request, settings.max_batch_upload_bytes)
    request.max_form_parts = settings.max_batch_submit + _EXTRA_FORM_PARTS
    files = _image_files(request, too_large)
    if len(files) > settings.max_batch_submit:
        raise ApiError(
            f"a batch holds at most {settings.max_batch_submit} images, got {len(files)}",
            code="too_many_images",
            http_status=422,
        )
    return [check_image(_read_file(f, settings, i), settings, i) for i, f in enumerate(files)]


def _image_files(request: Request, too_large: ApiError) -> list[FileStorage]:
    files = request.files.getlist(IMAGE_FIELD)
    # A chunked form cut off at the cap parses as a truncated form (Werkzeug drops the parse
    # error): report the size, not whatever the truncation looks like.
    if body_overflowed(request):
        raise too_large
    if files:
        return files
    if IMAGE_FIELD in request.form:
        hint = f"the {IMAGE_FIELD!r} field is a text field; send it as a file part (with a filename)"
    else:
        hint = f"the form has no {IMAGE_FIELD!r} file field"
    raise ApiError(f"missing image: {hint}", code="missing_image", http_status=400)


def _read_file(file: FileStorage, settings: Settings, index: int | None = None) -> bytes:
    # Read at most one byte past the limit: enough to know it is too large, without holding more.
    data = file.stream.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        where = "" if index is None else f"image {index}: "
        raise ApiError(
            f"{where}the image is larger than {settings.max_upload_bytes:,} bytes",
            code="payload_too_large",
            http_status=413,
            extra=_index(index),
        )
    return data


def _unsupported_media_type(mimetype: str, *, raw_allowed: bool) -> ApiError:
    accepted = f"{MULTIPART} with {IMAGE_FIELD!r} file fields"
    if raw_allowed:
        raw_types = ", ".join(sorted(RAW_IMAGE_TYPES))
        accepted = f"a raw image body ({raw_types}) or {MULTIPART} with an {IMAGE_FIELD!r} file"
    got = mimetype[:100] or "no Content-Type"
    return ApiError(
        f"unsupported Content-Type {got!r}; send {accepted}", code="unsupported_media_type", http_status=415
    )


def _index(index: int | None) -> dict[str, int]:
    # Batch errors say which file failed, as an extra field of the error object.
    return {} if index is None else {"index": index}
