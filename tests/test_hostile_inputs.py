"""Hostile and bad input, against the real service: one Valkey, the gunicorn api and one batch worker
(`python -m worker`, TORCH_THREADS=1) for the module.

Every case names its expected outcome: a 4xx with its error code at the api, a job that ends failed
(or expired) with its code, or a job that finishes (with the right label where the picture is a known
photo). After the battery the service must still be whole: /readyz 200, the same worker process
alive, and a good image still classified correctly.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from PIL import Image
from rq import Worker
from rq.serializers import JSONSerializer

from bench import decode_bombs
from launch.redis_server import EmbeddedRedis
from tests.conftest import PHOTO_LABELS
from tests.factories import png_declaring
from tests.service import free_port, http_ok, service_env, start_api, start_worker, stop, wait_until

pytestmark = pytest.mark.slow

MAX_UPLOAD_BYTES = 3 * 1024 * 1024
ESPRESSO = PHOTO_LABELS["coffee.png"]
ANY_LABEL: set[str] = set()  # finished, whatever the label
TERMINAL = ("finished", "failed", "canceled", "expired")


# --- the stack ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("hostile")
    with EmbeddedRedis(logs / "redis") as server:
        # Small batches, so a burst keeps the worker busy for a while (the deadline case).
        env = service_env(server.url, MAX_BATCH_SIZE=4, MAX_UPLOAD_BYTES=MAX_UPLOAD_BYTES, WEB_CONCURRENCY=1)
        port = free_port()
        api = start_api(env, port, log=logs / "api.log")
        worker = start_worker(env, log=logs / "worker.log")
        conn = redis.Redis.from_url(server.url)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_ok(base + "/readyz"), 180, 0.5, "api ready with a worker")
            yield {"base": base, "conn": conn, "worker": worker, "pid": worker.pid, "logs": logs}
        finally:
            stop(worker)
            stop(api)
            conn.close()


# --- inputs -----------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A small real JPEG with its SOF frame header patched to declare `width` x `height`."""
    i = 2
    while i < len(jpeg):
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF0/1/2: length, precision, height, width
            return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]
        i += 2 + length
    raise ValueError("no SOF marker")


def photo(photos: dict[str, bytes], name: str = "coffee.png") -> Image.Image:
    return Image.open(io.BytesIO(photos[name])).convert("RGB")


def animated_gif(photos: dict[str, bytes]) -> bytes:
    first, second = photo(photos), photo(photos, "camera.png").resize(photo(photos).size)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def multipage_tiff(photos: dict[str, bytes]) -> bytes:
    return encode(photo(photos), "TIFF", save_all=True, append_images=[photo(photos, "chelsea.png")])


def sixteen_bit_png(photos: dict[str, bytes]) -> bytes:
    gray = np.asarray(photo(photos).convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(gray)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def palette_with_transparency(photos: dict[str, bytes]) -> bytes:
    image = photo(photos).quantize(colors=255)  # palette entries 0-254; 255 is free
    image.paste(255, (0, 0, 40, 40))  # a transparent corner
    assert image.mode == "P"
    return encode(image, "PNG", transparency=255)


def exif_rotated(photos: dict[str, bytes]) -> bytes:
    """The coffee photo stored turned a quarter to the left, with EXIF orientation 6 ("rotate 90° CW
    to display"): only a decoder that applies the orientation sees the upright cup."""
    stored = photo(photos).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def multipart_file(data: bytes, filename: str, field_name: str = "image") -> dict[str, Any]:
    return {"files": {field_name: (filename, data, "application/octet-stream")}}


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect/></svg>'


# --- cases -----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One request and its expected outcome.

    `body(photos)` returns the request kwargs for `requests`; `expect` is `(http_status, code)` for a
    refusal, or `("finished", labels)` / `("failed", code)` / `("expired", code)` for a job."""

    name: str
    body: Callable[[dict[str, bytes]], dict[str, Any]]
    expect: tuple[Any, Any]
    query: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/jobs"
    method: str = "POST"


def raw(make: Callable[[dict[str, bytes]], bytes], content_type: str = "application/octet-stream") -> Any:
    return lambda photos: {"data": make(photos), "headers": {"Content-Type": content_type}}


def coffee(photos: dict[str, bytes]) -> bytes:
    return photos["coffee.png"]


def rocket(photos: dict[str, bytes]) -> bytes:
    return photos["rocket.jpg"]


SUBMIT_CASES = [
    # --- refused at the door, nothing queued
    Case("zero-bytes", raw(lambda p: b""), (400, "empty_image")),
    Case("text", raw(lambda p: b"hello, this is not an image\n" * 20), (415, "unsupported_image_format")),
    Case(
        "html",
        raw(lambda p: b"<!DOCTYPE html><html><body><img src=x></body></html>", "image/jpeg"),
        (415, "unsupported_image_format"),
    ),
    Case("svg", raw(lambda p: SVG, "image/png"), (415, "unsupported_image_format")),
    Case(
        "png-declaring-50000x50000",
        raw(lambda p: png_declaring(50_000, 50_000), "image/png"),
        (413, "image_too_large"),
    ),
    Case(
        "jpeg-bomb-small-file-huge-size",
        raw(lambda p: jpeg_declaring(p["rocket.jpg"], 60_000, 60_000)),
        (413, "image_too_large"),
    ),
    Case("png-broken-header", raw(lambda p: p["coffee.png"][:30], "image/png"), (400, "corrupt_image")),
    Case("gif-header-only", raw(lambda p: b"GIF89a\x00"), (400, "corrupt_image")),
    Case(
        "body-over-the-size-limit",
        raw(lambda p: b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD_BYTES),
        (413, "payload_too_large"),
    ),
    Case("wrong-content-type", raw(coffee, "text/plain"), (415, "unsupported_media_type")),
    Case("json-content-type", raw(coffee, "application/json"), (415, "unsupported_media_type")),
    Case(
        "multipart-without-the-field",
        lambda p: multipart_file(p["coffee.png"], "c.png", "file"),
        (400, "missing_image"),
    ),
    Case(
        "multipart-without-boundary",
        lambda p: {"data": p["coffee.png"], "headers": {"Content-Type": "multipart/form-data"}},
        (400, "missing_image"),
    ),
    Case(
        "multipart-two-images",
        lambda p: {"files": [("image", ("a.png", p["coffee.png"])), ("image", ("b.png", p["coffee.png"]))]},
        (400, "too_many_images"),
    ),
    Case("top_k-zero", raw(coffee), (422, "invalid_top_k"), {"top_k": "0"}),
    Case("top_k-21", raw(coffee), (422, "invalid_top_k"), {"top_k": "21"}),
    Case("top_k-negative", raw(coffee), (422, "invalid_top_k"), {"top_k": "-1"}),
    Case("top_k-not-a-number", raw(coffee), (422, "invalid_top_k"), {"top_k": "five"}),
    Case("top_k-huge", raw(coffee), (422, "invalid_top_k"), {"top_k": "9" * 40}),
    Case("top_k-nul", raw(coffee), (422, "invalid_top_k"), {"top_k": "1\x00"}),
    Case("priority-unknown", raw(coffee), (422, "invalid_priority"), {"priority": "urgent"}),
    Case("priority-empty", raw(coffee), (422, "invalid_priority"), {"priority": ""}),
    Case("deadline-zero", raw(coffee), (422, "invalid_deadline"), {"deadline_ms": "0"}),
    Case(
        "deadline-over-24h",
        raw(coffee),
        (422, "invalid_deadline"),
        {"deadline_ms": str(24 * 3600 * 1000 + 1)},
    ),
    Case("deadline-not-a-number", raw(coffee), (422, "invalid_deadline"), {"deadline_ms": "soon"}),
    Case(
        "idempotency-key-with-spaces",
        lambda p: {
            "data": p["coffee.png"],
            "headers": {"Content-Type": "image/png", "Idempotency-Key": "a b"},
        },
        (400, "invalid_idempotency_key"),
    ),
    # --- decode bombs (bench/decode_bombs.py): refused from their structure, in O(header)
    Case("bmp-rle8-40000x1000", raw(lambda p: decode_bombs.rle8_bmp()), (422, "image_too_complex")),
    Case(
        "png-200k-empty-text-chunks",
        raw(lambda p: decode_bombs.png_with_text_chunks(200_000)),
        (422, "image_too_complex"),
    ),
    Case(
        "tiff-300k-strips", raw(lambda p: decode_bombs.tiff_many_strips(300_000)), (422, "image_too_complex")
    ),
    Case(
        "webp-animated-10000x10000-canvas",
        raw(lambda p: decode_bombs.webp_huge_canvas()),
        (413, "image_too_large"),
    ),
    Case(
        "jpeg-progressive-5000-scans",
        raw(lambda p: decode_bombs.progressive_jpeg_scans(photo(p))),
        (422, "image_too_complex"),
    ),
    Case(
        "jpeg-100k-markers",
        raw(lambda p: decode_bombs.jpeg_many_markers(photo(p))),
        (422, "image_too_complex"),
    ),
    # --- decode bombs that are accepted: only the first frame/page is read, samples in bands
    Case("gif-50000-frames", raw(lambda p: decode_bombs.gif_frames()), ("finished", ANY_LABEL)),
    Case("tiff-5000-pages", raw(lambda p: decode_bombs.tiff_pages()), ("finished", ANY_LABEL)),
    Case(
        "tiff-40mpx-float32-deflate",
        raw(lambda p: decode_bombs.tiff_float_deflate()),
        ("finished", ANY_LABEL),
    ),
    # --- accepted, then the job fails in the worker with its reason
    Case(
        "truncated-jpeg-header-intact",
        raw(lambda p: p["rocket.jpg"][: len(p["rocket.jpg"]) // 2]),
        ("failed", "corrupt_image"),
    ),
    Case(
        "truncated-png-header-intact",
        raw(lambda p: p["coffee.png"][: len(p["coffee.png"]) // 3]),
        ("failed", "corrupt_image"),
    ),
    # --- accepted and classified
    Case("png-labelled-as-jpeg", raw(coffee, "image/jpeg"), ("finished", ESPRESSO)),
    Case("animated-gif-first-frame", raw(animated_gif), ("finished", ESPRESSO)),
    Case("multipage-tiff-first-page", raw(multipage_tiff), ("finished", ESPRESSO)),
    Case(
        "cmyk-jpeg",
        raw(lambda p: encode(photo(p).convert("CMYK"), "JPEG", quality=92)),
        ("finished", ESPRESSO),
    ),
    Case("16-bit-png", raw(sixteen_bit_png), ("finished", ESPRESSO)),
    Case("grayscale-png", raw(lambda p: encode(photo(p).convert("L"), "PNG")), ("finished", ESPRESSO)),
    Case("palette-with-transparency", raw(palette_with_transparency), ("finished", ESPRESSO)),
    Case("exif-rotated-jpeg", raw(exif_rotated), ("finished", ESPRESSO)),
    Case("webp", raw(lambda p: encode(photo(p), "WEBP", quality=90)), ("finished", ESPRESSO)),
    Case("bmp", raw(lambda p: encode(photo(p), "BMP")), ("finished", ESPRESSO)),
    Case(
        "one-pixel",
        raw(lambda p: encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")),
        ("finished", ANY_LABEL),
    ),
    Case(
        "10000x3",
        raw(lambda p: encode(Image.new("RGB", (10_000, 3), (20, 90, 200)), "PNG")),
        ("finished", ANY_LABEL),
    ),
    Case("3x10000", raw(lambda p: encode(Image.new("L", (3, 10_000), 128), "PNG")), ("finished", ANY_LABEL)),
    Case(
        "unicode-filename-multipart",
        lambda p: multipart_file(p["coffee.png"], "café ☕ 咖啡 \u202e.png"),
        ("finished", ESPRESSO),
    ),
    Case(
        "path-filename-multipart",
        lambda p: multipart_file(p["rocket.jpg"], "../../etc/passwd\x00.jpg"),
        ("finished", PHOTO_LABELS["rocket.jpg"]),
    ),
    Case("top_k-max", raw(coffee), ("finished", ESPRESSO), {"top_k": "20"}),
    Case("priority-low", raw(coffee), ("finished", ESPRESSO), {"priority": "low"}),
]

BAD_IDS = {
    "unknown-uuid": "0b7e3a4c-9d2f-4c1e-8a6b-5f4e3d2c1b0a",
    "dot-dot": "../../etc/passwd",
    "encoded-dot-dot": "..%2f..%2fetc%2fpasswd",
    "redis-key": "rq:queue:inferq",
    "glob": "*",
    "uppercase-uuid": "0B7E3A4C-9D2F-4C1E-8A6B-5F4E3D2C1B0A",
    "uuid-with-suffix": "0b7e3a4c-9d2f-4c1e-8a6b-5f4e3d2c1b0a/../x",
    "very-long": "a" * 4000,
    "nul": "%00",
}


def submit_case(base: str, case: Case, photos: dict[str, bytes]) -> requests.Response:
    return requests.request(case.method, base + case.path, params=case.query, timeout=30, **case.body(photos))


def wait_job(base: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": 20}, timeout=40).json()
        if body["status"] in TERMINAL:
            return body
    raise TimeoutError(job_id)


def top1(body: dict[str, Any]) -> str:
    return str(body["result"]["predictions"][0]["label"])


# --- the battery -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SUBMIT_CASES, ids=[c.name for c in SUBMIT_CASES])
def test_submission(stack: dict[str, Any], photo_bytes: dict[str, bytes], case: Case) -> None:
    base, conn = stack["base"], stack["conn"]
    waiting_before = conn.llen("rq:queue:inferq") + conn.llen("rq:queue:inferq-low")
    response = submit_case(base, case, photo_bytes)
    outcome, detail = case.expect

    if isinstance(outcome, int):  # refused at the api
        assert response.status_code == outcome, response.text
        assert response.json()["error"]["code"] == detail
        assert conn.llen("rq:queue:inferq") + conn.llen("rq:queue:inferq-low") <= waiting_before
        return

    assert response.status_code == 202, response.text
    body = wait_job(base, response.json()["id"])
    assert body["status"] == outcome, body
    if outcome == "finished":
        assert body["error"] is None
        predictions = body["result"]["predictions"]
        assert len(predictions) == int(case.query.get("top_k", 5))
        assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
        if detail:
            assert top1(body) in detail, body["result"]["predictions"][:3]
    else:
        assert body["result"] is None
        assert body["error"]["code"] == detail, body


@pytest.mark.parametrize("job_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("POST", "/cancel")])
def test_ids_that_name_no_job(stack: dict[str, Any], method: str, suffix: str, job_id: str) -> None:
    response = requests.request(method, f"{stack['base']}/v1/jobs/{job_id}{suffix}", timeout=10)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] in {"job_not_found", "not_found"}


def test_an_impossible_deadline_expires(stack: dict[str, Any], photo_bytes: dict[str, bytes]) -> None:
    """deadline_ms=1 behind a backlog: the worker reaches it too late and ends it `expired`
    without running it; the jobs around it are not affected."""
    base = stack["base"]
    files = [("image", (f"{i}.png", photo_bytes["coffee.png"])) for i in range(12)]
    burst = requests.post(f"{base}/v1/batches", files=files, timeout=30)
    assert burst.status_code == 202, burst.text
    late = requests.post(
        f"{base}/v1/jobs",
        params={"deadline_ms": "1"},
        data=photo_bytes["coffee.png"],
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert late.status_code == 202, late.text
    body = wait_job(base, late.json()["id"])
    assert body["status"] == "expired", body
    assert body["error"]["code"] == "deadline_expired"
    assert body["result"] is None and body["started_at"] is None
    for job in burst.json()["jobs"]:
        assert wait_job(base, job["id"])["status"] == "finished"


def test_the_service_is_still_whole_afterwards(stack: dict[str, Any], photo_bytes: dict[str, bytes]) -> None:
    base, conn, worker = stack["base"], stack["conn"], stack["worker"]
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    assert worker.poll() is None, (stack["logs"] / "worker.log").read_text()[-3000:]
    workers = Worker.all(connection=conn, serializer=JSONSerializer)
    assert [w.pid for w in workers] == [stack["pid"]]  # the same process, never restarted
    response = requests.post(
        f"{base}/v1/jobs", data=photo_bytes["coffee.png"], headers={"Content-Type": "image/png"}, timeout=30
    )
    body = wait_job(base, response.json()["id"])
    assert body["status"] == "finished" and top1(body) in ESPRESSO
    assert "Traceback" not in (stack["logs"] / "api.log").read_text()
