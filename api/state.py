"""What one api process holds: settings and Redis clients, never job state (any number of api
processes may serve the same Redis, and any of them may answer for any job)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from redis import Redis
from rq import Queue

from api.auth import KeyRing
from shared.config import Settings

EXTENSION_KEY = "inferq"


@dataclass(frozen=True)
class ApiState:
    settings: Settings
    redis: Redis
    # Long-polls (XREAD BLOCK up to MAX_WAIT_SECONDS) need a socket_timeout longer than the block:
    # see shared.redis_conn. Everything else uses `redis` and its short timeouts.
    redis_blocking: Redis
    # Readiness and metrics scrapes: no retries, short timeouts (probers have deadlines).
    redis_probe: Redis
    # One Queue per lane per process (RQ caches the server version on it, else one INFO per enqueue),
    # by lane name, highest priority first.
    queues: dict[str, Queue]
    # The hashes of the API keys (empty: keys disabled).
    keyring: KeyRing

    @property
    def queue(self) -> Queue:
        """The highest-priority (default) lane's queue."""
        return next(iter(self.queues.values()))

    @property
    def queue_list(self) -> list[Queue]:
        return list(self.queues.values())


def current_state() -> ApiState:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
