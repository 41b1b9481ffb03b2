"""Long-polls without a Redis connection each: one completion listener per api process.

Workers (and the api's own cancel) PUBLISH every job they end on `shared.keys.ended_channel()` in the
same transaction as the end itself: its id and its view, the body `GET /v1/jobs/<id>` gives at that end
(`shared.ended`). Each api process holds ONE subscription to that channel, in a background greenlet (a
thread outside gevent), and wakes the local waiters of that id, handing them the view. A waiting
request therefore holds an Event, not a Redis connection: the Redis client count does not grow with
waiters, and a waiter returns as soon as the message arrives, answering from the view without reading
the job back. Whoever waits has already seen the job's owner (its first read, or it created the job):
the view carries no owner.

Jobs can also end without a publish (RQ's registry cleanup failing an abandoned job, a job expiring,
a message lost while the subscription reconnects), and a message may carry no view (a bare id: from
a worker older than the view, or from the rarer ends that publish none, `shared.image_budget`'s end
of a job whose image expired and `worker.failed_elsewhere`; or a malformed view): such waiters wake
with no view and read the job.
The safety net: every LONG_POLL_RECHECK_SECONDS the
listener reads the RQ status of every waited id in one pipelined round trip and wakes the waiters of
jobs that ended or vanished. No waiter sleeps its full wait on a job that ended.

No lost wake-up: a request registers its waiter BEFORE it reads the job; a publish from then on wakes
it, and an end before then is seen by the read. A submit that waits for its new job (`api.prefer`)
registers its waiter before the enqueue runs, while the job does not exist yet: the re-check must not
take it for one that vanished, so such a waiter counts as vanishable only for re-checks that began
after the listener was told its job exists (`jobs_exist`).

Per-key fairness (LONG_POLLS_PER_KEY over all api processes) is `api.fairness.LongPollSlot`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from redis import Redis
from rq.job import Job

from shared.ended import parse_ended
from shared.keys import ended_channel

log = logging.getLogger(__name__)

# RQ statuses after which a job will not change again by itself (what a waiter waits for).
_ENDED = {b"finished", b"failed", b"canceled", b"stopped"}
_RECHECK_CHUNK = 1000
_RECONNECT_BACKOFF_SECONDS = 0.5


class Waiter(threading.Event):
    """Set when its job has ended (or vanished); `view`: the end's view when a message carried it
    (None: read the job)."""

    def __init__(self) -> None:
        super().__init__()
        self.view: dict[str, Any] | None = None


class CompletionListener:
    def __init__(self, redis: Redis, recheck_seconds: float) -> None:
        self._redis = redis
        self._recheck_seconds = recheck_seconds
        self._waiters: dict[str, set[Waiter]] = {}
        # Each waiter whose job is known to exist, with the re-check generation it was known from.
        self._exists_since: dict[Waiter, int] = {}
        self._generation = 0  # advanced by each re-check before it reads
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process the listener runs in (a fork needs its own)

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    @contextmanager
    def waiter(self, job_id: str, *, job_exists: bool = True) -> Iterator[Waiter]:
        """Register a waiter for `job_id`; the Event is set when the job ends (or vanishes).
        `job_exists=False`: the job is about to be enqueued; call `jobs_exist` once it has been."""
        self._ensure_running()
        event = Waiter()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
            if job_exists:
                self._exists_since[event] = self._generation
        try:
            yield event
        finally:
            with self._lock:
                self._exists_since.pop(event, None)
                events = self._waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[job_id]

    def jobs_exist(self, events: Iterable[Waiter]) -> None:
        """The jobs of these waiters (registered with `job_exists=False`) are enqueued now."""
        with self._lock:
            for event in events:
                self._exists_since[event] = self._generation

    def _ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="inferq-completion-listener", daemon=True).start()

    def _wake(
        self,
        job_ids: list[str],
        existing_before: int | None = None,
        view: dict[str, Any] | None = None,
    ) -> None:
        """Wake the waiters of `job_ids`; with `existing_before`, only those whose job was known to
        exist before that re-check generation (a job not there then has not vanished); `view`: the
        end's view (one job's)."""
        with self._lock:
            events = [
                e
                for job_id in job_ids
                for e in self._waiters.get(job_id, ())
                if existing_before is None or self._exists_since.get(e, existing_before) < existing_before
            ]
        for event in events:
            if view is not None and not event.is_set():
                event.view = view  # before `set`: a woken waiter sees it
            event.set()

    def _run(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(ended_channel())
                # Anything that ended while (re)subscribing was not heard: check everyone now.
                next_recheck = 0.0
                while True:
                    if time.monotonic() >= next_recheck:
                        self._recheck()
                        next_recheck = time.monotonic() + self._recheck_seconds
                    message = pubsub.get_message(timeout=max(0.0, next_recheck - time.monotonic()))
                    if message is not None and message.get("type") == "message":
                        end = parse_ended(message["data"])
                        if end is not None:
                            self._wake([end.job_id], view=end.view)
            except Exception as exc:  # Redis down or restarting: retry; waiters time out meanwhile
                log.warning("completion listener: %s; resubscribing", exc)
                time.sleep(_RECONNECT_BACKOFF_SECONDS)
            finally:
                with suppress(Exception):
                    pubsub.close()

    def _recheck(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            ids = list(self._waiters)
        for start in range(0, len(ids), _RECHECK_CHUNK):
            chunk = ids[start : start + _RECHECK_CHUNK]
            with self._redis.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hget(Job.key_for(job_id), "status")
                statuses = pipe.execute()
            self._wake([i for i, s in zip(chunk, statuses, strict=True) if s in _ENDED])
            vanished = [i for i, s in zip(chunk, statuses, strict=True) if s is None]
            self._wake(vanished, existing_before=generation)
