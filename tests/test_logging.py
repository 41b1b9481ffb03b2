"""Structured logs (shared.logging_setup): JSON lines that follow one job from submit to result,
readable text on demand, secrets redacted in both."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from api import create_app
from shared.config import Settings
from shared.logging_setup import configure_logging, log_context, set_log_context
from tests.worker_stub import STUB_SHA256, png, stub_worker, truncated_png

SECRET_KEY = "sk-live-0123456789abcdefSECRET"
REDIS_PASSWORD = "hunter2-redis-password"


@pytest.fixture
def capture() -> Iterator[Any]:
    """`capture(fmt)` routes this process's logs to a buffer in LOG_FORMAT `fmt`; all restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level, saved_context = list(root.handlers), root.level, log_context()
    buffers: list[io.StringIO] = []

    def start(log_format: str, service: str = "worker", level: str = "INFO") -> io.StringIO:
        buffers.append(io.StringIO())
        configure_logging(service=service, log_format=log_format, level=level, stream=buffers[-1])
        return buffers[-1]

    yield start
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    set_log_context(**{key: None for key in log_context()})
    set_log_context(**saved_context)


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _submit_and_run(capture: Any, redis_url: str, level: str) -> tuple[list[dict[str, Any]], str, str]:
    buffer = capture("json", level=level)
    settings = Settings(redis_url=redis_url, max_batch_size=4, log_level=level)
    client = create_app(settings).test_client()
    good = client.post("/v1/jobs?top_k=3&priority=low", data=png(80), headers={"Content-Type": "image/png"})
    bad = client.post("/v1/jobs", data=truncated_png(), headers={"Content-Type": "image/png"})
    assert good.status_code == bad.status_code == 202
    good_id, bad_id = good.get_json()["id"], bad.get_json()["id"]
    worker = stub_worker(settings, name="log-worker")
    worker.work(burst=True)
    return json_lines(buffer), good_id, bad_id


def test_one_job_is_followed_from_submit_to_result(
    capture: Any, redis_url: str, redis_conn: redis.Redis
) -> None:
    lines, good_id, bad_id = _submit_and_run(capture, redis_url, "INFO")
    assert lines and all(  # every line is one JSON object
        {"ts", "level", "logger", "message", "pid", "service"} <= set(line) for line in lines
    )
    trail = [line for line in lines if good_id in (line.get("job_id"), *line.get("job_ids", ()))]
    submitted, ended = trail  # at INFO the job's end is told by the line of its batch
    assert submitted["message"] == "job submitted" and ended["message"].startswith("batch of")
    assert submitted["lane"] == "low" and submitted["top_k"] == 3 and submitted["bytes"] == len(png(80))
    job = Job.fetch(good_id, connection=redis_conn, serializer=JSONSerializer)
    assert ended["batch_id"] == job.meta["batch_id"]
    assert ended["worker"] == "log-worker" == job.worker_name
    assert ended["model_sha256"] == STUB_SHA256
    assert good_id not in ended["failed"]
    (failed_in,) = [line for line in lines if bad_id in line.get("job_ids", ())]
    assert failed_in["failed"][bad_id] == "corrupt_image"
    assert all(line["worker"] == "log-worker" for line in lines if line["message"].startswith("batch of"))


def test_each_job_end_is_its_own_line_at_debug(capture: Any, redis_url: str, redis_conn: redis.Redis) -> None:
    lines, good_id, bad_id = _submit_and_run(capture, redis_url, "DEBUG")
    (ended,) = [line for line in lines if line.get("job_id") == good_id and line["message"] == "job ended"]
    job = Job.fetch(good_id, connection=redis_conn, serializer=JSONSerializer)
    assert ended["batch_id"] == job.meta["batch_id"] and ended["level"] == "DEBUG"
    assert ended["worker"] == "log-worker" == job.worker_name
    assert ended["model_sha256"] == STUB_SHA256
    assert ended["status"] == "finished" and ended["code"] is None and ended["queue"] == "inferq-low"
    assert ended["batch_size"] >= 1 and ended["attempt"] == 1
    assert {"queue_ms", "preprocess_ms", "inference_ms"} <= set(ended)
    (failed,) = [line for line in lines if line.get("job_id") == bad_id and line["message"] == "job ended"]
    assert failed["status"] == "failed" and failed["code"] == "corrupt_image"
    # The batch line names the batch its jobs point to.
    batch_lines = [line for line in lines if line["message"].startswith("batch of")]
    assert ended["batch_id"] in {line["batch_id"] for line in batch_lines}


def test_secrets_are_redacted_in_json_lines(capture: Any) -> None:
    buffer = capture("json", service="api")
    log = logging.getLogger("inferq.test")
    url = f"redis://:{REDIS_PASSWORD}@10.0.0.5:6379/0"
    log.warning("auth header %s via %s", f"Bearer {SECRET_KEY}", url)
    log.info("extra fields too", extra={"header": f"Authorization: {SECRET_KEY}", "urls": [url]})
    try:
        raise RuntimeError(f"request headers {{'Authorization': 'Bearer {SECRET_KEY}'}} via {url}")
    except RuntimeError:
        log.exception("boom")
    text = buffer.getvalue()
    assert SECRET_KEY not in text and REDIS_PASSWORD not in text, text
    first, second, third = json_lines(buffer)
    assert first["message"] == "auth header Bearer *** via redis://:***@10.0.0.5:6379/0"
    assert first["service"] == "api" and first["level"] == "WARNING"
    assert second["header"] == "Authorization: ***" and second["urls"] == ["redis://:***@10.0.0.5:6379/0"]
    assert "Traceback" in third["exc_info"] and "Bearer ***" in third["exc_info"]


def test_text_format_is_one_readable_line_with_the_fields(capture: Any) -> None:
    buffer = capture("text")
    set_log_context(worker="text-worker", model_sha256=STUB_SHA256)
    logging.getLogger("inferq.worker").info(
        "job ended", extra={"job_id": "abc", "status": "finished", "note": "two words"}
    )
    logging.getLogger("inferq.worker").info("plain %s", f"Bearer {SECRET_KEY}")
    first, second = buffer.getvalue().splitlines()
    assert " INFO [" in first and "inferq.worker: job ended" in first
    assert 'job_id=abc status=finished note="two words"' in first and "worker=text-worker" in first
    assert "model_sha256" not in first and "service" not in first  # the same on every line: noise
    assert second.endswith("plain Bearer *** worker=text-worker")
    with pytest.raises(ValueError):
        configure_logging(service="x", log_format="yaml", level="INFO", stream=io.StringIO())


def test_rq_loggers_reach_the_one_handler(capture: Any) -> None:
    rq_logger = logging.getLogger("rq.worker")
    stray = logging.StreamHandler(io.StringIO())
    rq_logger.addHandler(stray)  # what `rq worker-pool`'s supervisor leaves its forked workers
    try:
        buffer = capture("json")
        assert stray not in rq_logger.handlers
        rq_logger.info("Worker %s: started", "w1")
        assert json_lines(buffer)[-1]["message"] == "Worker w1: started"
    finally:
        rq_logger.removeHandler(stray)
