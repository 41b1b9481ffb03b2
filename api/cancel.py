"""Cancel: a queued job is taken off its queue before any worker gets it, or not at all."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.utils import now, utcformat

from shared import image_budget
from shared.ended import publish_ended
from shared.job_view import view_of
from shared.jobs import SERIALIZER


def cancel(conn: Redis, job: Job) -> bool:
    """Cancel a queued job; False when it already started or ended. Wakes long-polls on it (a publish
    on the ended channel carrying the job's view, like a worker's end, heard by every api process's
    listener).

    The status alone cannot decide it: a worker takes a job by moving its id out of the queue list
    (BLMOVE/LMOVE) BEFORE marking it started, so a job may read "queued" while a worker holds it.
    Removing the id from the queue list is the atomic claim: LREM returns 1 only if no worker has
    taken it (and then none can); 0 means a worker won the race, so the job is not cancelable.
    """
    status = job.get_status(refresh=True)
    if status == JobStatus.QUEUED:
        if not conn.lrem(Queue(job.origin, connection=conn, serializer=SERIALIZER).key, 1, job.id):
            return False
    elif status not in (JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED):
        # Started, or ended. (Deferred/scheduled jobs sit in a registry no worker reads from.)
        return False
    # If this process dies right here the job is in no list and can no longer run, which is what the
    # client asked for; once its image expires, the image sweep ends it (shared.image_budget).
    with conn.pipeline() as pipe:
        job.cancel(pipeline=pipe)
        # RQ's cancel records no end time; the job's view shows when it ended like any other end.
        job.ended_at = now()
        pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
        image_budget.release(pipe, [job.id])  # deletes the image and un-counts its bytes
        job._status = JobStatus.CANCELED  # what the transaction writes: the view the end carries
        publish_ended(pipe, job.id, view_of(job))
        pipe.execute()
    return True
