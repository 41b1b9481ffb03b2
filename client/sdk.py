"""`Client`: the inferq HTTP api (api/openapi.py) as typed Python calls, over one `requests.Session`.

Retries: 429 and 502/503/504 (and connection failures) are retried up to `max_retries` times,
honouring `Retry-After` (else capped, jittered backoff). A submission always carries an
`Idempotency-Key` (a fresh uuid4 unless the caller gives one), so retrying a POST whose reply was
lost can never queue the same image twice.

One request: `classify` asks the api to answer its submit with the ended job (`Prefer: wait`,
RFC 7240), so a job that ends within the wait costs one HTTP exchange; otherwise (a longer job, a
server that ignores the preference) it long-polls as after a plain submit. `prefer_wait=False`
sends a plain submit and long-polls always.

Failed jobs: `classify` raises `JobFailed` (the full JobResult is on `.result`), so its return
value is always a finished job with predictions. `get`/`wait` return jobs in any status; check
`.ok` / `.terminal`. `classify_many` yields, per input, a finished JobResult or a ClientError.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from client import __version__
from client.errors import (
    AuthenticationError,
    ClientError,
    Conflict,
    FileError,
    Gone,
    InvalidInput,
    JobFailed,
    JobTimeout,
    NotFound,
    RateLimited,
    ServerError,
    Unavailable,
)
from client.models import JobRef, JobResult, Readiness
from client.retry import backoff_delay, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
# The api refuses `?wait=` above MAX_WAIT_SECONDS (30 by default) with 422 invalid_wait.
MAX_LONG_POLL_SECONDS = 30.0
# Replies that mean "not now" rather than "no": the request may succeed if sent again later.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})

ImageInput = str | os.PathLike[str] | bytes
Outcome = JobResult | ClientError
_T = TypeVar("_T")
_R = TypeVar("_R")


class Client:
    """A client of one inferq service. Thread-safe for concurrent calls (as `classify_many` makes).

    url / api_key default to $INFERQ_URL / $INFERQ_API_KEY (then http://127.0.0.1:8000, no key);
    pass `api_key=""` to send no key even when the variable is set.
    timeout: seconds for one HTTP request (connect and read); a long-poll adds its wait to it.
    max_retries: retries of one request on 429/502/503/504 or a connection failure (0 = none).
    max_retry_wait: a `Retry-After` longer than this is not slept through: the error is raised.
    prefer_wait: `classify` submits with `Prefer: wait` (one request when the job ends within it).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        max_retry_wait: float = 60.0,
        pool_size: int = 16,
        session: requests.Session | None = None,
        prefer_wait: bool = True,
    ) -> None:
        base = (url or os.environ.get("INFERQ_URL") or DEFAULT_URL).strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"the inferq URL must start with http:// or https://, got {base!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.url = base
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.prefer_wait = prefer_wait
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._pool_size = 0
        self._pool_lock = threading.Lock()
        self._ensure_pool(pool_size)
        self._session.headers["User-Agent"] = f"inferq-client/{__version__}"
        self._session.headers["Accept"] = "application/json"
        key = os.environ.get("INFERQ_API_KEY") if api_key is None else api_key
        if key:
            self._session.headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"  # never the key

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    # --- the api ---------------------------------------------------------------------------------

    def submit(
        self,
        image: ImageInput,
        top_k: int = 5,
        idempotency_key: str | None = None,
        *,
        priority: str | None = None,
        deadline_ms: int | None = None,
    ) -> JobRef:
        """Queue one image (a path, or the bytes). Raises InvalidInput for bytes the api refuses
        (e.g. `unsupported_image_format`), FileError for a path that cannot be read.

        priority: the lane, `high` (the server's default) or `low` (still owed a share of every
        batch). deadline_ms: milliseconds from now within which a worker must START the job; if
        none can, it ends `expired` (error `deadline_expired`) without running. The api refuses
        values outside its range with InvalidInput (`invalid_priority`, `invalid_deadline`)."""
        return self._submit(image, top_k, idempotency_key, priority, deadline_ms, deadline=None)[0]

    def get(self, job_id: str, wait: float | None = None) -> JobResult:
        """The job now, or, with `wait` (seconds, at most the server's MAX_WAIT_SECONDS, 30 by
        default), as soon as it ends or when `wait` runs out, whichever is first."""
        return self._get(job_id, wait, deadline=None)

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Long-poll in slices of at most 30 s until the job ends or `timeout` passes; returns its
        last state, which is not terminal if it timed out (check `.terminal`)."""
        return self._wait(job_id, time.monotonic() + timeout)

    def classify(
        self,
        image: ImageInput,
        top_k: int = 5,
        timeout: float = 60.0,
        idempotency_key: str | None = None,
        *,
        priority: str | None = None,
        deadline_ms: int | None = None,
    ) -> JobResult:
        """Submit and wait: the finished job. Raises JobFailed if it ended otherwise (`expired`
        when `deadline_ms` passed before a worker started it), JobTimeout after `timeout` seconds
        (the job is left running: fetch it later by `.job_id`). `priority`, `deadline_ms`: as
        for `submit`."""
        deadline = time.monotonic() + timeout
        wait = math.floor(min(MAX_LONG_POLL_SECONDS, timeout)) if self.prefer_wait else 0
        ref, ended = self._submit(
            image, top_k, idempotency_key, priority, deadline_ms, deadline=deadline, wait=wait
        )
        result = ended if ended is not None and ended.terminal else self._wait(ref.id, deadline)
        if not result.terminal:
            raise JobTimeout(
                f"job {ref.id} is still {result.status} after {timeout:g} s", code="timeout", job_id=ref.id
            )
        if not result.ok:
            raise JobFailed(result)
        return result

    def classify_many(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        concurrency: int = 8,
        timeout: float = 120.0,
        ordered: bool = True,
        *,
        priority: str | None = None,
        deadline_ms: int | None = None,
    ) -> Iterator[tuple[ImageInput, Outcome]]:
        """Classify many images, at most `concurrency` in flight; yields `(image, outcome)` per input,
        where outcome is the finished JobResult or the ClientError of that image alone (JobFailed,
        InvalidInput, FileError, JobTimeout, ...). One bad input never stops the others.

        A generator: nothing is sent until it is iterated. `ordered=True` yields in input order,
        else as each one ends. `timeout` applies to each image, from its submission; `priority` and
        `deadline_ms` (as for `submit`) to each image's job.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._ensure_pool(concurrency)

        def one(image: ImageInput) -> Outcome:
            try:
                return self.classify(
                    image, top_k=top_k, timeout=timeout, priority=priority, deadline_ms=deadline_ms
                )
            except ClientError as exc:
                return exc
            except Exception as exc:  # a bug must not cost the other images their results
                error = ClientError(f"{type(exc).__name__}: {exc}", code="unexpected_error")
                error.__cause__ = exc
                return error

        return _bounded_map(one, images, concurrency, ordered)

    def cancel(self, job_id: str) -> JobResult:
        """Cancel a queued job; the job, now `canceled`. Conflict (409 `job_not_cancelable`) once
        a worker has taken it."""
        return _job_result(self._request("POST", f"{_job_path(job_id)}/cancel", idempotent=False))

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: the api process answers (Redis and workers are not checked)."""
        return _json_object(self._request("GET", "/healthz", retries=0))

    def ready(self) -> Readiness:
        """`GET /readyz`: not-ready (503) is an answer, not an error; Unavailable if unreachable."""
        response = self._request("GET", "/readyz", retries=0, accept=frozenset({503}))
        body = _json_or_empty(response)
        return Readiness(
            ready=response.status_code == 200, reason=body.get("reason"), status=body.get("status")
        )

    # --- internals -------------------------------------------------------------------------------

    def _submit(
        self,
        image: ImageInput,
        top_k: int,
        idempotency_key: str | None,
        priority: str | None,
        deadline_ms: int | None,
        deadline: float | None,
        wait: int = 0,
    ) -> tuple[JobRef, JobResult | None]:
        """The job's reference, and with `wait` (whole seconds, `Prefer: wait`) the ended job when
        the api answered with it (a 200)."""
        data = _read_image(image)
        headers = {
            # The api sniffs the bytes; the type only tells it this is a raw body, not a form.
            "Content-Type": "application/octet-stream",
            # Always sent (and the same on every retry): a retried POST replays, never duplicates.
            "Idempotency-Key": idempotency_key or f"inferq-client-{uuid.uuid4()}",
        }
        params: dict[str, str | int] = {"top_k": top_k}
        # Sent only when given: the server's defaults (the high lane, no deadline) are its own.
        if priority is not None:
            params["priority"] = priority
        if deadline_ms is not None:
            params["deadline_ms"] = deadline_ms
        if wait > 0:
            headers["Prefer"] = f"wait={wait}"
        response = self._request(
            "POST",
            "/v1/jobs",
            params=params,
            data=data,
            headers=headers,
            read_timeout=self.timeout + wait,  # the server holds the request up to `wait` seconds
            deadline=deadline,
        )
        body = _json_object(response)
        job_id = body.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ClientError(f"the reply names no job: {response.text[:200]!r}", code="bad_response")
        # The api's `url` is a path from its root; built from our base it also works behind a prefix.
        ref = JobRef(id=job_id, url=self.url + _job_path(job_id), status=str(body.get("status", "queued")))
        return ref, _job_result(response) if wait > 0 and response.status_code == 200 else None

    def _get(self, job_id: str, wait: float | None, deadline: float | None) -> JobResult:
        params: dict[str, str] = {}
        read_timeout = self.timeout
        if wait is not None and wait > 0:
            params["wait"] = f"{wait:.3f}"
            read_timeout += wait  # the server holds the request up to `wait` seconds
        response = self._request(
            "GET", _job_path(job_id), params=params, read_timeout=read_timeout, deadline=deadline
        )
        return _job_result(response)

    def _wait(self, job_id: str, deadline: float) -> JobResult:
        step = MAX_LONG_POLL_SECONDS
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            asked = min(step, remaining)
            started = time.monotonic()
            try:
                result = self._get(job_id, asked, deadline)
            except InvalidInput as exc:
                # A server configured with a shorter MAX_WAIT_SECONDS: ask for shorter slices.
                if exc.code == "invalid_wait" and step > 1:
                    step = max(1.0, step / 2)
                    continue
                raise
            remaining = deadline - time.monotonic()
            if result.terminal or remaining <= 0:
                return result
            # A reply well before the asked wait, job not ended (a proxy cutting long requests, a
            # server without long-poll): pause so the loop polls instead of spinning.
            if time.monotonic() - started < asked / 2:
                time.sleep(min(0.5, remaining))

    def _ensure_pool(self, size: int) -> None:
        # requests keeps 10 connections per host by default; more threads than that would open and
        # throw away a connection per request ("Connection pool is full"). A bigger adapter is
        # mounted for new requests; in-flight ones finish on the old one.
        with self._pool_lock:
            if size <= self._pool_size:
                return
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
            self._pool_size = size

    def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        retries: int | None = None,
        read_timeout: float | None = None,
        deadline: float | None = None,
        accept: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> requests.Response:
        """One api call with retries. Returns a 2xx (or `accept`ed) response, else raises ClientError.

        `idempotent=False` (a cancel): retried only when the server said "not now" (429) or the
        connection was never made, since a lost reply may hide a request that took effect.
        `deadline` (monotonic): no retry sleeps past it.
        """
        retries = self.max_retries if retries is None else retries
        timeout = (min(self.timeout, 10.0), read_timeout or self.timeout)
        attempt = 0
        while True:
            try:
                response = self._session.request(method, self.url + path, timeout=timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                error: ClientError = _connection_error(self.url, exc)
                retryable = idempotent or _never_sent(exc)
            except requests.RequestException as exc:  # invalid URL/header etc.: retrying cannot help
                raise ClientError(str(exc), code="invalid_request") from exc
            else:
                if response.status_code < 300 or response.status_code in accept:
                    return response
                error = _error_from_response(response)
                retryable = response.status_code == 429 or (
                    idempotent and response.status_code in _RETRY_STATUSES
                )
            if not retryable or attempt >= retries:
                raise error
            delay = backoff_delay(attempt, error.retry_after)
            if error.retry_after is not None and error.retry_after > self.max_retry_wait:
                raise error
            if deadline is not None and time.monotonic() + delay > deadline:
                raise error
            time.sleep(delay)
            attempt += 1


def _bounded_map(
    fn: Callable[[_T], _R], items: Iterable[_T], concurrency: int, ordered: bool
) -> Iterator[tuple[_T, _R]]:
    """`(item, fn(item))` for each item, with at most `concurrency` calls running and the input
    consumed lazily (a million paths never become a million futures at once)."""
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inferq-client")
    try:
        if ordered:
            # A little read-ahead so one slow image at the head does not idle the other threads.
            window: deque[tuple[_T, Future[_R]]] = deque()
            for item in source:
                window.append((item, pool.submit(fn, item)))
                if len(window) >= 2 * concurrency:
                    head, future = window.popleft()
                    yield head, future.result()
            while window:
                head, future = window.popleft()
                yield head, future.result()
        else:
            running: dict[Future[_R], _T] = {}
            exhausted = False
            while running or not exhausted:
                while not exhausted and len(running) < concurrency:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        running[pool.submit(fn, item)] = item  # type: ignore[arg-type]
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield running.pop(future), future.result()
    finally:
        # The caller stopped early (break, Ctrl-C): drop what has not started, and do not block
        # on what has (a long-poll or a Retry-After sleep): those threads end on their own.
        pool.shutdown(wait=False, cancel_futures=True)


_END: Any = object()


def _job_path(job_id: str) -> str:
    if not job_id:
        raise ValueError("a job id is required")
    # A job id is one path segment, and servers decode `%2F` back into `/` before routing: an id
    # with a slash would reach another route (`<id>/cancel`) or none, so it cannot name a job.
    if "/" in job_id or job_id in (".", ".."):
        raise NotFound(
            f"{job_id[:64]!r} cannot be a job id: an id is one path segment",
            code="job_not_found",
            job_id=job_id,
        )
    # Quoted: the rest of what a user typed stays inside the segment (`?`, `#`, `%`).
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _read_image(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise FileError(f"{path}: no such file", code="file_not_found") from exc
    except IsADirectoryError as exc:
        raise FileError(f"{path}: is a directory", code="is_a_directory") from exc
    except PermissionError as exc:
        raise FileError(f"{path}: permission denied", code="permission_denied") from exc
    except OSError as exc:
        raise FileError(f"{path}: {exc.strerror or exc}", code="file_unreadable") from exc


def _json_object(response: requests.Response) -> dict[str, Any]:
    """A success reply's JSON object; anything else (a proxy's HTML page) is a ClientError."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ClientError(
            f"HTTP {response.status_code} reply is not a JSON object: {response.text[:200]!r}",
            code="bad_response",
            status=response.status_code,
        )
    return body


def _job_result(response: requests.Response) -> JobResult:
    body = _json_object(response)
    try:
        return JobResult.from_json(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise ClientError(f"malformed job in the reply: {exc!r}", code="bad_response") from exc


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


_ERROR_CLASSES: dict[int, type[ClientError]] = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFound,
    409: Conflict,
    410: Gone,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def _error_from_response(response: requests.Response) -> ClientError:
    status = response.status_code
    error = _json_or_empty(response).get("error")
    if isinstance(error, dict) and "code" in error:
        code, message = str(error["code"]), str(error.get("message", ""))
    else:
        # Not the api's JSON: a proxy or load balancer answered. Keep a short excerpt.
        code = f"http_{status}"
        message = f"{response.reason or ''} {response.text[:200]!r}".strip()
    cls = _ERROR_CLASSES.get(status) or (InvalidInput if status < 500 else ServerError)
    return cls(
        message, code=code, status=status, retry_after=parse_retry_after(response.headers.get("Retry-After"))
    )


def _connection_error(url: str, exc: requests.RequestException) -> Unavailable:
    if isinstance(exc, requests.ReadTimeout):
        return Unavailable(f"no reply from {url} in time", code="read_timeout")
    # requests' text nests urllib3's ("HTTPConnectionPool(...): Max retries exceeded ... [Errno 111]
    # Connection refused"): keep the OS reason, which is what a user can act on.
    reason = re.search(r"\[Errno -?\d+\][^)'\"]*", str(exc))
    detail = reason.group(0).strip() if reason else type(exc).__name__
    return Unavailable(f"cannot connect to {url}: {detail}", code="connection_error")


def _never_sent(exc: requests.RequestException) -> bool:
    """The connection was never established, so the server cannot have acted on the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


__all__ = ["DEFAULT_URL", "Client", "ImageInput", "Outcome"]
