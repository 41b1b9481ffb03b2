"""The OpenAPI document against the api, as `schemathesis run` tests a service: every phase (the
document's examples; coverage of each parameter's boundaries and of the methods a path does not
list; fuzzing with valid and invalid data; stateful sequences that follow each submitted job's
`Location` to its read and cancel) and every check schemathesis has. Among them `unsupported_method`
(ST204: a method the document does not list is 405 with `Allow`) and `allow_header_conformance`
(ST205: `OPTIONS` advertises exactly the documented methods). In-process (WSGI) on a real Redis,
with a bounded number of examples; the run must end with no failure and no error."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import schemathesis
from flask import Flask
from hypothesis import strategies as st
from PIL import Image
from rq import Worker
from rq.serializers import JSONSerializer
from schemathesis import engine
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.engine import Status, events

from api import create_app
from api.validation import RAW_IMAGE_TYPES
from shared.config import Settings

EXAMPLES = 25
PHASES = ["examples", "coverage", "fuzzing", "stateful"]
JOB_PATHS = {"/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"}


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


@pytest.fixture
def app(redis_url: str) -> Iterator[Flask]:
    # A registered worker, so /readyz is ready as under `make up` (its 503 is not a server error).
    worker = Worker(["inferq"], connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    worker.register_birth()
    # No worker takes the jobs, so a long-poll on a submitted one lasts its whole `wait`: a short
    # MAX_WAIT_SECONDS (the document's bound on `wait`) keeps the run to seconds.
    settings = Settings(
        redis_url=redis_url, max_queue_depth=0, submit_rate_limit="100000/second", max_wait_seconds=1.0
    )
    yield create_app(settings)
    worker.register_death()


def _schema(app: Flask) -> Any:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    schema.config.phases.update(phases=PHASES)
    schema.config.generation.update(max_examples=EXAMPLES)
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


@dataclass
class Run:
    """What one schemathesis run did: its failures and errors, and what it exercised."""

    failures: list[str] = field(default_factory=list)
    phases: set[str] = field(default_factory=set)  # phases with at least one scenario not skipped
    checks: set[str] = field(default_factory=set)
    options_paths: set[str] = field(default_factory=set)  # paths an OPTIONS request was sent to


def run_schemathesis(schema: Any) -> Run:
    run = Run()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record_scenario(run, event)
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"[{event.phase}] {event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            run.failures.extend(
                f"[after the run] {failure.title}: {failure.message}" for failure in event.failures
            )
    return run


def _record_scenario(run: Run, event: events.ScenarioFinished) -> None:
    phase = event.phase.value
    if event.status != Status.SKIP:
        run.phases.add(phase)
    for case_id, checks in event.recorder.checks.items():
        case = event.recorder.cases[case_id].value
        if case.method == "OPTIONS":
            run.options_paths.add(case.operation.path)
        for check in checks:
            run.checks.add(check.name)
            if check.status == Status.FAILURE:
                failure = check.failure_info.failure if check.failure_info else None
                title = failure.title if failure else "failed"
                message = " ".join(failure.message.split())[:400] if failure else ""
                run.failures.append(
                    f"[{phase}] {check.name}: {case.method} {case.formatted_path}: {title}. {message}"
                )


def test_schemathesis_finds_no_failure_in_any_phase_with_every_check(app: Flask) -> None:
    schema = _schema(app)
    run = run_schemathesis(schema)
    assert not run.failures, f"seed {schema.config.seed}:\n" + "\n".join(sorted(set(run.failures)))
    # The whole run, not a vacuous pass. (The document has no examples of its own: the examples
    # phase has nothing to send.)
    assert run.phases == {"coverage", "fuzzing", "stateful"}
    load_all_checks()
    assert run.checks == set(CHECKS.get_all_names())
    # ST205 judged the `Allow` of both job paths: their OPTIONS requests were sent.
    assert run.options_paths >= JOB_PATHS
