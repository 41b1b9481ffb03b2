"""Typed views of the api's JSON (api/openapi.py). Plain frozen dataclasses: the client package needs
nothing but `requests`, and parsing is lenient (a missing field is None) so a server that adds
fields, or omits an optional one, does not break old clients. `JobResult.raw` keeps the reply."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

JobStatus = Literal["queued", "started", "finished", "failed", "canceled", "expired"]
# `expired`: the job's deadline passed before a worker started it (servers with `deadline_ms`).
TERMINAL_STATUSES: frozenset[str] = frozenset({"finished", "failed", "canceled", "expired"})


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model that served a job: `file` (e.g. `model.onnx`) and `sha256` (of that file) tell
    workers of one model on different backends apart."""

    name: str | None
    sha256: str | None
    backend: str | None = None
    backend_version: str | None = None
    file: str | None = None


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Timings:
    queue_ms: float | None = None
    inference_ms: float | None = None
    batch_size: int | None = None


@dataclass(frozen=True, slots=True)
class JobRef:
    """What a submission returns. `url` is absolute (the api sends a path relative to its root)."""

    id: str
    url: str
    status: str


@dataclass(frozen=True, slots=True)
class Readiness:
    """`GET /readyz`: ready means Redis answers, at least one worker has its model loaded and the
    workers are not suspended. `status` is the answer's own: `ready`, `suspended` (`rq suspend` holds
    the workers: `rq resume` frees them) or `unavailable`."""

    ready: bool
    reason: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    id: str
    # A str, not JobStatus: a future server may add statuses, and parsing must not reject them.
    status: str
    predictions: tuple[Prediction, ...] = ()
    model: ModelInfo | None = None
    error: JobError | None = None
    timings: Timings = field(default_factory=Timings)
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    @property
    def top1(self) -> Prediction | None:
        return self.predictions[0] if self.predictions else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobResult:
        result = data.get("result") or {}
        model = result.get("model")
        error = data.get("error")
        timings = data.get("timings") or {}
        return cls(
            id=str(data.get("id", "")),
            status=str(data.get("status", "")),
            predictions=tuple(
                Prediction(label=str(p["label"]), index=int(p["index"]), score=float(p["score"]))
                for p in result.get("predictions") or ()
            ),
            model=ModelInfo(**{f.name: model.get(f.name) for f in fields(ModelInfo)}) if model else None,
            error=JobError(code=str(error.get("code", "")), message=str(error.get("message", "")))
            if error
            else None,
            timings=Timings(
                queue_ms=timings.get("queue_ms"),
                inference_ms=timings.get("inference_ms"),
                batch_size=timings.get("batch_size"),
            ),
            created_at=_parse_time(data.get("created_at")),
            started_at=_parse_time(data.get("started_at")),
            ended_at=_parse_time(data.get("ended_at")),
            raw=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """The job in the api's own JSON shape (what the CLI's jsonl prints)."""
        return {
            "id": self.id,
            "status": self.status,
            "predictions": [{"label": p.label, "index": p.index, "score": p.score} for p in self.predictions],
            "model": asdict(self.model) if self.model else None,
            "error": {"code": self.error.code, "message": self.error.message} if self.error else None,
            "timings": {
                "queue_ms": self.timings.queue_ms,
                "inference_ms": self.timings.inference_ms,
                "batch_size": self.timings.batch_size,
            },
            "created_at": _format_time(self.created_at),
            "started_at": _format_time(self.started_at),
            "ended_at": _format_time(self.ended_at),
        }


def _parse_time(value: Any) -> datetime | None:
    # The api sends ISO 8601 with a trailing "Z"; fromisoformat accepts that from Python 3.11.
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _format_time(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
