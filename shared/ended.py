"""The message that announces a job's end on `shared.keys.ended_channel()`, published in the same
transaction as the end: `{"id": <job id>, "view": <the body GET /v1/jobs/<id> gives now>}` in JSON.
A long-poll woken by it answers with that view and reads nothing back from Redis (`api.long_poll`).

The view never names the job's owner: a waiter checked the owner when it first read the job (or
created the job itself) before it waited. A bare job id (what workers published before the view was
carried, e.g. during a rolling upgrade) or a view that is not an object still wakes the waiters, who
then read the job; a message with no id is ignored (the listener's periodic re-check finds the end)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from shared.keys import ended_channel


class Ended(NamedTuple):
    job_id: str
    view: dict[str, Any] | None  # None: the waiters read the job


def publish_ended(pipe: Any, job_id: str, view: dict[str, Any] | None) -> None:
    """Queue the end's message on `pipe` (the end's own transaction)."""
    message = job_id if view is None else json.dumps({"id": job_id, "view": view}, separators=(",", ":"))
    pipe.publish(ended_channel(), message)


def parse_ended(data: bytes | str) -> Ended | None:
    """The end announced by `data`; None when it names no job."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    if not text.startswith("{"):
        return Ended(text, None) if text else None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    job_id = message.get("id")
    if not isinstance(job_id, str) or not job_id:
        return None
    view = message.get("view")
    # A view for another job (or a malformed one) is not an answer: the waiters read the job.
    if not isinstance(view, dict) or view.get("id") != job_id:
        view = None
    return Ended(job_id, view)
