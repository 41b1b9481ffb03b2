"""How the api shows a job it reads: the body of `GET /v1/jobs/<id>` (built by `shared.job_view`, as
the end's message builds it), read from Redis in one round trip (`read_job`: the job hash, its latest
RQ result and whether its image is still there, together; `queue_job_read` puts the same reads on a
caller's pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from redis import Redis
from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.results import Result

from shared.job_view import client_status, view_of
from shared.jobs import SERIALIZER
from shared.keys import image_key

__all__ = ["client_status", "job_view", "parse_job_read", "queue_job_read", "read_job"]


def job_view(job: Job, result: Result | None = None) -> dict[str, Any]:
    """The body of `GET /v1/jobs/<id>`; `result` is the job's latest result when the caller has it."""
    status = client_status(job)
    if result is None and status in ("finished", "failed", "expired"):
        result = job.latest_result()
    successful = status == "finished" and result is not None and result.type == Result.Type.SUCCESSFUL
    return view_of(job, result.return_value if successful and result is not None else None)


class JobRead(NamedTuple):
    job: Job
    result: Result | None  # its latest RQ result
    image_present: bool  # its image is in Redis (a queued job without it lost it: shared.image_budget)


# Replies `queue_job_read` adds to a pipeline.
JOB_READ_REPLIES = 3


def queue_job_read(pipe: Pipeline, job_id: str) -> None:
    """Queue the reads of one job on `pipe`: its hash, its latest result, whether its image exists."""
    pipe.hgetall(Job.key_for(job_id))
    pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
    pipe.exists(image_key(job_id))


def parse_job_read(conn: Redis, job_id: str, replies: Sequence[Any]) -> JobRead | None:
    """The job of `queue_job_read`'s replies (RQ's public `Job.restore` and `Result.restore` rebuild
    it); None when the job does not exist."""
    raw, latest, image_present = replies
    if not raw:
        return None
    job = Job(job_id, connection=conn, serializer=SERIALIZER)
    try:
        job.restore(raw)
    except NoSuchJobError:
        return None
    result = None
    if latest:
        result_id, payload = latest[0]
        result = Result.restore(job_id, result_id.decode(), payload, connection=conn, serializer=SERIALIZER)
    return JobRead(job, result, bool(image_present))


def read_job(conn: Redis, job_id: str) -> JobRead | None:
    """The job, its latest result and whether its image exists, in one pipelined round trip; None
    when the job does not exist."""
    with conn.pipeline(transaction=False) as pipe:
        queue_job_read(pipe, job_id)
        return parse_job_read(conn, job_id, pipe.execute())
