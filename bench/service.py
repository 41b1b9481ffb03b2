"""inferq end to end: the gunicorn api and batch workers as real processes, driven over HTTP.

`python -m bench.service --variant NAME[:KEY=VALUE,...] ...` (see `--help`) compares service variants
(settings, or another checkout of inferq with ROOT=<path>) in one interleaved run, each on its own
Valkey, and splits every request's latency into its stages (`request_stages`); TRACE=1 runs that
variant's worker under `bench.trace_worker` for the stages inside the worker. Clients send each image
in one request (`Prefer: wait`); REQUESTS=2 makes a variant whose clients submit, then long-poll
(`--variant one --variant two:REQUESTS=2`: both ways, on two services of the same settings)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    CpuMeter,
    base_env,
    exit_on_sigterm,
    free_port,
    percentile,
    process_tree,
    spawn,
    stop,
    wait_until,
)
from bench.loadgen import InferqTarget
from shared.config import get_settings


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def flush(redis_url: str) -> None:
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        conn.flushall()
    finally:
        conn.close()


class Stack:
    """api (gunicorn, the service's own config) + `workers` worker processes on one Redis.

    `worker_cmd` defaults to `python -m worker` (what the Procfile's worker-pool runs per worker);
    the bench's variants pass `python -m bench.probe_worker …`. `ready` waits for `/readyz` (a
    worker registered: model loaded and warmed up), else only for `/healthz`."""

    def __init__(
        self,
        redis_url: str,
        logs: Path,
        name: str,
        *,
        allocator: str = "glibc",
        workers: int = 1,
        worker_cmd: list[str] | None = None,
        api: bool = True,
        ready: bool = True,
        root: Path | None = None,
        **overrides: Any,
    ) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.name = name
        self.workers = workers
        self.worker_cmd = worker_cmd or [PY, "-m", "worker"]
        self.with_api = api
        self.ready = ready
        self.port = free_port()
        # `root`: another checkout of inferq to run api and worker from (an A/B of two commits).
        self.root = root
        if root is not None:
            overrides.setdefault("PYTHONPATH", str(root))
        self.env = base_env(redis_url, allocator, **overrides)
        self.api_proc: Any = None
        self.worker_procs: list[Any] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target(self, images: list[bytes], **kwargs: Any) -> InferqTarget:
        return InferqTarget("127.0.0.1", self.port, images, **kwargs)

    def start_api(self) -> None:
        env = {**self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.api_proc = spawn(
            [PY, "-m", "gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"],
            env,
            self.logs / f"{self.name}-api.log",
            cwd=self.root,
        )

    def start_worker(self) -> Any:
        log = self.logs / f"{self.name}-worker{len(self.worker_procs)}.log"
        proc = spawn(self.worker_cmd, self.env, log, cwd=self.root)
        self.worker_procs.append(proc)
        return proc

    def __enter__(self) -> Stack:
        try:
            if self.with_api:
                self.start_api()
            for _ in range(self.workers):
                self.start_worker()
            if self.with_api:
                path = "/readyz" if self.ready and self.workers else "/healthz"
                wait_until(lambda: http_status(self.base + path) == 200, 180, 0.1, f"{self.name} {path}")
                self.check_alive()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def batch_caps(self) -> list[int]:
        """The batch cap each worker chose at warm-up (from its `batch cap N of at most M` log line)."""
        caps = []
        for i in range(len(self.worker_procs)):
            log = self.logs / f"{self.name}-worker{i}.log"
            found = (
                re.findall(r"batch cap (\d+) of at most", log.read_text(errors="replace"))
                if log.exists()
                else []
            )
            if found:
                caps.append(int(found[-1]))
        return caps

    def check_alive(self) -> None:
        for proc in [self.api_proc, *self.worker_procs]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.name}: a process exited with {proc.returncode}; see {self.logs}")

    def cpu_meter(self, redis_pid: int | None) -> CpuMeter:
        """CPU of the worker(s), the api (master + workers), Redis and this (client) process."""
        groups = {
            "worker": [p for proc in self.worker_procs for p in process_tree(proc.pid)],
            "api": process_tree(self.api_proc.pid) if self.api_proc is not None else [],
            "redis": [redis_pid] if redis_pid else [],
            "client": [os.getpid()],
        }
        return CpuMeter(groups)

    def __exit__(self, *exc: object) -> None:
        for proc in self.worker_procs:
            stop(proc)
        stop(self.api_proc)
        self.worker_procs = []
        self.api_proc = None


def wait_idle(redis_url: str, timeout: float = 120.0) -> None:
    """Until the queue is empty and no job is in flight (after an overloaded run), bounded."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        queue = Queue("inferq", connection=conn)
        started = StartedJobRegistry(queue=queue)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: queue.count == 0 and started.count == 0, timeout, 0.2, "queue drained")
    finally:
        conn.close()


def settle(redis_url: str, patience: float = 20.0) -> int:
    """Between runs: let the worker drain the queue for `patience` s, then drop what is left (an
    overloaded run's backlog would otherwise spill into the next measurement); wait for the batch in
    flight. Returns how many queued jobs were dropped."""
    from shared.redis_conn import redis_from_url

    wait_idle(redis_url, patience)
    conn = redis_from_url(redis_url)
    try:
        # The queue lists themselves (rq:queue:<name>), not their :intermediate lists (jobs in flight).
        keys = [k.decode() for k in conn.keys("rq:queue:*") if b":" not in k[len(b"rq:queue:") :]]
        dropped = sum(int(conn.llen(k)) for k in keys)
        if dropped:
            conn.delete(*keys)
    finally:
        conn.close()
    if dropped:
        wait_idle(redis_url, 60)
    return dropped


def first_prediction_s(base: str, image: bytes, started: float, timeout: float = 120.0) -> float:
    """Seconds from `started` (time.monotonic) until a first image submitted to `base` has its result."""
    target = InferqTarget(
        base.split(":")[1].lstrip("/"), int(base.rsplit(":", 1)[1]), [image], timeout=timeout
    )
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            out = target(0)
        except OSError:
            time.sleep(0.02)  # the api is not listening yet
            continue
        if out.get("ok"):
            return time.monotonic() - started
        if "POST 503" in str(out.get("error")) or "POST 5" in str(out.get("error")):
            time.sleep(0.02)
            continue
        raise RuntimeError(f"first prediction failed: {out}")
    raise TimeoutError("no first prediction")


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


# --- A/B runs of service layouts or commits: `python -m bench.service` -------------------------------


def _stamp(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def _preprocess_ms(redis_url: str, ids: list[str]) -> dict[str, float]:
    """Each job's decode share (`timings.preprocess_ms` in its meta; the HTTP view omits it)."""
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        with conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "meta")
            metas = pipe.execute()
    finally:
        conn.close()
    out = {}
    for job_id, meta in zip(ids, metas, strict=True):
        with contextlib.suppress(TypeError, ValueError, KeyError):
            out[job_id] = float(json.loads(meta)["timings"]["preprocess_ms"])
    return out


def read_trace(path: Path | None) -> dict[str, dict[str, float]]:
    """The per-job stage times `bench.trace_worker` wrote (empty without a trace)."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(line)
            out[record.pop("id")] = record
    return out


# (stage, from mark, to mark) of a traced job; marks from `bench.trace_worker` and the client.
TRACED_STAGES = (
    ("t_queue_wait", "enqueued", "grabbed"),
    ("t_fetch", "grabbed", "fetched"),
    ("t_start", "fetched", "started"),
    ("t_decode", "decode_in", "decode_out"),
    ("t_to_ready", "decode_out", "ready"),
    ("t_ready_wait", "ready", "taken"),
    ("t_to_forward", "taken", "forward_in"),
    ("t_forward", "forward_in", "forward_out"),
    ("t_to_writer", "forward_out", "write_in"),
    ("t_write", "write_in", "write_out"),
    ("t_to_client", "write_out", "done"),
)


def request_stages(
    extras: list[dict[str, Any]],
    preprocess: dict[str, float],
    trace: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Each request's stages (ms), from the client's and the job's own wall-clock times: submit (POST
    round trip; with one request, the whole of it), api→enqueue, queue (enqueue → started by a
    feeder: queue wait, grab, fetch, start), decode (the job's share of its decode step), forward
    (its batch's pass), rest (started → ended minus decode and forward: waiting ready, risk marks,
    hand-over to the writer), end→client (the end's transaction, publish, long-poll wake-up, read,
    response), total; with a trace, the `TRACED_STAGES` too."""
    rows: list[dict[str, float]] = []
    for e in extras:
        enqueued, started, ended = (_stamp(e.get(k)) for k in ("enqueued_at", "started_at", "ended_at"))
        if enqueued is None or started is None or ended is None or "post_sent" not in e:
            continue
        decode_ms = preprocess.get(e["id"], 0.0)
        forward_ms = float(e.get("inference_ms") or 0.0)
        row = {
            "submit": e["post_done"] - e["post_sent"],
            "api_to_enqueue": enqueued - e["post_sent"],
            "queue": started - enqueued,
            "decode": decode_ms / 1000,
            "forward": forward_ms / 1000,
            "rest": ended - started - (decode_ms + forward_ms) / 1000,
            "end_to_client": e["done"] - ended,
            "total": e["done"] - e["post_sent"],
        }
        marks = (trace or {}).get(e["id"])
        if marks:
            marks = {**marks, "enqueued": enqueued, "done": e["done"]}
            row.update(
                {stage: marks[b] - marks[a] for stage, a, b in TRACED_STAGES if a in marks and b in marks}
            )
        rows.append({k: round(v * 1000, 3) for k, v in row.items()})
    return rows


def breakdown(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each stage over the requests (the parts' percentiles do not add up to the total's)."""
    stages: dict[str, list[float]] = {}
    for row in rows:
        for name, ms in row.items():
            stages.setdefault(name, []).append(ms)
    return {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in stages.items()}


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, env


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.common import Log, load_images, summarize
    from bench.loadgen import run_closed_loop, run_open_loop
    from launch.redis_server import EmbeddedRedis

    parser = argparse.ArgumentParser(
        prog="python -m bench.service",
        description="A/B of service variants (settings, or another checkout via ROOT=path), all up at "
        "once on their own Valkey, driven one at a time and interleaved: saturation (closed loop), "
        "then open-loop rates, with a per-stage latency breakdown.",
    )
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME[:KEY=VALUE,...] environment of api and worker; ROOT=<checkout> runs that code; "
        "REQUESTS=2: clients submit then long-poll (default 1: one request, `Prefer: wait`)",
    )
    parser.add_argument("--rates", default="", help="absolute req/s, comma-separated")
    parser.add_argument("--fractions", default="", help="fractions of each variant's own saturation")
    parser.add_argument("--seconds", type=float, default=20.0, help="per open-loop run")
    parser.add_argument("--sat-seconds", type=float, default=15.0, help="per saturation run (0: none)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/inferq-bench-service"))
    parser.add_argument("--out", type=Path, help="JSON results")
    args = parser.parse_args(argv)
    exit_on_sigterm()

    images = [data for _, data in load_images()]
    variants = [_variant(v) for v in args.variant]
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"variants": dict(variants), "saturation": {}, "rates": {}}
    prefer: dict[str, bool] = {}  # per variant: its clients send one request (Prefer: wait)
    with contextlib.ExitStack() as stack:
        stacks = {}
        for name, env in variants:
            server = stack.enter_context(EmbeddedRedis(args.workdir / f"redis-{name}", appendonly=False))
            root = Path(env.pop("ROOT")) if "ROOT" in env else None
            trace = args.workdir / f"trace-{name}.jsonl" if env.pop("TRACE", "") else None
            requests = env.pop("REQUESTS", "1")
            if requests not in ("1", "2"):
                parser.error(f"{name}: REQUESTS must be 1 (Prefer: wait) or 2 (submit, long-poll)")
            prefer[name] = requests == "1"
            worker_cmd = [PY, "-m", "bench.trace_worker", "--out", str(trace)] if trace else None
            if root is not None:
                env.setdefault("ARTIFACT_DIR", str(get_settings().artifact_dir))
            Log.say(f"starting {name} {env} {root or ''}")
            svc = stack.enter_context(
                Stack(server.url, args.workdir, name, root=root, worker_cmd=worker_cmd, **env)
            )
            stacks[name] = (svc, server, trace)
            Log.say(f"{name} ready; batch cap {svc.batch_caps()}")

        def order(round_: int) -> list[str]:
            names = list(stacks)
            shift = round_ % len(names)
            return names[shift:] + names[:shift]

        for round_ in range(args.rounds if args.sat_seconds > 0 else 0):
            for name in order(round_):
                svc, server, _ = stacks[name]
                svc.check_alive()
                meter = svc.cpu_meter(server.pid)
                meter.start()
                target = svc.target(images, prefer_wait=prefer[name])
                r = run_closed_loop(target, args.clients, args.sat_seconds, warmup=2.0)
                used = meter.stop()
                s = r.summary()
                per_img = {k: used[k] / max(r.ok, 1) * 1000 for k in ("worker", "api", "redis", "client")}
                results["saturation"].setdefault(name, []).append(
                    {
                        "images_per_s": s["achieved_rate"],
                        "p99_ms": s["latency_ms"]["p99"],
                        "cpu_ms_per_img": per_img,
                    }
                )
                Log.say(
                    f"{name} saturation {s['achieved_rate']:.1f} img/s, batch mean {s['batch_size_mean']:.2f}"
                )
                settle(server.url)
        sat = {n: summarize(x["images_per_s"] for x in v)["median"] for n, v in results["saturation"].items()}
        plan = [("rate", float(x)) for x in args.rates.split(",") if x]
        plan += [("fraction", float(x)) for x in args.fractions.split(",") if x]
        for round_ in range(args.rounds):
            for i, (kind, value) in enumerate(plan):
                for name in order(round_ + i):
                    svc, server, trace = stacks[name]
                    svc.check_alive()
                    rate = value if kind == "rate" else round(value * sat[name], 1)
                    target = svc.target(images, prefer_wait=prefer[name])
                    r = run_open_loop(target, rate, args.seconds, seed=round_ * 100 + i)
                    s = r.summary()
                    ids = [e["id"] for e in r.extras]
                    rows = request_stages(r.extras, _preprocess_ms(server.url, ids), read_trace(trace))
                    parts = breakdown(rows)
                    key = f"{kind} {value:g}"
                    results["rates"].setdefault(key, {}).setdefault(name, []).append(
                        {"rate": rate, **s, "breakdown": parts, "requests": rows}
                    )
                    Log.say(
                        f"{name} {key} ({rate} req/s): p50 {s['latency_ms']['p50']:.1f} p99 "
                        f"{s['latency_ms']['p99']:.1f} ms, lost {s['lost']} errors {s['errors']}; "
                        + " ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in parts.items())
                    )
                    settle(server.url)
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
