"""Bounded load generators: closed loop (N clients back to back) and open loop (Poisson arrivals).

Both drive a `target(i)` callable that performs request number `i` and returns a dict with at least
`ok` (bool); everything else it returns (e.g. the achieved `batch_size`) is kept per request. The
HTTP target for inferq is `InferqTarget` (one request, `Prefer: wait`, by default; or submit then
long-poll); tests drive fake targets.

Open loop without coordinated omission: the arrival times are drawn up front (seeded exponential
gaps), and each request's latency is measured from its SCHEDULED send time, not from when a
thread got round to sending it, so a slow server cannot slow the client down and hide its own
queueing. Requests that have not ended by the hard deadline count as lost (latency +inf), so they
push the high percentiles up instead of vanishing. Everything is bounded: the schedule has at most
`max_count` arrivals within `duration`, each request has its own timeout, and the run returns by
`duration + drain_timeout` whatever happens.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile

Target = Callable[[int], dict[str, Any]]


# --- schedule and statistics (pure) -----------------------------------------------------------------


def poisson_schedule(
    rate: float, duration: float, seed: int = 0, max_count: int | None = None
) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate`/s within `duration`."""
    if rate <= 0 or duration <= 0:
        return []
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration and (max_count is None or len(times) < max_count):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def latency_summary(latencies_ms: Sequence[float], lost: int = 0) -> dict[str, float]:
    """p50/p95/p99/max of latencies in ms; `lost` requests count as +inf (they did not end)."""
    values = list(latencies_ms) + [math.inf] * lost
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    finite = [v for v in values if math.isfinite(v)]
    return {
        "p50": _pct(values, 50),
        "p95": _pct(values, 95),
        "p99": _pct(values, 99),
        "max": max(values),
        "mean": sum(finite) / len(finite) if finite else math.nan,
    }


def _pct(values: Sequence[float], q: float) -> float:
    # Nearest-rank above the interpolation point once infinities are involved (inf - inf is nan).
    if any(math.isinf(v) for v in values):
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil((len(ordered) - 1) * q / 100))]
    return percentile(values, q)


# --- runners ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one load run measured. Times are seconds on `time.monotonic()` relative to the start."""

    offered_rate: float | None
    duration: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    lost: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # of ok requests
    send_lag_ms: list[float] = field(default_factory=list)  # actual send − scheduled send
    ends: list[float] = field(default_factory=list)  # completion times of ok requests
    extras: list[dict[str, Any]] = field(default_factory=list)  # what the target returned (ok ones)
    error_samples: list[str] = field(default_factory=list)
    # The window the rate is over: open loop, from the start until the schedule's end or the last
    # completion, whichever is later (a backlog drained after the schedule is not free capacity);
    # closed loop, the measured window after the warm-up.
    elapsed: float = 0.0

    @property
    def achieved_rate(self) -> float:
        window = self.elapsed or self.duration
        return self.ok / window if window > 0 else math.nan

    def record(self, ok: bool, out: dict[str, Any], error: str | None, latency_ms: float, end: float) -> None:
        """One finished request (caller holds the run's lock)."""
        if ok:
            self.ok += 1
            self.latencies_ms.append(latency_ms)
            self.ends.append(end)
            self.extras.append(out)
        else:
            self.errors += 1
            if error:
                self.error_samples.append(error)

    def summary(self) -> dict[str, Any]:
        lat = latency_summary(self.latencies_ms, self.lost + self.errors)
        sizes = [e["batch_size"] for e in self.extras if e.get("batch_size")]
        return {
            "offered_rate": self.offered_rate,
            "achieved_rate": self.achieved_rate,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "lost": self.lost,
            "latency_ms": lat,
            "send_lag_ms_p99": percentile(self.send_lag_ms, 99) if self.send_lag_ms else math.nan,
            "batch_size_mean": sum(sizes) / len(sizes) if sizes else math.nan,
            "batch_size_p50": percentile(sizes, 50) if sizes else math.nan,
            "batch_size_max": max(sizes) if sizes else math.nan,
            "error_samples": self.error_samples[:3],
        }


def _call(target: Target, i: int) -> tuple[bool, dict[str, Any], str | None]:
    try:
        out = target(i)
    except Exception as exc:  # a failed request is a measurement, not a crash of the bench
        return False, {}, f"{type(exc).__name__}: {exc}"[:200]
    ok = bool(out.get("ok"))
    return ok, out, None if ok else str(out.get("error", "not ok"))[:200]


def run_open_loop(
    target: Target,
    rate: float,
    duration: float,
    *,
    seed: int = 0,
    max_count: int | None = None,
    threads: int = 256,
    drain_timeout: float = 30.0,
    first_index: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """Poisson arrivals at `rate`/s for `duration` s; latency from each request's scheduled time."""
    schedule = poisson_schedule(rate, duration, seed, max_count)
    result = RunResult(offered_rate=rate, duration=duration, sent=len(schedule))
    pending: queue.Queue[tuple[int, float] | None] = queue.Queue()
    lock = threading.Lock()
    done_count = [0]
    all_done = threading.Event()
    stopping = threading.Event()
    if not schedule:
        return result
    start = clock()

    def worker() -> None:
        while not stopping.is_set():
            item = pending.get()
            if item is None:
                return
            index, scheduled = item
            sent_at = clock()
            ok, out, error = _call(target, first_index + index)
            ended = clock()
            with lock:
                if not stopping.is_set():
                    result.send_lag_ms.append((sent_at - scheduled) * 1000)
                    result.record(ok, out, error, (ended - scheduled) * 1000, ended - start)
                done_count[0] += 1
                if done_count[0] == len(schedule):
                    all_done.set()

    pool = [threading.Thread(target=worker, daemon=True, name=f"openloop-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for index, offset in enumerate(schedule):
        scheduled = start + offset
        delay = scheduled - clock()
        if delay > 0:
            time.sleep(delay)
        pending.put((index, scheduled))
    for _ in pool:
        pending.put(None)
    all_done.wait(timeout=max(0.0, start + duration + drain_timeout - clock()))
    with lock:
        stopping.set()
        result.lost = len(schedule) - done_count[0]
        result.elapsed = max([duration, *result.ends])
    return result


def run_closed_loop(
    target: Target,
    clients: int,
    duration: float,
    *,
    warmup: float = 0.0,
    drain_timeout: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """`clients` threads, each sending its next request as soon as the previous one ended, for
    `duration` s; the rate counts completions after `warmup` only."""
    result = RunResult(offered_rate=None, duration=max(duration - warmup, 1e-9))
    lock = threading.Lock()
    start = clock()
    stop_at = start + duration
    counter = [0]

    def client(slot: int) -> None:
        while clock() < stop_at:
            with lock:
                index = counter[0]
                counter[0] += 1
            t0 = clock()
            ok, out, error = _call(target, index)
            ended = clock()
            with lock:
                result.sent += 1
                if ended > stop_at:
                    continue  # ended after the window: neither counted nor lost
                if not ok or ended - start >= warmup:  # successes in the warm-up are not counted
                    result.record(ok, out, error, (ended - t0) * 1000, ended - start)

    pool = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=max(0.0, stop_at + drain_timeout - clock()))
    return result


# --- the inferq HTTP target --------------------------------------------------------------------------


class _Conn(threading.local):
    conn: http.client.HTTPConnection | None = None


class InferqTarget:
    """`POST /v1/jobs` (raw body) with `Prefer: wait=…`, answered with the ended job (one request);
    if it has not ended by then (or `prefer_wait=False`: submit + long-poll, two requests),
    `GET /v1/jobs/<id>?wait=…` until it ends.

    One keep-alive `http.client` connection per thread (lean: the client shares the 2 cores with
    the service). Returns `ok`, the job's `status`, its `timings` (achieved batch size) and the
    number of HTTP `requests` it took."""

    def __init__(
        self,
        host: str,
        port: int,
        images: Sequence[bytes],
        *,
        top_k: int = 5,
        wait: float = 30.0,
        timeout: float = 60.0,
        submit_only: bool = False,
        prefer_wait: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.images = list(images)
        self.top_k = top_k
        self.wait = wait
        self.timeout = timeout
        self.submit_only = submit_only
        self.prefer_wait = prefer_wait and not submit_only
        self._local = _Conn()

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        for attempt in (1, 2):
            conn = self._local.conn
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.wait + 15)
                self._local.conn = conn
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                # A kept-alive connection the server closed: retry once on a fresh one (the
                # request never reached the app if the connection was dead on send).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wait_s(self, deadline: float) -> int:
        return max(1, min(math.floor(self.wait), math.ceil(deadline - time.monotonic())))

    def __call__(self, i: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        post_sent = time.time()
        prefer = {"Prefer": f"wait={self._wait_s(deadline)}"} if self.prefer_wait else {}
        status, body = self._request(
            "POST", f"/v1/jobs?top_k={self.top_k}", self.images[i % len(self.images)], prefer
        )
        post_done = time.time()
        if status == 200 and self.prefer_wait:  # it ended within the wait: the reply is the job
            return self._ended(json.loads(body), post_sent, post_done, requests=1)
        if status != 202:
            return {"ok": False, "error": f"POST {status}: {body[:120]!r}"}
        job_id = json.loads(body)["id"]
        if self.submit_only:
            return {"ok": True, "id": job_id}
        requests = 1
        while time.monotonic() < deadline:
            status, body = self._request("GET", f"/v1/jobs/{job_id}?wait={self._wait_s(deadline)}")
            requests += 1
            if status != 200:
                return {"ok": False, "error": f"GET {status}: {body[:120]!r}"}
            view = json.loads(body)
            if view["status"] in ("finished", "failed", "canceled", "expired"):
                return self._ended(view, post_sent, post_done, requests)
        return {"ok": False, "error": "timeout"}

    @staticmethod
    def _ended(view: dict[str, Any], post_sent: float, post_done: float, requests: int) -> dict[str, Any]:
        timings = view.get("timings") or {}
        return {
            "ok": view["status"] == "finished",
            "error": view.get("error"),
            "id": view["id"],
            "requests": requests,
            "batch_size": timings.get("batch_size"),
            "queue_ms": timings.get("queue_ms"),
            "inference_ms": timings.get("inference_ms"),
            # Wall-clock times (client and service share the machine's clock): the latency
            # breakdown per stage (bench.service). With one request, the POST's answer is the end.
            "post_sent": post_sent,
            "post_done": post_done,
            "done": time.time(),
            "enqueued_at": view.get("created_at"),
            "started_at": view.get("started_at"),
            "ended_at": view.get("ended_at"),
        }


class OneRequestTarget(InferqTarget):
    """A synchronous server's target: `POST <path>` with the image as the raw body; the request ends
    with its answer, a 200 (the bench's LitServe peer). Same keep-alive connection per thread as
    `InferqTarget`, whose plumbing it reuses."""

    def __init__(self, host: str, port: int, path: str, images: Sequence[bytes], *, timeout: float = 60.0):
        # The connection's socket timeout is `wait + 15` s: the whole request's timeout here.
        super().__init__(host, port, images, wait=max(1.0, timeout - 15), timeout=timeout)
        self.path = path

    def __call__(self, i: int) -> dict[str, Any]:
        status, body = self._request("POST", self.path, self.images[i % len(self.images)])
        if status != 200:
            return {"ok": False, "error": f"POST {status}: {body[:120]!r}"}
        return {"ok": True}
