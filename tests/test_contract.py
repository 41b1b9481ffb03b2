"""The OpenAPI document against the api, fuzzed by schemathesis (all its checks): every request the
document allows is accepted, every one it forbids is refused with a 4xx, no 5xx, responses match
their schemas. In-process (WSGI) on a real Redis, with a bounded number of examples; plus a short
stateful run that follows the document's links (submit, then read and cancel the job it made)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from rq import Worker
from rq.serializers import JSONSerializer
from schemathesis import GenerationMode

from api import create_app
from api.validation import RAW_IMAGE_TYPES
from shared.config import Settings

EXAMPLES = 25


def _images() -> list[bytes]:
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


# The document says a body is the bytes of an image of any supported format (sniffed): generate those.
_IMAGE_BYTES = st.sampled_from(_images())
for _mime in sorted(RAW_IMAGE_TYPES):
    schemathesis.openapi.media_type(_mime, _IMAGE_BYTES)
# The multipart `image` parts: `format: binary` strings (sent as file parts, with a filename).
schemathesis.openapi.format("binary", _IMAGE_BYTES)
SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]


@pytest.fixture
def app(redis_url: str) -> Iterator[Flask]:
    # A registered worker, so /readyz is ready as under `make up` (its 503 is not a server error).
    worker = Worker(["inferq"], connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    worker.register_birth()
    yield create_app(Settings(redis_url=redis_url, max_queue_depth=0, submit_rate_limit="100000/second"))
    worker.register_death()


def _schema(app: Flask) -> Any:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # Form fields the document does not name are ignored by the api, not part of its contract.
    schema.config.generation.update(allow_extra_parameters=False)
    # Schemathesis mines string constants from the app's source and mixes them into generated
    # values, `format: binary` image parts included; an image part that is the text "failed" is
    # not an image, and the document says so. Every check still runs.
    schema.config.analysis.constants.enabled = False
    # A malformed upload too big to parse is refused with 413 (documented): a rejection like 400.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_keeps_its_contract(app: Flask, mode: GenerationMode) -> None:
    schema = _schema(app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate()

        try:
            run()
        except Unsatisfiable:
            # Negative mode: an operation without inputs (`GET /healthz`) has nothing to get wrong.
            assert mode == GenerationMode.NEGATIVE and not _has_inputs(operation), operation.label


def _has_inputs(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or bool(list(operation.body))


def test_stateful_contract(app: Flask) -> None:
    machine = _schema(app).as_state_machine()
    machine.run(
        settings=settings(
            max_examples=EXAMPLES, stateful_step_count=6, deadline=None, suppress_health_check=SUPPRESS
        )
    )
