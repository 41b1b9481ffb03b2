"""The one way inferq opens a Redis connection, so api, worker, launcher, bench and tests share it.

- `connect_checked(settings, ...)`: what a process calls once at start. A client with the policy
  below, after checking the server's version (`RedisVersionError`, with a clear message, when it is
  older than `MIN_REDIS_VERSION`).
- `redis_from_url(url)`: the same client without the check (tools, tests).
- `with_options(conn, ...)`: a client on the same server (same URL, TLS and unix-socket options)
  with some options changed; `connect_checked(..., base=conn)` puts the policy on a client someone
  else built (RQ's CLI hands the worker one).

Timeouts: `socket_timeout` bounds how long a client waits for a reply. For ordinary commands a few
seconds is plenty (they take well under a millisecond) and detects a hung or half-open server. A
blocking command keeps its reply back for its own server-side timeout; were that longer than the
connection's `socket_timeout`, redis-py would raise TimeoutError and *retry the command*, so the
wait would never complete. Rule: a blocking command's server-side timeout stays well below its
connection's `socket_timeout`. The only one inferq issues is the worker's idle BLMOVE (under a
second, `worker/feeder.py`); the api's long-polls do not block on Redis (one subscription per
process wakes them, `api/long_poll.py`). Note: an RQ `Worker` raises its connection's
socket_timeout to `worker_ttl - 5` in its constructor (`BaseWorker._set_connection`), whatever we
set here.

Retries: ConnectionError/TimeoutError (including "server still loading its AOF") are retried with
exponential backoff for a few seconds in all (`RETRY_BACKOFF_*`), enough to ride out a restart of
a local server, short enough that the api answers 503 promptly when Redis is really gone. A
retried command may run twice if the first reply was lost (e.g. LMOVE/INCR); inferq's bookkeeping
has to tolerate that, as it has to tolerate a worker dying between two commands anyway.

Responses stay bytes (`decode_responses=False`): RQ stores pickled/binary data and requires it.
The wire protocol is pinned to RESP2: redis-py 8 would otherwise negotiate RESP3, which RQ 2.12
has not been written against (raw `execute_command` replies change shape) and which turns on
push-based "maintenance notifications" we have no use for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from shared.config import Settings, get_settings

# BLMOVE (RQ's reliable dequeue, and the batch worker's grab) appeared in Redis 6.2.
MIN_REDIS_VERSION: tuple[int, int] = (6, 2)

SOCKET_CONNECT_TIMEOUT_SECONDS = 5.0
SOCKET_TIMEOUT_SECONDS = 10.0
# An idle pooled connection is PINGed before reuse after this long, so a connection the server
# (or a NAT/firewall) dropped is replaced before a real command fails on it.
HEALTH_CHECK_INTERVAL_SECONDS = 15
RETRIES = 5
RETRY_BACKOFF_BASE_SECONDS = 0.05  # waits 0.1, 0.2, 0.4, 0.8, 1.0 s
RETRY_BACKOFF_CAP_SECONDS = 1.0

T = TypeVar("T")

log = logging.getLogger(__name__)

_SCHEMES = ("redis://", "rediss://", "unix://")
_SECRET_QUERY_RE = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|secret|token)[^=&]*=)[^&]*")


# Connection kwargs a redis-py 8 pool adds by itself when it is built (RESP3 maintenance
# notifications, the original address and timeouts they restore): a new pool makes its own, and
# passing RESP3's on to a RESP2 pool is refused.
_POOL_MADE_KWARGS = frozenset(
    {
        "maint_notifications_pool_handler",
        "maint_notifications_config",
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
        "himport_registry",
    }
)


class RedisConfigError(RuntimeError):
    """No usable Redis URL (unset, wrong scheme, or options RQ cannot work with)."""


class RedisVersionError(RuntimeError):
    """The server is too old for inferq, or does not say which version it is."""


class _TransientRetry(Retry):
    """redis-py's Retry, minus the errors that no amount of waiting fixes.

    redis-py makes AuthenticationError/AuthorizationError subclasses of ConnectionError, so a plain
    Retry retries a wrong or missing password with backoff, and nested retries (command, then
    reconnect) multiply into many seconds before a NOAUTH surfaces. These fail at once instead.
    """

    PERMANENT: tuple[type[Exception], ...] = (AuthenticationError, AuthorizationError)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def transient(error: Exception) -> bool:
            if isinstance(error, self.PERMANENT):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, transient, with_failure_count)


def default_retry(retries: int = RETRIES) -> Retry:
    """Exponential backoff on ConnectionError/TimeoutError (BusyLoadingError included), not on
    authentication errors."""
    return _TransientRetry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_SECONDS, base=RETRY_BACKOFF_BASE_SECONDS),
        retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError),
    )


def policy_options(retries: int = RETRIES, *, unix_socket: bool = False) -> dict[str, Any]:
    """The connection options of inferq's policy (module docstring), as redis-py keyword arguments."""
    options: dict[str, Any] = {
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "health_check_interval": HEALTH_CHECK_INTERVAL_SECONDS,
        "retry": default_retry(retries),
        "decode_responses": False,
        "protocol": 2,
    }
    if not unix_socket:  # a TCP option: redis-py's unix-socket connection refuses it
        # TCP keepalive notices a peer that vanished without a FIN (redis-py's default is on; say so).
        options["socket_keepalive"] = True
    return options


def redis_from_url(
    url: str | None = None,
    *,
    client_name: str | None = None,
    retries: int = RETRIES,
    **overrides: Any,
) -> redis.Redis:
    """A client for `url` (default: `REDIS_URL`) with inferq's timeouts and retry policy.

    Works with redis://, rediss:// (TLS; `ssl_*` options may go in the query string) and unix://,
    with `user:password@` (ACL) or `:password@`. Options in the URL's query string take precedence
    over these defaults (redis-py's `from_url` semantics); `overrides` are passed to redis-py.
    Connecting is lazy: the first command opens the connection.
    """
    if url is None:
        url = get_settings().redis_url
    if not url:
        raise RedisConfigError(
            "no Redis URL: set REDIS_URL (e.g. redis://127.0.0.1:6379/0), or run through `make up`, "
            "which starts an embedded server and exports its URL"
        )
    if not url.startswith(_SCHEMES):
        raise RedisConfigError(f"Redis URL must start with redis://, rediss:// or unix://: {redact_url(url)}")

    options = policy_options(retries, unix_socket=url.startswith("unix://"))
    if client_name is not None:
        options["client_name"] = client_name
    options.update(overrides)
    try:
        conn = redis.Redis.from_url(url, **options)
    except ValueError as exc:  # malformed port, bad query option, ...
        raise RedisConfigError(f"invalid Redis URL {redact_url(url)}: {exc}") from exc
    if conn.connection_pool.connection_kwargs.get("decode_responses"):
        # A `?decode_responses=...` in the URL arrives as a (truthy) string and would break RQ.
        conn.close()
        raise RedisConfigError("decode_responses must stay off: RQ stores binary data in Redis")
    return conn


def redact_url(url: str | None) -> str:
    """`url` with its password (and secret-looking query values) replaced by `***`, for logs.

    A lone `user@` is hidden too: people write `redis://<password>@host` and redis-py would send
    it as the username. Never raises.
    """
    if url is None:
        return "<unset>"
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _password = userinfo.partition(":")
            userinfo = f"{user}:***" if has_password else "***"
            netloc = f"{userinfo}@{hostport}"
        query = _SECRET_QUERY_RE.sub(r"\1***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable url>"


def redis_version(conn: redis.Redis) -> tuple[int, ...]:
    """The server's Redis-compatible version from `INFO server`, e.g. (7, 2, 4).

    This is the field RQ itself reads to choose BLMOVE over BLPOP (`rq.utils.get_version`), so
    both agree. Valkey reports its Redis compatibility level here (Valkey 9.1 says 7.2.4) and its
    own version in `valkey_version`.
    """
    try:
        info = conn.info("server")
    except redis.ResponseError as exc:  # e.g. an ACL without +info
        raise RedisVersionError(
            f"cannot read the server version (INFO server refused: {exc}); RQ also needs INFO to use "
            "its reliable BLMOVE dequeue"
        ) from exc
    raw = info.get("redis_version")
    # redis-py turns INFO values that look numeric into numbers ("7.0" would arrive as 7.0).
    match = re.match(r"\d+(?:\.\d+)*", str(raw)) if raw is not None else None
    if match is None:
        raise RedisVersionError(f"the server reports no usable redis_version in INFO server: {raw!r}")
    parts = [int(p) for p in match.group(0).split(".")]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def check_redis_version(conn: redis.Redis, minimum: tuple[int, ...] = MIN_REDIS_VERSION) -> tuple[int, ...]:
    """The server's version; raises `RedisVersionError` when it is older than `minimum`."""
    version = redis_version(conn)
    if version < minimum:
        found = ".".join(map(str, version))
        needed = ".".join(map(str, minimum))
        raise RedisVersionError(
            f"Redis/Valkey {found} is too old: inferq needs >= {needed} (BLMOVE, RQ's reliable dequeue)"
        )
    return version


def with_options(
    conn: redis.Redis, pool_class: type[redis.ConnectionPool] | None = None, **overrides: Any
) -> redis.Redis:
    """A client with its own pool on the same server as `conn` (its URL's host, TLS and unix-socket
    options kept: the connection class is reused, and the pool's class unless `pool_class` is given,
    e.g. redis' BlockingConnectionPool with `max_connections`), some options changed."""
    pool = conn.connection_pool
    kept = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_MADE_KWARGS}
    kwargs = {**kept, **overrides}
    try:
        cls = pool_class or type(pool)
        return redis.Redis(connection_pool=cls(connection_class=pool.connection_class, **kwargs))
    except Exception:  # an exotic pool (sentinel, cluster): share the client, whose timeouts still hold
        log.warning("cannot copy the Redis connection pool of %r; sharing it", pool, exc_info=True)
        return conn


def connect_checked(
    settings: Settings,
    *,
    client_name: str,
    base: redis.Redis | None = None,
    require_reachable: bool = True,
) -> redis.Redis:
    """The client a process starts with: inferq's policy, and the server's version checked.

    The client is built from `settings.redis_url`, or, when that is unset and `base` is given, from
    `base`'s connection (e.g. the client RQ's CLI built from `--url`), with the policy on top.
    Raises `RedisConfigError` (no or bad URL) and `RedisVersionError` (server too old, or it hides
    its version). If the server cannot be reached: raises redis' ConnectionError, or with
    `require_reachable=False` (the api, whose /readyz reports Redis) returns the client unchecked.
    """
    if settings.redis_url or base is None:
        conn = redis_from_url(settings.redis_url, client_name=client_name)
    else:
        unix = issubclass(base.connection_pool.connection_class, redis.UnixDomainSocketConnection)
        conn = with_options(base, **policy_options(unix_socket=unix), client_name=client_name)
    try:
        check_redis_version(conn)
    except (RedisConnectionError, RedisTimeoutError):
        if require_reachable:
            conn.close()
            raise
    except RedisVersionError:
        conn.close()
        raise
    return conn
