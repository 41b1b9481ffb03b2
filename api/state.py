"""What one api process holds: settings, Redis clients, the completion listener and the fairness
counters' client; never job state (any number of api processes may serve the same Redis, and any of
them may answer for any job)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from redis import Redis
from rq import Queue

from api.auth import KeyRing
from api.fairness import Fairness
from api.long_poll import CompletionListener
from shared.config import Settings

EXTENSION_KEY = "inferq"


@dataclass(frozen=True)
class ApiState:
    settings: Settings
    # A bounded pool (API_REDIS_CONNECTIONS): under gevent thousands of requests could otherwise open
    # a connection each at the same moment.
    redis: Redis
    # Readiness and metrics scrapes: no retries, short timeouts (probers have deadlines).
    redis_probe: Redis
    # One Queue per lane per process (RQ caches the server version on it, else one INFO per enqueue),
    # by lane name, highest priority first.
    queues: dict[str, Queue]
    # The hashes of the tenants' API keys (empty: keys disabled) and of the operators' keys.
    keyring: KeyRing
    operator_keyring: KeyRing
    listener: CompletionListener
    fairness: Fairness

    @property
    def queue_list(self) -> list[Queue]:
        return list(self.queues.values())


def current_state() -> ApiState:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
