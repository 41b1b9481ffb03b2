"""The start-up check of Redis' memory policy, run by the api and by every worker.

inferq keeps everything in Redis, and what carries a TTL there is exactly what must not disappear
early: the uploaded images and, once ended, the jobs and their results. Under any `maxmemory-policy`
but `noeviction`, a full Redis deletes keys to make room (`volatile-*` picks among keys with a TTL:
inferq's images first), and a job whose image or hash is evicted is lost. Under `noeviction` a full
Redis refuses writes instead, which inferq turns into 429/503 answers and drains by itself.

The policy is read from `INFO memory` (managed services often disable CONFIG). REDIS_EVICTION_CHECK
says whether a bad policy refuses the start (`refuse`, the default) or is logged as an error (`warn`).
A Redis that cannot be reached or read is logged and not judged: the processes start and reconnect.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import Settings

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"
# MAX_QUEUED_BYTES above this share of maxmemory leaves too little for results, job hashes and
# Redis itself: Redis would fill before the budget answers 429.
_BUDGET_SHARE_WARNING = 0.75


class EvictionPolicyError(RuntimeError):
    """Redis may evict inferq's keys and REDIS_EVICTION_CHECK is `refuse`."""


def check_eviction_policy(conn: Redis, settings: Settings, *, service: str) -> str | None:
    """The server's `maxmemory-policy` (None when it could not be read).

    Raises EvictionPolicyError when it can evict keys and REDIS_EVICTION_CHECK=refuse."""
    try:
        info = conn.info("memory")
    except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
        log.warning("%s: cannot read Redis' maxmemory-policy (%s); not checked", service, exc)
        return None
    policy = str(info.get("maxmemory_policy", ""))
    maxmemory = int(info.get("maxmemory") or 0)
    if policy and policy != SAFE_POLICY:
        message = (
            f"Redis' maxmemory-policy is {policy!r}: when Redis is full it evicts keys, and inferq's "
            f"images and jobs (which carry TTLs) go first, so jobs are lost silently. Set "
            f"`maxmemory-policy {SAFE_POLICY}` on the server (then a full Redis refuses new work with "
            f"429/503 and drains), or REDIS_EVICTION_CHECK=warn to run anyway."
        )
        if settings.redis_eviction_check == "refuse":
            raise EvictionPolicyError(f"{service} refuses to start: {message}")
        log.error("%s: %s", service, message)
    if maxmemory == 0:
        log.warning(
            "%s: Redis has no maxmemory: it grows until the machine runs out of memory; set one "
            "(MAX_QUEUED_BYTES, %d bytes, should stay well under it)",
            service,
            settings.max_queued_bytes,
        )
    elif settings.max_queued_bytes > maxmemory * _BUDGET_SHARE_WARNING:
        log.warning(
            "%s: MAX_QUEUED_BYTES (%d) is more than %d %% of Redis' maxmemory (%d): Redis may fill "
            "(503 redis_full) before the budget answers 429",
            service,
            settings.max_queued_bytes,
            int(_BUDGET_SHARE_WARNING * 100),
            maxmemory,
        )
    return policy or None
