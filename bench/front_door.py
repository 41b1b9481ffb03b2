"""The api's front door under hostile and heavy load: stalled and trickling connections, thousands of
long-polls. Real gunicorn, real sockets, a real Valkey; no worker model (jobs are ended by writing
RQ results directly, the way a worker would, and publishing on the ended channel).

`main()` prints one JSON object of figures; `python -m bench.front_door [--stalled N] [--waiters N]`;
`--compare-workers ROUNDS` measures only the api's CPU per submit + long-poll pair, on gevent and on
gthread workers taking turns.
The test suite runs the same functions with small counts (tests/test_front_door.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from launch.processes import free_port, rss_mb
from shared.config import PROJECT_ROOT

PNG_1PX = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND"
    b"\xaeB`\x82"
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ApiServer:
    base: str
    port: int
    proc: subprocess.Popen[bytes]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def cpu_seconds(self) -> float:
        """user + system CPU of the gunicorn worker processes (not the master)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.worker_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def rss_mb(self) -> float:
        sizes = (rss_mb(pid) for pid in self.worker_pids())
        return sum(size for size in sizes if not math.isnan(size))  # NaN: the process is gone


@contextmanager
def api_server(redis_url: str, **env: str) -> Iterator[ApiServer]:
    """gunicorn with the project's config on a free loopback port; stopped (SIGTERM) on exit."""
    port = free_port()
    full_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(PROJECT_ROOT),
        **env,
    }
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"],
        cwd=PROJECT_ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    server = ApiServer(base, port, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"gunicorn exited: {log.read().decode(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{base}/healthz", timeout=1).ok and len(server.worker_pids()) >= int(
                    full_env.get("WEB_CONCURRENCY", "2")
                ):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not come up within 60 s")
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- the stalled / trickling connection attack ------------------------------------------------------


class Attack:
    """`stalled` sockets that sent one byte of a request line and stop; `trickling` ones that sent
    complete headers of an upload and then send its body one byte per `trickle_interval` seconds."""

    def __init__(self, port: int, stalled: int, trickling: int, trickle_interval: float = 1.0) -> None:
        self.port = port
        self.stalled: list[socket.socket] = []
        self.trickling: list[socket.socket] = []
        self.n_stalled = stalled
        self.n_trickling = trickling
        self.interval = trickle_interval
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> Attack:
        for _ in range(self.n_stalled):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"G")
            self.stalled.append(s)
        for _ in range(self.n_trickling):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
            s.sendall(b"Content-Length: 100000\r\n\r\n")
            self.trickling.append(s)
        self._thread.start()
        return self

    def _trickle(self) -> None:
        while not self._stop.wait(self.interval):
            for s in list(self.trickling):
                try:
                    s.sendall(b"\x00")
                except OSError:
                    self.trickling.remove(s)
                    self.closed_by_server += 1

    def open_counts(self) -> dict[str, int]:
        """How many attack sockets the server has not closed yet (a closed one reads EOF)."""
        counts = {"stalled_open": 0, "trickling_open": 0}
        for name, socks in (("stalled_open", self.stalled), ("trickling_open", self.trickling)):
            for s in socks:
                s.setblocking(False)
                try:
                    data = s.recv(4096, socket.MSG_PEEK)
                    if data and not data.startswith(b"HTTP/1.1 408"):
                        counts[name] += 1
                except BlockingIOError:
                    counts[name] += 1
                except OSError:
                    pass
                finally:
                    s.setblocking(True)
        return counts

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.stalled + self.trickling:
            s.close()


def timed_get(url: str, timeout: float = 10.0, **kwargs: Any) -> float:
    """Seconds a fresh-connection GET took; inf when it failed or timed out."""
    started = time.perf_counter()
    try:
        response = requests.get(url, timeout=timeout, headers={"Connection": "close"}, **kwargs)
        response.raise_for_status()
    except requests.RequestException:
        return float("inf")
    return time.perf_counter() - started


def timed_submit(base: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    try:
        response = requests.post(
            f"{base}/v1/jobs",
            data=PNG_1PX,
            headers={"Content-Type": "image/png", "Connection": "close", **(headers or {})},
            timeout=timeout,
        )
        if response.status_code != 202:
            return float("inf")
    except requests.RequestException:
        return float("inf")
    return time.perf_counter() - started


def probe_latencies(base: str, seconds: float, interval: float = 0.1) -> dict[str, list[float]]:
    """/healthz, /readyz-free submit probes, one after the other, for `seconds`."""
    out: dict[str, list[float]] = {"healthz": [], "submit": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out["healthz"].append(timed_get(f"{base}/healthz", timeout=5))
        out["submit"].append(timed_submit(base, timeout=5))
        time.sleep(interval)
    return out


def stall_attack(
    server: ApiServer, stalled: int, trickling: int, probe_seconds: float = 3.0
) -> dict[str, Any]:
    """Probe latencies without, then during the attack; how many attack sockets remain open."""
    calm = probe_latencies(server.base, probe_seconds)
    with Attack(server.port, stalled, trickling) as attack:
        time.sleep(0.5)
        hot = probe_latencies(server.base, probe_seconds)
        still_open = attack.open_counts()
    return {
        "stalled": stalled,
        "trickling": trickling,
        "calm_healthz_p99_ms": round(percentile(calm["healthz"], 0.99) * 1000, 1),
        "calm_submit_p99_ms": round(percentile(calm["submit"], 0.99) * 1000, 1),
        "attack_healthz_p99_ms": round(percentile(hot["healthz"], 0.99) * 1000, 1),
        "attack_submit_p99_ms": round(percentile(hot["submit"], 0.99) * 1000, 1),
        "attack_failed_probes": sum(1 for v in hot["healthz"] + hot["submit"] if v == float("inf")),
        **still_open,
    }


# --- many long-polls ---------------------------------------------------------------------------------


async def _long_poll(port: int, job_id: str, wait: int, finished_at: dict[str, float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(
            f"GET /v1/jobs/{job_id}?wait={wait} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await reader.read()
        got = time.time()
        if b" 200 " in data.split(b"\r\n", 1)[0] and b'"finished"' in data:
            finished_at[job_id] = got
    finally:
        writer.close()


def end_jobs(redis_url: str, ids: list[str], *, with_view: bool = True) -> float:
    """End `ids` the way a worker does (RQ success result + a publish on the ended channel carrying
    the job's view; `with_view=False`: the bare id, as workers published before `shared.ended`), in
    one transaction; returns the wall time the transaction completed."""
    from rq.job import Job
    from rq.utils import now

    from shared.ended import publish_ended
    from shared.job_view import view_of
    from shared.jobs import SERIALIZER
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    jobs = [Job.fetch(i, connection=conn, serializer=SERIALIZER) for i in ids]
    with conn.pipeline() as pipe:
        for job in jobs:
            # What the worker's success write does (worker/batch_worker.py), minus its bookkeeping.
            job._result = {"predictions": [], "model": {"name": "bench", "sha256": "0"}}
            job.ended_at = now()
            job._handle_success(3600, pipeline=pipe)
            publish_ended(pipe, job.id, view_of(job, job._result) if with_view else None)
        pipe.execute()
    done = time.time()
    conn.close()
    return done


def redis_clients(redis_url: str) -> int:
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        return len(conn.client_list())
    finally:
        conn.close()


def long_polls(
    server: ApiServer,
    redis_url: str,
    waiters: int,
    submit_probes: int = 50,
    ended_share: float = 0.2,
    end_rate: float = 400.0,
) -> dict[str, Any]:
    """`waiters` concurrent `?wait=30` on queued jobs; submits timed meanwhile; then every job ends
    and each waiter's delay after its job's end is measured."""
    headers = {"Content-Type": "image/png"}
    ids: list[str] = []
    session = requests.Session()
    while len(ids) < waiters:
        n = min(64, waiters - len(ids))
        files = [("image", ("x.png", PNG_1PX, "image/png"))] * n
        response = session.post(f"{server.base}/v1/batches", files=files, timeout=30)
        response.raise_for_status()
        ids += [job["id"] for job in response.json()["jobs"]]
    del headers
    clients_before = redis_clients(redis_url)
    rss_before = server.rss_mb()
    ended_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    figures: dict[str, Any] = {"waiters": waiters}

    async def run() -> None:
        tasks = [asyncio.create_task(_long_poll(server.port, i, 30, finished_at)) for i in ids]
        # Wait until the api holds them all (its connections), bounded.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if _established(server.port) >= waiters:
                break
        # Let the api read and register them all: until its processes are nearly idle.
        while time.monotonic() < deadline:
            before = server.cpu_seconds()
            await asyncio.sleep(0.5)
            if server.cpu_seconds() - before < 0.1:
                break
        figures["connected"] = _established(server.port)
        figures["redis_clients_before"] = clients_before
        figures["redis_clients_during"] = await asyncio.to_thread(redis_clients, redis_url)
        figures["rss_mb_before"] = round(rss_before, 1)
        figures["rss_mb_during"] = round(server.rss_mb(), 1)
        figures["rss_mb_per_1000_waiters"] = round((server.rss_mb() - rss_before) * 1000 / waiters, 2)
        lat = [await asyncio.to_thread(timed_submit, server.base, 5.0) for _ in range(submit_probes)]
        figures["submit_failed"] = sum(1 for v in lat if v == float("inf"))
        figures["submit_p50_ms"] = round(percentile(lat, 0.5) * 1000, 1)
        figures["submit_p99_ms"] = round(percentile(lat, 0.99) * 1000, 1)
        health = [await asyncio.to_thread(timed_get, f"{server.base}/healthz", 5.0) for _ in range(20)]
        figures["healthz_p99_ms"] = round(percentile(health, 0.99) * 1000, 1)
        # End some of the jobs the way workers do, `end_rate` jobs/s in batches of 8 (a few times
        # what a worker serves), each waiter timed from its own batch's end; the other waiters keep
        # waiting meanwhile (and return `queued` after their wait).
        to_end = ids[: int(waiters * ended_share)]
        for start in range(0, len(to_end), 8):
            batch = to_end[start : start + 8]
            done = await asyncio.to_thread(end_jobs, redis_url, batch)
            for i in batch:
                ended_at[i] = done
            await asyncio.sleep(8 / end_rate)
        figures["ended"] = len(to_end)
        figures["end_rate_per_s"] = end_rate
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)

    asyncio.run(run())
    # Compared after the run: a waiter may be answered before its batch's end time is noted.
    delays = [finished_at[i] - ended_at[i] for i in ended_at if i in finished_at]
    figures["woken"] = len(delays)
    figures["wake_p50_ms"] = round(percentile(delays, 0.5) * 1000, 1)
    figures["wake_p99_ms"] = round(percentile(delays, 0.99) * 1000, 1)
    figures["wake_max_ms"] = round(max(delays) * 1000, 1) if delays else None
    return figures


def _established(port: int) -> int:
    """Established TCP connections to `port` on loopback (from the server side)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    return len(out.splitlines())


# --- API CPU per submit + long-poll pair -------------------------------------------------------------


def cpu_per_pair(server: ApiServer, redis_url: str, pairs: int = 300) -> dict[str, Any]:
    """Sequential submit + `?wait=10` pairs, each job ended by a stand-in worker thread as soon as it
    is enqueued; the api workers' CPU (user + system, /proc) over the run divided by the pairs."""
    from shared.redis_conn import redis_from_url

    stop = threading.Event()
    conn = redis_from_url(redis_url)

    def finisher() -> None:
        from shared.config import get_settings

        key = f"rq:queue:{get_settings().queue_name}"
        while not stop.is_set():
            got = conn.lpop(key, 64)
            if got:
                end_jobs(redis_url, [g.decode() for g in got])
            else:
                time.sleep(0.002)

    thread = threading.Thread(target=finisher, daemon=True)
    thread.start()
    session = requests.Session()
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    finished = 0
    for _ in range(pairs):
        r = session.post(
            f"{server.base}/v1/jobs", data=PNG_1PX, headers={"Content-Type": "image/png"}, timeout=10
        )
        r.raise_for_status()
        got = session.get(f"{server.base}{r.headers['Location']}?wait=10", timeout=15).json()
        finished += got["status"] == "finished"
    elapsed = time.perf_counter() - t0
    cpu = server.cpu_seconds() - cpu0
    stop.set()
    thread.join(timeout=5)
    conn.close()
    return {
        "pairs": pairs,
        "finished": finished,
        "api_cpu_ms_per_pair": round(cpu * 1000 / pairs, 2),
        "pair_ms_mean": round(elapsed * 1000 / pairs, 2),
    }


# One client address plays every client here: lift the per-key limits (tests cover them) and the queue bound.
BENCH_ENV = {"MAX_QUEUE_DEPTH": "0", "SUBMIT_RATE_LIMIT": "100000/second", "LONG_POLLS_PER_KEY": "100000"}


# The api's former worker class, for `--compare-workers` (what the move to gevent is measured against).
GTHREAD = {"GUNICORN_CMD_ARGS": "--worker-class gthread --threads 32"}


def compare_workers(redis_url: str, pairs: int, rounds: int) -> dict[str, Any]:
    """`cpu_per_pair` on the project's gevent workers and on gthread workers (2 x 32 threads), in
    blocks of `pairs` taking turns for `rounds` rounds: on a shared machine, load that comes and goes
    then hits both alike. Medians of the blocks, and their ratio."""
    from statistics import median

    blocks: dict[str, list[float]] = {"gevent": [], "gthread": []}
    with (
        api_server(redis_url, **BENCH_ENV) as gevent_api,
        api_server(redis_url, **BENCH_ENV, **GTHREAD) as gthread_api,
    ):
        servers = {"gevent": gevent_api, "gthread": gthread_api}
        for server in servers.values():
            cpu_per_pair(server, redis_url, 30)  # warm-up
        for turn in range(rounds):
            for name in sorted(servers, reverse=turn % 2 == 1):
                blocks[name].append(cpu_per_pair(servers[name], redis_url, pairs)["api_cpu_ms_per_pair"])
    medians = {name: median(values) for name, values in blocks.items()}
    return {
        "pairs_per_block": pairs,
        "rounds": rounds,
        "api_cpu_ms_per_pair": medians,
        "gevent_over_gthread": round(medians["gevent"] / medians["gthread"], 3),
        "blocks": blocks,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stalled", type=int, default=1000)
    parser.add_argument("--trickling", type=int, default=100)
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--redis-url", default=None, help="default: a throwaway embedded Valkey")
    parser.add_argument("--only", choices=("attack", "polls", "cpu"), default=None)
    parser.add_argument(
        "--compare-workers",
        type=int,
        metavar="ROUNDS",
        help="only the CPU per pair, gevent and gthread workers taking turns for ROUNDS rounds",
    )
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {}
    if args.compare_workers:
        with _redis(args.redis_url) as url:
            figures["cpu_by_worker_class"] = compare_workers(url, args.pairs, args.compare_workers)
        print(json.dumps(figures, indent=2))
        return
    with _redis(args.redis_url) as url, api_server(url, **BENCH_ENV) as server:
        if args.only in (None, "cpu"):
            figures["cpu"] = cpu_per_pair(server, url, args.pairs)
        if args.only in (None, "attack"):
            figures["attack"] = stall_attack(server, args.stalled, args.trickling)
        if args.only in (None, "polls"):
            figures["long_polls"] = long_polls(server, url, args.waiters)
    print(json.dumps(figures, indent=2))


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from launch.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), appendonly=False) as server:
        yield server.url


if __name__ == "__main__":
    main()


__all__ = ["Attack", "api_server", "compare_workers", "cpu_per_pair", "long_polls", "main", "stall_attack"]
