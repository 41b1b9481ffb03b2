"""Long-polls without a Redis connection each: one completion listener per api process.

Workers (and the api's own cancel) PUBLISH the id of every job they end on `shared.keys.ended_channel()`
in the same transaction as the end itself. Each api process holds ONE subscription to that channel, in
a background greenlet (a thread outside gevent), and wakes the local waiters of that id. A waiting
request therefore holds an Event, not a Redis connection: the Redis client count does not grow with
waiters, and a waiter returns as soon as the message arrives.

Jobs can also end without a publish (RQ's registry cleanup failing an abandoned job, a job expiring,
a message lost while the subscription reconnects). The safety net: every LONG_POLL_RECHECK_SECONDS the
listener reads the RQ status of every waited id in one pipelined round trip and wakes the waiters of
jobs that ended or vanished. No waiter sleeps its full wait on a job that ended.

No lost wake-up: a request registers its waiter BEFORE it reads the job; a publish from then on wakes
it, and an end before then is seen by the read.

Per-key fairness (LONG_POLLS_PER_KEY over all api processes) is `api.fairness.LongPollSlot`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from redis import Redis
from rq.job import Job

from shared.keys import ended_channel

log = logging.getLogger(__name__)

# RQ statuses after which a job will not change again by itself (what a waiter waits for).
_ENDED = {b"finished", b"failed", b"canceled", b"stopped"}
_RECHECK_CHUNK = 1000
_RECONNECT_BACKOFF_SECONDS = 0.5


class CompletionListener:
    def __init__(self, redis: Redis, recheck_seconds: float) -> None:
        self._redis = redis
        self._recheck_seconds = recheck_seconds
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process the listener runs in (a fork needs its own)

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    @contextmanager
    def waiter(self, job_id: str) -> Iterator[threading.Event]:
        """Register a waiter for `job_id`; the Event is set when the job ends."""
        self._ensure_running()
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[job_id]

    def _ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="inferq-completion-listener", daemon=True).start()

    def _wake(self, job_ids: list[str]) -> None:
        with self._lock:
            events = [e for job_id in job_ids for e in self._waiters.get(job_id, ())]
        for event in events:
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
                        self._wake([message["data"].decode()])
            except Exception as exc:  # Redis down or restarting: retry; waiters time out meanwhile
                log.warning("completion listener: %s; resubscribing", exc)
                time.sleep(_RECONNECT_BACKOFF_SECONDS)
            finally:
                with suppress(Exception):
                    pubsub.close()

    def _recheck(self) -> None:
        with self._lock:
            ids = list(self._waiters)
        for start in range(0, len(ids), _RECHECK_CHUNK):
            chunk = ids[start : start + _RECHECK_CHUNK]
            with self._redis.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hget(Job.key_for(job_id), "status")
                statuses = pipe.execute()
            self._wake([i for i, s in zip(chunk, statuses, strict=True) if s is None or s in _ENDED])
