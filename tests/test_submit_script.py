"""A submit's Redis work: one round trip before the body is read (rate limit, queue bounds, the
idempotency claim) and one after (byte budget, image, RQ's job, the key's counters), and the job it
stores is the job RQ's own `Queue.enqueue_call` stores: `Job.fetch`, the registries, rq-dashboard and
`rq info` read them alike, and the worker runs it."""

from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from limits import parse_many
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from rq import Retry
from rq.job import Job
from rq.utils import utcparse

from api import create_app
from api.fairness import LIMITS_PREFIX
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import JOB_FUNC, SERIALIZER, make_queue
from shared.keys import image_key
from shared.redis_conn import redis_from_url
from tests.factories import png
from tests.service import service_stack, wait_job

KEY = "submit-key-0123456789abcdef"
OPERATOR = "operator-key-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {KEY}"}
OPERATOR_AUTH = {"Authorization": f"Bearer {OPERATOR}"}
IMAGE = png(90, size=48)
WAIT = {"Prefer": "wait=1"}
LEASES = "inferq:long-polls:addr:127.0.0.1"  # the test client's long-poll leases (no API keys)


def post_job(client: Any, query: str = "", headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/v1/jobs{query}", data=IMAGE, content_type="image/png", headers=headers or {})


def post_batch(client: Any, count: int) -> Any:
    files = {"image": [(io.BytesIO(IMAGE), f"{i}.png") for i in range(count)]}
    return client.post("/v1/batches", data=files, content_type="multipart/form-data")


@contextmanager
def commands_sent(url: str) -> Iterator[list[str]]:
    """The names of the commands clients send to Redis inside the block (MONITOR; the commands a
    script runs are left out: they are not sent, they run inside the script's one round trip)."""
    marker = uuid.uuid4().hex
    sent: list[str] = []
    started = threading.Event()
    conn = redis_from_url(url)

    def watch() -> None:
        with conn.monitor() as monitor:
            started.set()
            recording = False
            for entry in monitor.listen():
                # Script commands are not sent; redis-py's PING health check (HEALTH_CHECK_INTERVAL_SECONDS,
                # on a connection idle that long) belongs to the connection, not to the submit.
                if entry["client_type"] == "lua" or entry["command"] == "PING":
                    continue
                if entry["command"] == f"ECHO {marker}":
                    if recording:
                        return
                    recording = True
                elif recording:
                    sent.append(entry["command"].split(" ", 1)[0].upper())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    started.wait(5)
    marking = redis_from_url(url)
    try:
        marking.echo(marker)
        yield sent
    finally:
        marking.echo(marker)
        thread.join(10)
        marking.close()
        conn.close()


def test_a_submit_is_one_round_trip_before_its_body_and_one_after(redis_url: str) -> None:
    # No worker: a submit that prefers to wait waits its full second. The listener's safety-net
    # re-check is set far off, so only the request's own commands are sent meanwhile.
    settings = Settings(redis_url=redis_url, long_poll_recheck_seconds=3600)
    client = create_app(settings).test_client()
    # The defaults: a rate limit with two windows, the queue bound, the key's share, the byte budget.
    for response in (
        post_job(client),
        post_job(client, headers={"Idempotency-Key": "warm"}),
        post_batch(client, 2),
        post_job(client, headers=WAIT),  # the completion listener subscribes
    ):
        assert response.status_code == 202, response.get_data(as_text=True)  # the scripts are loaded

    with commands_sent(redis_url) as single:
        assert post_job(client).status_code == 202
    with commands_sent(redis_url) as idempotent:
        assert post_job(client, headers={"Idempotency-Key": "order-1"}).status_code == 202
    with commands_sent(redis_url) as batch:
        assert post_batch(client, 3).status_code == 202

    with commands_sent(redis_url) as waiting:
        response = post_job(client, headers=WAIT)
        assert response.status_code == 202
        assert response.headers["Preference-Applied"] == "wait=1"
    with commands_sent(redis_url) as waiting_idempotent:
        response = post_job(client, headers={**WAIT, "Idempotency-Key": "order-2"})
        assert response.headers["Preference-Applied"] == "wait=1"
    # A key at its long-poll cap: the preference is declined at once, the job queued all the same.
    leases = redis_from_url(redis_url)
    leases.zadd(LEASES, {f"held-{i}": 4e9 for i in range(settings.long_polls_per_key)})
    with commands_sent(redis_url) as declined:
        response = post_job(client, headers=WAIT)
        assert response.status_code == 202
        assert "Preference-Applied" not in response.headers
    assert leases.zcard(LEASES) == settings.long_polls_per_key  # no lease taken over the cap
    leases.close()

    assert single == ["EVALSHA", "EVALSHA"]
    assert idempotent == ["EVALSHA", "EVALSHA"]
    # The count of images is known only from the body: the rate and bounds are checked for one image
    # before it is read, for the others after.
    assert batch == ["EVALSHA", "EVALSHA", "EVALSHA"]
    # A submit that waits: its long-poll lease is among the store script's writes (the count under the
    # cap read by the first script); after the wait, one round trip gives the lease back and reads the job.
    after_wait = ["ZREM", "HGETALL", "XREVRANGE", "EXISTS"]
    assert waiting == ["EVALSHA", "EVALSHA", *after_wait]
    assert waiting_idempotent == ["EVALSHA", "EVALSHA", *after_wait]
    assert declined == ["EVALSHA", "EVALSHA"]


def _with_db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def normalized(value: Any, ids: tuple[str, str] | None = None) -> Any:
    """`value` as JSON would carry it, with the job id `ids[0]` replaced by `ids[1]`."""
    text = json.dumps(value, sort_keys=True, default=str)
    return json.loads(text.replace(*ids) if ids else text)


def test_a_submitted_job_reads_as_one_that_queue_enqueue_made(redis_url: str, tmp_path: Path) -> None:
    # Ours in db 0, through the api; the reference in db 1, by RQ's own enqueue_call with the same
    # arguments: every RQ key, every field, every reader must agree but for ids and timestamps.
    ours_url, ref_url = _with_db(redis_url, 0), _with_db(redis_url, 1)
    ours_conn, ref_conn = redis_from_url(ours_url), redis_from_url(ref_url)
    ref_conn.flushdb()
    ours_app = create_app(Settings(redis_url=ours_url, api_keys=KEY, operator_keys=OPERATOR))
    ref_app = create_app(Settings(redis_url=ref_url, api_keys=KEY, operator_keys=OPERATOR))
    answer = post_job(ours_app.test_client(), "?priority=low&top_k=3&deadline_ms=600000", BEARER)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    ours_id = answer.json["id"]
    ours = Job.fetch(ours_id, connection=ours_conn, serializer=SERIALIZER)
    ref_id = str(uuid.uuid4())
    ref_queue = make_queue(ref_conn, Settings(redis_url=ref_url), "low")
    ref_queue.enqueue_call(
        JOB_FUNC,
        args=(image_key(ref_id), 3),
        job_id=ref_id,
        timeout=ours.timeout,
        result_ttl=ours.result_ttl,
        failure_ttl=ours.failure_ttl,
        ttl=None,
        description=ours.description,
        meta=ours.meta,
        retry=Retry(max=ours.retries_left) if ours.retries_left else None,
    )
    ids = (ours_id, ref_id)
    ref = Job.fetch(ref_id, connection=ref_conn, serializer=SERIALIZER)

    # RQ's keys: the same keys, types, TTLs (none) and contents.
    def rq_keys(conn: redis.Redis, job_id: str) -> dict[str, Any]:
        found = {}
        for key in conn.scan_iter("rq:*"):
            name = key.decode().replace(job_id, "<id>")
            kind = conn.type(key).decode()
            content: Any = {
                "set": lambda k: sorted(conn.smembers(k)),
                "list": lambda k: conn.lrange(k, 0, -1),
                "hash": lambda k: sorted(conn.hgetall(k)),
            }[kind](key)
            found[name] = (kind, conn.ttl(key), str(content).replace(job_id, "<id>"))
        return found

    assert rq_keys(ours_conn, ours_id) == rq_keys(ref_conn, ref_id)
    assert ours_conn.smembers("rq:queues") == {b"rq:queue:inferq-low"}

    # The job hash, field by field.
    ours_hash, ref_hash = ours_conn.hgetall(ours.key), ref_conn.hgetall(ref.key)
    assert sorted(ours_hash) == sorted(ref_hash)
    for field, value in ref_hash.items():
        if field in (b"created_at", b"enqueued_at"):
            utcparse(ours_hash[field].decode())  # an RQ timestamp too
        elif field == b"data":  # the call, which names the job's image key
            assert zlib.decompress(ours_hash[field]).replace(
                ours_id.encode(), ref_id.encode()
            ) == zlib.decompress(value)
        else:
            assert ours_hash[field] == value, field

    # Job.fetch: the same job.
    def as_read(job: Job) -> dict[str, Any]:
        return {
            "func": job.func_name,
            "args": job.args,
            "kwargs": job.kwargs,
            "meta": job.meta,
            "status": job.get_status(),
            "origin": job.origin,
            "timeout": job.timeout,
            "ttls": (job.ttl, job.result_ttl, job.failure_ttl),
            "retries": (job.retries_left, job.retry_intervals),
            "description": job.description,
            "queued": job.is_queued,
            "dependencies": job._dependency_ids,
        }

    assert normalized(as_read(ours), ids) == normalized(as_read(ref))

    # The registries: the job is waiting in its queue and in no registry.
    def registries(conn: redis.Redis) -> dict[str, Any]:
        queue = make_queue(conn, Settings(), "low")
        return {
            "queued": queue.get_job_ids(),
            "counts": [
                r.count
                for r in (
                    queue.started_job_registry,
                    queue.finished_job_registry,
                    queue.failed_job_registry,
                    queue.deferred_job_registry,
                    queue.scheduled_job_registry,
                    queue.canceled_job_registry,
                )
            ],
        }

    assert (
        normalized(registries(ours_conn), ids)
        == registries(ref_conn)
        == {
            "queued": [ref_id],
            "counts": [0] * 6,
        }
    )

    # rq-dashboard (as mounted by the api): the job and the queues read alike.
    def dashboard(app: Any, job_id: str) -> dict[str, Any]:
        client = app.test_client()
        job = client.get(f"/rq/0/data/job/{job_id}.json", headers=OPERATOR_AUTH)
        queues = client.get("/rq/0/data/queues.json", headers=OPERATOR_AUTH)
        listed = client.get("/rq/0/data/jobs/inferq-low/queued/8/asc/1.json", headers=OPERATOR_AUTH)
        assert job.status_code == queues.status_code == listed.status_code == 200
        read = {"job": job.get_json(), "queues": queues.get_json(), "listed": listed.get_json()}
        for entry in (read["job"], *read["listed"]["jobs"]):
            for stamp in ("created_at", "enqueued_at"):
                if stamp in entry:
                    datetime.fromisoformat(entry.pop(stamp))  # a time, whichever
        return read

    assert normalized(dashboard(ours_app, ours_id), ids) == normalized(dashboard(ref_app, ref_id))

    # `rq info`: RQ's CLI finds the queue (rq:queues) and counts the job.
    def rq_info(url: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "rq.cli", "info", "-u", url, "--only-queues", "--raw", "-S", "json"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    assert rq_info(ours_url) == rq_info(ref_url)
    assert "queue inferq-low 1" in rq_info(ours_url)
    ref_conn.flushdb()
    ours_conn.close()
    ref_conn.close()


def test_the_rate_counters_are_the_limits_librarys_own(redis_url: str) -> None:
    """The admission script runs `limits`' own sliding-window script on its own keys: `limits` reads
    what the api counted, and what `limits` counts, the api refuses."""
    settings = Settings(redis_url=redis_url, submit_rate_limit="5/minute;7/hour")
    client = create_app(settings).test_client()
    environ = {"REMOTE_ADDR": "10.0.0.9"}
    for _ in range(3):
        assert (
            client.post("/v1/jobs", data=IMAGE, content_type="image/png", environ_base=environ).status_code
            == 202
        )
    conn = redis_from_url(redis_url)
    limiter = SlidingWindowCounterRateLimiter(
        RedisStorage("redis://", connection_pool=conn.connection_pool, key_prefix=LIMITS_PREFIX)
    )
    minute, hour = parse_many(settings.submit_rate_limit)

    assert limiter.get_window_stats(minute, "submit", "addr:10.0.0.9").remaining == 2
    assert limiter.get_window_stats(hour, "submit", "addr:10.0.0.9").remaining == 4
    assert limiter.hit(minute, "submit", "addr:10.0.0.9", cost=2)  # counted by limits itself
    refused = client.post("/v1/jobs", data=IMAGE, content_type="image/png", environ_base=environ)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    conn.close()


@pytest.mark.parametrize(
    ("module", "package", "version"),
    [("shared.rq_enqueue", "rq", "2.13.0"), ("api.fairness", "limits", "5.9.0")],
)
def test_another_rq_or_limits_version_stops_at_import(module: str, package: str, version: str) -> None:
    """The submit script writes RQ 2.12's enqueue and runs limits 5.8's script: an upgrade of either
    is refused where that knowledge lives, not discovered as a half-written job."""
    code = f"import {package}; {package}.__version__ = {version!r}; import {module}"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "ImportError" in run.stderr and version in run.stderr, run.stderr


def test_an_rq_enqueue_that_writes_more_stops_the_submit_with_nothing_stored(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An RQ whose enqueue also writes a registry entry (as a later version might): the submit is
    refused (500) before anything reaches Redis, rather than storing a job its readers see half of."""
    from rq.queue import Queue

    client = create_app(Settings(redis_url=redis_url)).test_client()
    assert post_job(client).status_code == 202
    before = {key: redis_conn.dump(key) for key in redis_conn.scan_iter("*") if b"limits" not in key}
    real_persist = Queue._persist_job

    def persist_and_register(self: Queue, job: Job, pipeline: Any, *args: Any, **kwargs: Any) -> None:
        real_persist(self, job, pipeline, *args, **kwargs)
        self.scheduled_job_registry.add(job, 60, pipeline=pipeline)

    monkeypatch.setattr(Queue, "_persist_job", persist_and_register)
    refused = post_job(client)
    monkeypatch.undo()

    assert refused.status_code == 500
    after = {key: redis_conn.dump(key) for key in redis_conn.scan_iter("*") if b"limits" not in key}
    assert after == before


class ReplyLosingProxy:
    """A TCP proxy to Redis that forwards the first `times` commands containing `trigger` and loses
    their replies: it closes the client's connection when the reply comes back, so the client cannot
    know whether the command ran (it did) and redis-py's retry sends it again."""

    def __init__(self, redis_port: int, trigger: bytes, times: int) -> None:
        self.redis_port = redis_port
        self.trigger = trigger
        self.lost = 0
        self.times = times
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        armed = False
        sockets = [client, server]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [])
                for source in readable:
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    if source is client:
                        armed = armed or (self.trigger in data and self.lost < self.times)
                        server.sendall(data)
                    elif armed:
                        self.lost += 1  # the reply of the command that ran
                        return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.listener.close()


def test_a_submit_whose_reply_is_lost_is_stored_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """redis-py sends a command again when its reply is lost (a dropped connection, a timeout): the
    submit's script, run twice, must not count the image twice or queue the job twice."""
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    warm = post_job(create_app(Settings(redis_url=redis_url)).test_client())  # the scripts are loaded
    assert warm.status_code == 202
    redis_conn.flushall()
    proxy = ReplyLosingProxy(redis_port, trigger=b"inferq:queued_images", times=2)
    try:
        client = create_app(Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0")).test_client()
        answer = post_job(client)
        idempotent = post_job(client, headers={"Idempotency-Key": "lost-reply"})
    finally:
        proxy.close()

    assert proxy.lost == 2  # each submit's script ran, its reply was lost, and it was sent again
    assert answer.status_code == idempotent.status_code == 202, answer.get_data(as_text=True)
    ids = [answer.json["id"], idempotent.json["id"]]
    assert redis_conn.lrange("rq:queue:inferq", 0, -1) == [job_id.encode() for job_id in ids]
    assert int(redis_conn.get("inferq:queued_bytes") or 0) == 2 * len(IMAGE)


@pytest.mark.slow
def test_the_worker_runs_jobs_submitted_in_one_script(photo_bytes: dict[str, bytes], tmp_path: Path) -> None:
    from launch.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server, service_stack(server.url, tmp_path) as stack:
        photo = photo_bytes["coffee.png"]

        def post(query: str = "", **headers: str) -> requests.Response:
            headers["Content-Type"] = "image/png"
            return requests.post(f"{stack.base}/v1/jobs{query}", data=photo, headers=headers, timeout=30)

        single = post()
        once = post("?priority=low", **{"Idempotency-Key": "k1"})
        again = post("?priority=low", **{"Idempotency-Key": "k1"})
        files = [("image", (name, photo_bytes[name])) for name in ("chelsea.png", "rocket.jpg")]
        batch = requests.post(f"{stack.base}/v1/batches", files=files, timeout=30)
        assert [r.status_code for r in (single, once, again, batch)] == [202] * 4
        assert again.json()["id"] == once.json()["id"]
        ids = [single.json()["id"], once.json()["id"], *(job["id"] for job in batch.json()["jobs"])]

        ended = [wait_job(stack.base, job_id) for job_id in ids]

        assert [view["status"] for view in ended] == ["finished"] * 4, ended
        assert all(view["result"]["predictions"] for view in ended)
        finished = {
            job_id.decode()
            for lane in ("high", "low")
            for job_id in stack.conn.zrange(
                make_queue(stack.conn, Settings(), lane).finished_job_registry.key, 0, -1
            )
        }
        assert finished == set(ids)
