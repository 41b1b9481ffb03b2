"""`rq suspend` / `rq resume` (RQ's own CLI) against a real Redis: a suspended worker takes no batch,
not even on its way out after a SIGTERM; /readyz says the workers are suspended; and `make up`'s
launcher, started on a Redis that kept `rq:suspended` in its AOF, says so and how to resume."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis
import requests
from rq.serializers import JSONSerializer
from rq.worker import Worker

from api import create_app
from launch.processes import free_port, wait_until
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import make_queue, submit
from shared.keys import grabbed_key
from tests.service import post_image, service_env, stop, views
from tests.test_launcher import _leave_nothing, launcher_env, run_launcher
from tests.test_worker_faults import start_stub_worker, worker_states
from tests.worker_stub import png

RQ = Path(sys.executable).parent / "rq"


def rq_cli(command: str, url: str) -> None:
    """`rq suspend|resume --url <url>`: RQ's command-line tool, as an operator runs it."""
    done = subprocess.run([str(RQ), command, "--url", url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_suspended_worker_stops_on_sigterm_without_taking_a_batch(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url)
    worker = start_stub_worker(service_env(server.url), tmp_path / "worker.log")
    try:
        wait_until(lambda: bool(conn.smembers("rq:workers")), 60, 0.1, "the worker registered")
        rq_cli("suspend", server.url)
        wait_until(lambda: worker_states(conn) == {b"suspended"}, 30, 0.1, "the worker suspended")
        queue = make_queue(conn, settings)
        ids = [submit(queue, png(20 + i), 1, settings).id for i in range(4)]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert [v["status"] for v in views(conn, ids)] == ["queued"] * 4, "a batch was taken while suspended"
        assert queue.count == 4
        assert not list(conn.scan_iter(grabbed_key("*", "*")))
        assert not conn.smembers("rq:workers")
    finally:
        stop(worker)
        conn.close()


def test_readyz_says_the_workers_are_suspended(redis_url: str) -> None:
    client = create_app(Settings(redis_url=redis_url)).test_client()
    worker_conn = redis.Redis.from_url(redis_url)
    worker = Worker(["inferq"], connection=worker_conn, serializer=JSONSerializer)
    worker.register_birth()
    try:
        assert client.get("/readyz").status_code == 200
        rq_cli("suspend", redis_url)
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        body = response.json
        assert body is not None and set(body) == {"status", "reason"}
        assert body["status"] == "suspended"
        assert "suspended" in body["reason"] and "rq resume" in body["reason"]
        assert not re.search(r"\d", body["reason"]), "an unauthenticated probe gets no counts"
        rq_cli("resume", redis_url)
        assert client.get("/readyz").status_code == 200
    finally:
        worker.register_death()
        worker_conn.close()


OPERATOR_KEY = "o" * 32
# The real api, and a worker without a model (it registers at once): the launcher's banner, not the
# model, is under test.
_PROCFILE = (
    "web: exec gunicorn --config api/gunicorn_conf.py api.wsgi:app\n"
    "worker: exec python -m tests.worker_stub\n"
)


def test_make_up_on_a_redis_that_kept_a_suspension_says_so_and_how_to_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # An earlier run's `rq suspend`, kept in the embedded Redis' AOF (where `make up` keeps it).
    with EmbeddedRedis(data / "redis", appendonly=True) as earlier:
        rq_cli("suspend", earlier.url)
    procfile = tmp_path / "Procfile"
    procfile.write_text(_PROCFILE)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = launcher_env(tmp_path, PORT=str(port), OPERATOR_KEYS=OPERATOR_KEY, TMPDIR=str(tmp_path))
    log = tmp_path / "launcher.log"
    launcher = run_launcher(env, log, "--procfile", str(procfile), "--ready-timeout", "120")
    try:

        def announced() -> bool:
            assert launcher.poll() is None, log.read_text()
            return "Ctrl-C stops" in log.read_text(errors="replace")

        wait_until(announced, 120, 0.2, "the launcher's banner")
        banner = log.read_text(errors="replace")
        assert f"inferq up at {base}" in banner and "the workers are suspended" in banner, banner
        assert "inferq ready at" not in banner
        readyz = requests.get(f"{base}/readyz", timeout=5)
        assert readyz.status_code == 503 and readyz.json()["status"] == "suspended"

        # The banner names the operator routes and the key that opens them; the api agrees.
        assert f"dashboard: {base}/rq/" in banner and f"metrics:   {base}/metrics" in banner
        assert "/rq and /metrics need an OPERATOR_KEYS key" in banner
        operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        for route in ("/rq/", "/metrics"):
            assert requests.get(base + route, timeout=10).status_code == 401
            assert requests.get(base + route, headers=operator, timeout=10).status_code == 200

        # Its resume command, run as printed, resumes the workers: ready, and a job runs.
        resume = re.search(r"^  resume: +(.+)$", banner, re.MULTILINE)
        assert resume is not None, banner
        done = subprocess.run(shlex.split(resume[1]), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        job = post_image(base, png(40)).json()["id"]
        answer = requests.get(f"{base}/v1/jobs/{job}", params={"wait": 20}, timeout=40).json()
        assert answer["status"] == "finished", answer
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    finally:
        _leave_nothing(launcher)
