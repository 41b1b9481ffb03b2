"""Per-key fairness: what one API key (or, without keys, one client address) may take of the service.

- A submit rate with a burst (SUBMIT_RATE_LIMIT), counted in Redis with the sliding-window counter of
  the `limits` library (the engine of Flask-Limiter), so the limit holds across api processes. Its
  counters are `limits`' own (its script, its keys: `limits` reads them as if it had counted), but
  the script runs inside `Fairness.admit`, the one round trip a submission makes before its body is
  read, which also reads what the queue bounds count (and an idempotency claim).
- A share of MAX_QUEUE_DEPTH (QUEUE_SHARE_PER_KEY): each key's waiting jobs are a sorted set of ids
  (`shared.keys`-style `inferq:pending:<key>`, added in the submit's one script). Ids
  leave it lazily: only when the key is at its share are the set's jobs looked up and those no longer
  queued removed (at most once per second per key and process), so the common case costs one ZCARD.
- Concurrent long-polls per key (LONG_POLLS_PER_KEY), over all api processes: each waiting request
  holds a lease in the key's sorted set (`inferq:long-polls:<key>`, scored by when the lease lapses),
  taken in the same round trip as the request's first read of the job and given back in the same
  round trip as its last (`LongPollSlot`). A submit that prefers to wait for its job (`api.prefer`)
  holds one too: `Fairness.admit` reads the key's count of leases, and the lease is one of the
  writes of the submit's store script (no round trip of its own). A lease of a process that died
  lapses by itself, after the request's wait plus a margin.

Every refusal is a 429 with `Retry-After` and an error code naming the limit, decided from the headers
(key, Content-Length) before any of the body is read.

`Fairness.admit` runs `limits`' script text inside its own and builds `limits`' keys with the storage's
private key helpers: written for `limits` 5.8, checked at import, so an upgrade stops here.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import limits
from flask import request
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import RedisError
from rq.job import Job
from rq.results import Result

from api.auth import current_owner
from api.capacity import completion_rate, retry_after_seconds
from api.errors import ApiError
from shared.config import Settings
from shared.keys import PREFIX, image_key
from shared.recorded_writes import RecordedWrites

LIMITS_WRITTEN_FOR = "5.8."
if not limits.__version__.startswith(LIMITS_WRITTEN_FOR):
    raise ImportError(
        f"api.fairness runs the sliding-window script and key layout of limits {LIMITS_WRITTEN_FOR}x; "
        f"limits {limits.__version__} is installed: check RedisStorage.acquire_sliding_window_entry "
        "before changing the pin"
    )

log = logging.getLogger(__name__)

LIMITS_PREFIX = f"{PREFIX}limits"
# With the pid, names this process's long-poll leases apart from other processes' and machines'.
_PROCESS_TOKEN = uuid.uuid4().hex[:12]
_PRUNE_EVERY_SECONDS = 1.0


def client_key() -> str:
    """Whom a request counts against: its API key's owner id, or its client address without keys."""
    owner = current_owner()
    return f"key:{owner}" if owner is not None else f"addr:{request.remote_addr or '-'}"


def pending_key(client: str) -> str:
    return f"{PREFIX}pending:{client}"


def long_polls_key(client: str) -> str:
    return f"{PREFIX}long-polls:{client}"


class TooManyWaiters(Exception):
    """The key already holds its LONG_POLLS_PER_KEY concurrent long-polls."""


# A lease outlives its request's wait by this much (the reads around the wait, a slow client).
LONG_POLL_LEASE_MARGIN_SECONDS = 10.0
_lease_ids = itertools.count()


# A lease in a key's set unless the key already holds `cap` of them (leases that lapsed are dropped
# first): 1 taken, -1 refused. Shared by the scripts below.
_TAKE_LEASE = """
local function take_lease(leases, member, now, lease_end, cap, ttl)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= tonumber(cap) then
    return -1
  end
  redis.call('ZADD', leases, lease_end, member)
  redis.call('EXPIRE', leases, ttl)
  return 1
end
"""

# A long-poll's first read: the job hash, its latest result and whether its image exists (what
# `api.job_view.queue_job_read` reads), and a lease in the key's set only if the job has not ended
# (a request that answers at once needs none, and gives none back). One script: one round trip.
# KEYS: job hash, result stream, image, leases. ARGV: member, now, lease end, cap, set ttl.
# Returns {hash as a flat list, latest result entry or {}, image exists, 1 held / 0 none / -1 refused}.
_FIRST_READ = (
    _TAKE_LEASE
    + """
local raw = redis.call('HGETALL', KEYS[1])
local latest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local image = redis.call('EXISTS', KEYS[3])
local lease = 0
local status = redis.call('HGET', KEYS[1], 'status')
local ended = {finished = true, failed = true, canceled = true, stopped = true}
if status and not ended[status] then
  lease = take_lease(KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
end
return {raw, latest, image, lease}
"""
)


# A submission's round trip before its body is read: the key's submit rate, each limit in turn through
# `limits`' own acquire script (the text `RedisStorage.acquire_sliding_window_entry` runs, called here
# as a function of its KEYS and ARGV), then, if every limit admits it, what the queue bounds count
# (the key's waiting jobs, each lane's backlog), an idempotency claim and, for a submit that prefers
# to wait (api.prefer), the key's long-poll leases (those that lapsed dropped first, as `take_lease`
# does: the store script adds the submit's own lease only if this count is under the cap).
# KEYS: per limit, its previous and current window keys; the pending key; the lanes; [the claim key];
# [the leases key]. ARGV: number of limits; per limit: amount, expiry, cost; number of lanes; 1 if
# there is a claim key; now if there is a leases key, else ''.
# Returns {index of the limit that refused} or
# {0, waiting, claim value or nil, leases held or -1 (not asked), backlog per lane...}.
_ADMIT = (
    "local function acquire_sliding_window(KEYS, ARGV)\n"
    + RedisStorage.SCRIPT_ACQUIRE_SLIDING_WINDOW.decode()
    + """
end
local limits = tonumber(ARGV[1])
for i = 1, limits do
  local a = 3 * i - 1
  if not acquire_sliding_window({KEYS[2 * i - 1], KEYS[2 * i]}, {ARGV[a], ARGV[a + 1], ARGV[a + 2]}) then
    return {i}
  end
end
local k = 2 * limits + 1
local lanes = tonumber(ARGV[3 * limits + 2])
local claim = false
local last = k + lanes
if ARGV[3 * limits + 3] == '1' then
  last = last + 1
  claim = redis.call('GET', KEYS[last])
end
local leases = -1
local now = ARGV[3 * limits + 4]
if now and now ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[last + 1], '-inf', now)
  leases = redis.call('ZCARD', KEYS[last + 1])
end
local reply = {0, redis.call('ZCARD', KEYS[k]), claim, leases}
for j = 1, lanes do reply[4 + j] = redis.call('LLEN', KEYS[k + j]) end
return reply
"""
)


@dataclass(frozen=True)
class Admitted:
    """What `Fairness.admit` read, for the checks that follow it."""

    waiting: int  # the key's waiting jobs (ZCARD of `pending_key`)
    backlog: int  # jobs waiting in all lanes
    claim: bytes | None  # the idempotency claim's value (None: unclaimed, or none was asked)
    long_polls: int | None = None  # the key's long-poll leases held (None: not asked)


class LongPollSlot:
    """One long-poll's lease in its key's set (LONG_POLLS_PER_KEY over all api processes): taken by
    `first_read`, in the round trip of the request's first read and only if the job has not ended
    (or recorded by `record_take` among the store script's writes of a submit that waits for its
    new job, `api.prefer`, once `Fairness.admit` read the key under its cap);
    given back by `queue_release` on the pipeline of the request's last read, or by `release` (a
    round trip of its own) when there is none. A lease of a process that died lapses by itself."""

    def __init__(
        self, redis: Redis, script: Script, client: str, wait: float, cap: int, max_wait: float
    ) -> None:
        self._redis = redis
        self._script = script
        self._key = long_polls_key(client)
        self._member = f"{_PROCESS_TOKEN}:{os.getpid()}:{next(_lease_ids)}"
        self._wait = wait
        self._cap = cap
        self._max_wait = max_wait
        self._read = False
        self._held = False

    @property
    def first_read_done(self) -> bool:
        return self._read

    def _lease_args(self) -> list[Any]:
        now = time.time()
        return [
            self._member,
            now,
            now + self._wait + LONG_POLL_LEASE_MARGIN_SECONDS,
            self._cap,
            math.ceil(self._max_wait + LONG_POLL_LEASE_MARGIN_SECONDS),
        ]

    def first_read(self, job_id: str) -> list[Any]:
        """The replies `api.job_view.parse_job_read` takes, with the lease taken if the job has not
        ended; TooManyWaiters when the key already holds its cap."""
        raw, latest, image, lease = self._script(
            keys=[Job.key_for(job_id), Result.get_key(job_id), image_key(job_id), self._key],
            args=self._lease_args(),
        )
        self._read = True
        if lease == -1:
            raise TooManyWaiters(self._key)
        self._held = lease == 1
        # The shapes redis-py gives HGETALL and XREVRANGE (a script's replies are raw lists).
        return [
            dict(zip(raw[0::2], raw[1::2], strict=True)),
            [(entry_id, dict(zip(fields[0::2], fields[1::2], strict=True))) for entry_id, fields in latest],
            image,
        ]

    def record_take(self, writes: RecordedWrites) -> None:
        """Record the lease among a submit's writes (its job is new, there is nothing to read first):
        what `take_lease` writes, its cap already checked by `Fairness.admit`. `taken` once the
        submit's script has made them."""
        member, _, lease_end, _, ttl = self._lease_args()
        writes.zadd(self._key, {member: lease_end})
        writes.expire(self._key, ttl)

    def taken(self) -> None:
        """The writes of `record_take` were made: the request's next read is its last, and gives the
        lease back (`queue_release`)."""
        self._read = True
        self._held = True

    def queue_release(self, pipe: Pipeline) -> None:
        if self._held:
            pipe.zrem(self._key, self._member)
            self._held = False  # if that round trip fails, the lease lapses by itself

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self._redis.zrem(self._key, self._member)
        except RedisError as exc:  # it lapses by itself; the request's own answer matters more
            log.warning("could not give back a long-poll lease (it lapses by itself): %s", exc)


class Fairness:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._storage = RedisStorage(
            "redis://", connection_pool=redis.connection_pool, key_prefix=LIMITS_PREFIX
        )
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._submit_limits: list[RateLimitItem] = parse_many(settings.submit_rate_limit)
        self._pruned_at: dict[str, float] = {}
        self._first_read = redis.register_script(_FIRST_READ)
        self._admit = redis.register_script(_ADMIT)

    def long_poll_slot(self, client: str, wait: float) -> LongPollSlot:
        return LongPollSlot(
            self._redis,
            self._first_read,
            client,
            wait,
            self._settings.long_polls_per_key,
            self._settings.max_wait_seconds,
        )

    def admit(
        self,
        client: str,
        cost: int,
        lanes: Sequence[str],
        claim: str | None = None,
        *,
        long_polls: bool = False,
    ) -> Admitted:
        """Count `cost` submissions against `client`'s rate (429 `rate_limited` when a limit refuses:
        the limits before it have counted them, as `limits` does) and read, in the same round trip,
        what the queue bounds count over the lane keys `lanes`, the idempotency claim key `claim`
        and, if `long_polls` (a submit that prefers to wait), the key's long-poll leases held."""
        keys: list[str] = []
        args: list[Any] = [len(self._submit_limits)]
        for item in self._submit_limits:
            # The keys `RedisStorage.acquire_sliding_window_entry` builds for `limiter.hit`.
            name = item.key_for("submit", client)
            keys.append(self._storage.prefixed_key(self._storage._previous_window_key(name)))
            keys.append(self._storage.prefixed_key(self._storage._current_window_key(name)))
            args += [item.amount, item.get_expiry(), cost]
        keys += [pending_key(client), *lanes]
        args += [len(lanes), 1 if claim is not None else 0]
        if claim is not None:
            keys.append(claim)
        if long_polls:
            keys.append(long_polls_key(client))
            args.append(time.time())
        reply = self._admit(keys=keys, args=args)
        if int(reply[0]):
            item = self._submit_limits[int(reply[0]) - 1]
            reset_at = self._limiter.get_window_stats(item, "submit", client).reset_time
            retry = max(1, math.ceil(reset_at - time.time()))
            raise ApiError(
                f"too many submissions for this key: the limit is {item}; retry in {retry} s",
                code="rate_limited",
                http_status=429,
                headers={"Retry-After": str(retry)},
            )
        leases = int(reply[3])
        return Admitted(
            waiting=int(reply[1]),
            backlog=sum(int(n) for n in reply[4:]),
            claim=reply[2],
            long_polls=leases if leases >= 0 else None,
        )

    def declines_wait(self, admitted: Admitted) -> bool:
        """Whether a submit's `Prefer: wait` is declined: its key held LONG_POLLS_PER_KEY when
        `admit` read it."""
        return admitted.long_polls is None or admitted.long_polls >= self._settings.long_polls_per_key

    @property
    def share_limit(self) -> int:
        """Jobs one key may have waiting (0: no limit of its own: MAX_QUEUE_DEPTH=0, or a share of 1,
        which the queue bound itself enforces)."""
        depth = self._settings.max_queue_depth
        share = self._settings.queue_share_per_key
        return max(1, int(depth * share)) if depth and share < 1 else 0

    def check_queue_share(self, client: str, incoming: int, queues: list, waiting: int | None = None) -> None:
        """429 `key_queue_share` when `client` would have more than its share waiting. `waiting`: its
        count of waiting jobs when the caller read it (ZCARD of `pending_key`), else read here."""
        limit = self.share_limit
        if not limit:
            return
        key = pending_key(client)
        if waiting is None:
            waiting = int(self._redis.zcard(key))
        if waiting + incoming > limit:
            waiting = self._prune(key)
        if waiting + incoming <= limit:
            return
        rate = completion_rate(self._redis, queues, self._settings) * self._settings.queue_share_per_key
        retry = retry_after_seconds(waiting + incoming - limit, rate)
        raise ApiError(
            f"this key has {waiting} jobs waiting, its share of the queue is {limit}; retry in {retry} s",
            code="key_queue_share",
            http_status=429,
            headers={"Retry-After": str(retry)},
        )

    def note_pending(self, pipe: RecordedWrites | Pipeline | Redis, client: str, job_ids: list[str]) -> None:
        """Count `job_ids` against `client`'s share (recorded for the submit script, or queued on `pipe`)."""
        if not self.share_limit or not job_ids:
            return
        key = pending_key(client)
        now = time.time()
        pipe.zadd(key, dict.fromkeys(job_ids, now))
        # An entry can never outlive the longest a job may wait (IMAGE_TTL): the set cannot leak.
        pipe.expire(key, self._settings.image_ttl)

    def _prune(self, key: str) -> int:
        """Drop ids that are no longer waiting; the number left."""
        now = time.monotonic()
        if now - self._pruned_at.get(key, 0.0) < _PRUNE_EVERY_SECONDS:
            return int(self._redis.zcard(key))
        self._pruned_at[key] = now
        if len(self._pruned_at) > 10_000:  # a bounded memo, not a registry of every key ever seen
            self._pruned_at.clear()
        self._redis.zremrangebyscore(key, "-inf", time.time() - self._settings.image_ttl)
        ids = [i.decode() for i in self._redis.zrange(key, 0, -1)]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        gone = [i for i, status in zip(ids, statuses, strict=True) if status != b"queued"]
        if gone:
            self._redis.zrem(key, *gone)
        return len(ids) - len(gone)
