"""The api's gunicorn worker: gevent, plus deadlines on reading a request.

Why gevent: every open connection of a gthread worker holds an OS thread, so a few dozen idle, slow or
long-polling clients exhaust it; here a connection is a greenlet and a file descriptor, and one process
holds API_WORKER_CONNECTIONS of them. gunicorn monkeypatches the standard library in each worker before
the app is imported, so redis-py's sockets and `threading` cooperate with the event loop.

A greenlet per connection would still let a client hold one forever by never finishing its request, so
reading a request has two deadlines:
- Headers: a new connection has API_HEADER_TIMEOUT seconds to send complete request headers, else it
  gets `408` and is closed. (Between two requests of a keep-alive connection the idle limit is
  API_KEEPALIVE, closed silently, as gunicorn does.)
- Body: the body must arrive at API_BODY_MIN_RATE bytes/s on average, after API_BODY_GRACE_SECONDS;
  a slower one fails the read with `408` (the app answers it as JSON) and the connection is closed.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import gevent
from gevent.local import local
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from shared.config import get_settings

# Body reads are cut into chunks of at most this size, and of at most one second's worth of the
# minimum rate, each with its own deadline: a large read cannot outlive the rate it is owed.
_CHUNK = 16 * 1024


class RequestHeaderTimeout(Exception):
    """The client did not finish its request headers in time."""


_408 = json.dumps(
    {"error": {"code": "request_timeout", "message": "the request headers did not arrive in time"}}
).encode()
_408_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_408)).encode() + b"\r\n\r\n" + _408
)

# Per connection (each connection runs in a greenlet of its own): has it completed a request yet?
_connection = local()


class InferqGeventWorker(GeventWorker):
    def timeout_ctx(self) -> gevent.Timeout:
        # gunicorn wraps the reading of each request's headers in this.
        if getattr(_connection, "served", False):
            return gevent.Timeout(self.cfg.keepalive, False)  # idle keep-alive: close quietly
        return gevent.Timeout(get_settings().api_header_timeout, RequestHeaderTimeout)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        _connection.served = True
        return super().handle_request(listener_name, req, sock, addr)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, RequestHeaderTimeout):
            with contextlib.suppress(OSError):  # a client that is gone needs no answer
                client.sendall(_408_RESPONSE)
            return
        super().handle_error(req, client, addr, exc)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        settings = get_settings()
        self.wsgi = MinRateBody(self.wsgi, settings.api_body_min_rate, settings.api_body_grace_seconds)


class MinRateBody:
    """WSGI middleware: `wsgi.input` reads fail with 408 once the body falls behind the minimum rate."""

    def __init__(self, app: Any, min_rate: float, grace: float) -> None:
        self.app = app
        self.min_rate = min_rate
        self.grace = grace

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        stream = environ.get("wsgi.input")
        if stream is not None:
            environ["wsgi.input"] = _MinRateInput(stream, self.min_rate, self.grace)
        return self.app(environ, start_response)


class _MinRateInput:
    def __init__(self, inner: Any, min_rate: float, grace: float) -> None:
        self._inner = inner
        self._chunk = max(1, min(_CHUNK, int(min_rate)))
        self._rate = min_rate
        self._grace = grace
        # From the app's first read, not from the request's arrival: time the api spends before it
        # reads (its quota checks, a Redis outage's retries) is not the client's to make up.
        self._started: float | None = None
        self._got = 0

    def _timed(self, read: Any, size: int) -> bytes:
        if self._started is None:
            self._started = time.monotonic()
        # The deadline for having received `size` more bytes at the minimum rate.
        remaining = self._started + self._grace + (self._got + size) / self._rate - time.monotonic()
        if remaining <= 0:
            raise _too_slow()
        try:
            with gevent.Timeout(remaining):
                data: bytes = read(size)
        except gevent.Timeout:
            raise _too_slow() from None
        self._got += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._collect(self._inner.read, size, line=False)

    def readline(self, size: int | None = -1) -> bytes:
        return self._collect(self._inner.readline, size, line=True)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _collect(self, read: Any, size: int | None, *, line: bool) -> bytes:
        """`size` bytes (all with -1/None; up to the first newline with `line`), chunk by chunk."""
        parts = []
        want = -1 if size is None or size < 0 else size
        while want != 0:
            chunk = self._timed(read, self._chunk if want < 0 else min(want, self._chunk))
            if not chunk:
                break
            parts.append(chunk)
            if line and chunk.endswith(b"\n"):
                break
            if want > 0:
                want -= len(chunk)
        return b"".join(parts)


def _too_slow() -> RequestTimeout:
    error = RequestTimeout("the request body arrived too slowly")
    return error
