"""`python -m launch.launcher` (what `make up` runs), end to end: embedded Redis, gunicorn and RQ's
worker pool from the Procfile, a classification, a SIGKILLed worker respawned, and a SIGTERM that
leaves no process and no server behind. Plus the cheap refusals and failure paths."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from launch.processes import alive, cmdline, descendants, free_port, port_open, proc_table, wait_until
from launch.supervisor import SAME_REQUEST_SECONDS
from shared.config import PROJECT_ROOT
from shared.redis_conn import redis_from_url
from tests.service import run_module

READY_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0


def _ppid(pid: int) -> int:
    return next((ppid for p, ppid, _ in proc_table() if p == pid), 0)


def pool_workers(root: int) -> tuple[int, list[int]]:
    """The `rq worker-pool` supervisor below `root` and its worker processes."""
    tree = descendants(root)
    pools = [
        pid for pid in tree if "worker-pool" in cmdline(pid) and "worker-pool" not in cmdline(_ppid(pid))
    ]
    assert len(pools) == 1, f"expected one worker pool below {root}, found {pools}"
    pool = pools[0]
    return pool, [pid for pid in tree if _ppid(pid) == pool]


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (zombies excluded)."""
    return [pid for pid, _ppid, state in proc_table() if state != "Z" and marker in cmdline(pid)]


# --- helpers ----------------------------------------------------------------------------------------


def launcher_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    dropped = ("REDIS_URL", "PYTHONPATH", "API_KEYS", "API_KEYS_FILE")
    env = {k: v for k, v in os.environ.items() if k.upper() not in dropped}
    env.update(
        {
            "HOST": "127.0.0.1",
            "DATA_DIR": str(tmp_path / "data"),
            "WORKERS": "1",
            "WEB_CONCURRENCY": "1",
            "TORCH_THREADS": "1",
            "LOG_LEVEL": "INFO",
        }
    )
    env.update(overrides)
    return env


def run_launcher(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.launcher", *args],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def classify(base: str, image: bytes) -> str:
    response = requests.post(
        f"{base}/v1/jobs", files={"image": ("coffee.png", image, "image/png")}, timeout=10
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    response = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": 20}, timeout=40)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "finished", body
    return str(body["result"]["predictions"][0]["label"])


def registered_worker_pids(redis_url: str, queue: str = "inferq") -> set[int]:
    """pids of the workers registered on `queue` whose registration has not expired."""
    conn = redis_from_url(redis_url)
    try:
        pids = set()
        for key in conn.smembers(f"rq:workers:{queue}"):
            pid = conn.hget(key, "pid")
            if pid is not None and conn.exists(key):
                pids.add(int(pid))
        return pids
    finally:
        conn.close()


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_serves_respawns_a_killed_worker_and_stops_cleanly(
    tmp_path: Path, photo_bytes: dict[str, bytes], artifact_dir: Path
) -> None:
    port, redis_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "launcher.log"
    env = launcher_env(tmp_path, PORT=str(port), EMBEDDED_REDIS_PORT=str(redis_port))
    started = time.monotonic()
    launcher = run_launcher(env, log)
    seen: dict[int, int] = {}  # every process of the launcher's tree, ever
    try:

        def ready() -> bool:
            assert launcher.poll() is None, f"launcher exited with {launcher.returncode}:\n{log.read_text()}"
            seen.update(descendants(launcher.pid))
            return "inferq ready at" in log.read_text(errors="replace")

        wait_until(ready, READY_TIMEOUT, interval=0.5, what="the launcher's ready line")
        cold_start = re.search(r"cold start ([\d.]+) s", log.read_text())
        print(
            f"launcher ready in {time.monotonic() - started:.1f} s (it says {cold_start and cold_start[1]} s)"
        )
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        assert f"curl -F image=@photo.jpg {base}/v1/jobs" in log.read_text()
        # Without keys the banner says the operator routes are open, and they are.
        assert "/rq and /metrics open: no keys are configured" in log.read_text()
        assert requests.get(f"{base}/rq/", timeout=10).status_code == 200
        assert requests.get(f"{base}/metrics", timeout=10).status_code == 200

        assert classify(base, photo_bytes["coffee.png"]) == "espresso"

        # SIGKILL the pool's worker: the pool forks a replacement, which loads the model and registers.
        seen.update(descendants(launcher.pid))
        _pool, workers = pool_workers(launcher.pid)
        assert len(workers) == 1, workers
        (victim,) = workers
        assert victim in registered_worker_pids(redis_url)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            seen.update(descendants(launcher.pid))
            _, now = pool_workers(launcher.pid)
            fresh = set(now) - {victim}
            return bool(fresh & registered_worker_pids(redis_url))

        wait_until(replaced, 120, interval=0.5, what="a replacement worker registered")
        assert classify(base, photo_bytes["coffee.png"]) == "espresso"

        # SIGTERM: everything stops, Redis last, exit 0.
        seen.update(descendants(launcher.pid))
        assert len(seen) >= 6, seen  # valkey, gunicorn (+1 worker), pool (+2 workers over time)
        stop_at = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(STOP_TIMEOUT)
        print(f"launcher stopped in {time.monotonic() - stop_at:.1f} s")
        assert code == 0, log.read_text()
        wait_until(
            lambda: not any(alive(pid, start) for pid, start in seen.items()), 5, what="no process left"
        )
        assert not port_open(redis_port), "the embedded Redis still listens"
        assert not port_open(port), "the api still listens"
        assert "stopped (SIGTERM)" in log.read_text()
    finally:
        _leave_nothing(launcher)
        for pid, start in seen.items():
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)


# --- refusals and failures (no model, a few seconds) -----------------------------------------------


def test_launcher_refuses_a_public_host_before_starting_anything(tmp_path: Path) -> None:
    env = launcher_env(tmp_path, HOST="0.0.0.0", PORT=str(free_port()))
    out = run_module("launch.launcher", env=env, timeout=60)
    assert out.returncode == 2
    assert "refusing to serve the api on 0.0.0.0" in out.stderr
    assert "loopback" in out.stderr and "API_KEYS" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists(), "nothing may be started (not even Redis)"


def test_a_process_that_exits_stops_everything_with_its_output(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("web: echo boom-from-web; sleep 1; exit 3\nworker: exec sleep 300\n")
    # REDIS_URL set: no embedded server; nothing connects to it.
    env = launcher_env(tmp_path, PORT=str(free_port()), REDIS_URL="redis://127.0.0.1:9/0")
    out = run_module(
        "launch.launcher", "--procfile", str(procfile), "--ready-timeout", "60", env=env, timeout=60
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "process 'web' exited with code 3 before the service was ready" in out.stderr
    assert "boom-from-web" in out.stderr.split("last", 1)[1]  # in the tail it shows
    sleeper = re.search(r"worker started \(pid=(\d+)\)", out.stdout)
    assert sleeper is not None, out.stdout
    assert not alive(int(sleeper[1])) or "sleep" not in cmdline(int(sleeper[1]))


def test_with_api_keys_a_public_host_is_allowed_and_readiness_times_out(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("web: exec sleep 300\n")  # never answers
    port = free_port()
    env = launcher_env(
        tmp_path, HOST="0.0.0.0", API_KEYS="k" * 32, PORT=str(port), REDIS_URL="redis://127.0.0.1:9/0"
    )
    started = time.monotonic()
    out = run_module(
        "launch.launcher", "--procfile", str(procfile), "--ready-timeout", "3", env=env, timeout=60
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"http://127.0.0.1:{port}/readyz did not answer 200 within 3 s" in out.stderr
    assert time.monotonic() - started < 30


# --- stopping while output flows ---------------------------------------------------------------------

# A WSGI app that answers 200 to everything (so readiness comes, and the readiness probe's own lines
# are exercised), and a process that prints as fast as it can.
_APP = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n"
_CHATTY = "import itertools\nfor i in itertools.count():\n    print('chatty', i, 'x' * 100, flush=True)\n"


def run_launcher_through_a_pipe(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """The launcher with its stdout on a pipe that is drained slowly, like a busy terminal: its
    writes block often, so a signal often lands while the launcher is inside a write."""
    log.touch()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.launcher", *args],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def drain() -> None:
        assert launcher.stdout is not None
        with log.open("ab") as out:
            while chunk := launcher.stdout.read1(4096):
                out.write(chunk)
                out.flush()
                time.sleep(0.001)

    threading.Thread(target=drain, daemon=True).start()
    return launcher


def _leave_nothing(launcher: subprocess.Popen[bytes], marker: Path | None = None) -> None:
    """After a test: the launcher reaped, and every process whose command line names `marker` killed."""
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait()
    for pid in processes_mentioning(str(marker)) if marker is not None else ():
        os.kill(pid, signal.SIGKILL)


def _chatty_procfile(folder: Path, queue: str) -> Path:
    """Real gunicorn, a real `rq worker-pool` (plain RQ workers: no model), and a flood of output.
    Every command line carries `folder`, so whatever survives can be found by it."""
    (folder / "app.py").write_text(_APP)
    (folder / "chatty.py").write_text(_CHATTY)
    procfile = folder / "Procfile"
    procfile.write_text(
        f"web: exec gunicorn --chdir {folder} --bind 127.0.0.1:$PORT --workers 1 --access-logfile - app:app\n"
        f'worker: RQ_REDIS_URL="$REDIS_URL" exec rq worker-pool --num-workers 1 '
        f"--worker-class rq.worker.SimpleWorker --path {folder} {queue}\n"
        f"chatty: exec python {folder}/chatty.py\n"
    )
    return procfile


def _stop_while_output_flows(folder: Path, sig: signal.Signals) -> None:
    folder.mkdir()
    procfile = _chatty_procfile(folder, f"chatty-{folder.name}")
    redis_port = free_port()
    # A short grace period: an RQ worker that gets its pool's stop signal while still starting up
    # can hang in RQ's shutdown; the launcher must then kill it (after API_GRACEFUL_TIMEOUT + margin).
    env = launcher_env(
        folder, PORT=str(free_port()), EMBEDDED_REDIS_PORT=str(redis_port), API_GRACEFUL_TIMEOUT="3"
    )
    log = folder / "launcher.log"
    launcher = run_launcher_through_a_pipe(env, log, "--procfile", str(procfile), "--ready-timeout", "120")
    try:
        wait_until(
            lambda: launcher.poll() is None and log.read_bytes().count(b"| chatty ") >= 2000,
            60,
            what="the chatty process's output flowing through the launcher",
        )
        # Land the signal at a different moment each round: before or after gunicorn and the pool
        # are up, mid-line or between lines.
        time.sleep(random.uniform(0, 1.5))
        assert port_open(redis_port), "the embedded Valkey should be running"
        launcher.send_signal(sig)
        code = launcher.wait(STOP_TIMEOUT)
        assert code == 0, log.read_text(errors="replace")[-2000:]
        assert f"stopped ({sig.name})" in log.read_text(errors="replace")
        wait_until(lambda: not processes_mentioning(str(folder)), 5, what="no process of this round left")
        assert not port_open(redis_port), "the embedded Valkey still listens"
    finally:
        _leave_nothing(launcher, folder)


@pytest.mark.parametrize("round_", range(20))
def test_sigterm_while_output_flows_stops_everything(tmp_path: Path, round_: int) -> None:
    _stop_while_output_flows(tmp_path / f"round{round_}", signal.SIGTERM)


def test_ctrl_c_while_output_flows_stops_everything(tmp_path: Path) -> None:
    _stop_while_output_flows(tmp_path / "ctrl-c", signal.SIGINT)


_STUBBORN = (
    'stubborn: exec python -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
    "print('ignoring SIGTERM', flush=True); time.sleep(300)\"\n"
)


@contextlib.contextmanager
def _stubborn_launcher(tmp_path: Path, grace: int) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """A launcher whose one process ignores SIGTERM: (launcher, its log, the process's pid)."""
    procfile = tmp_path / "Procfile"
    procfile.write_text(_STUBBORN)
    env = launcher_env(
        tmp_path, PORT=str(free_port()), REDIS_URL="redis://127.0.0.1:9/0", API_GRACEFUL_TIMEOUT=str(grace)
    )
    log = tmp_path / "launcher.log"
    launcher = run_launcher(env, log, "--procfile", str(procfile), "--ready-timeout", "120")
    try:
        wait_until(
            lambda: "ignoring SIGTERM" in log.read_text(errors="replace"), 30, what="the stubborn process up"
        )
        started = re.search(r"stubborn started \(pid=(\d+)\)", log.read_text())
        assert started is not None
        yield launcher, log, int(started[1])
    finally:
        _leave_nothing(launcher)


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    # Killed 1 + KILL_MARGIN_SECONDS s after the SIGTERM.
    with _stubborn_launcher(tmp_path, grace=1) as (launcher, log, stubborn):
        started = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(STOP_TIMEOUT) == 0
        assert time.monotonic() - started >= 10  # the grace period was honoured
        assert "stubborn did not stop within 11 s and was killed" in log.read_text()
        assert not alive(stubborn)


def test_a_second_signal_kills_at_once(tmp_path: Path) -> None:
    with _stubborn_launcher(tmp_path, grace=600) as (launcher, log, stubborn):
        launcher.send_signal(signal.SIGINT)
        time.sleep(SAME_REQUEST_SECONDS + 0.5)  # a deliberate second Ctrl-C, not a copy of the first
        assert launcher.poll() is None and alive(stubborn)  # waiting out the grace period
        started = time.monotonic()
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(STOP_TIMEOUT) == 0
        assert time.monotonic() - started < 5
        assert not alive(stubborn)
        assert "a second stop request: every process was killed at once" in log.read_text()


def test_a_third_signal_exits_even_when_the_console_is_never_read(tmp_path: Path) -> None:
    procfile = _chatty_procfile(tmp_path, "chatty-blocked")
    redis_port = free_port()
    env = launcher_env(tmp_path, PORT=str(free_port()), EMBEDDED_REDIS_PORT=str(redis_port))
    launcher = subprocess.Popen(  # stdout: a pipe nobody reads, so the launcher blocks writing to it
        [sys.executable, "-m", "launch.launcher", "--procfile", str(procfile), "--ready-timeout", "120"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(redis_port), 60, what="the embedded Valkey up")
        wait_until(lambda: len(processes_mentioning(str(tmp_path))) >= 4, 60, what="the processes up")
        time.sleep(1)  # the pipe is full by now: the launcher's main thread is stuck in a write
        for _ in range(3):  # three stop requests, each past the previous one's window
            launcher.send_signal(signal.SIGTERM)
            time.sleep(SAME_REQUEST_SECONDS + 0.3)
        assert launcher.wait(STOP_TIMEOUT) == 143
        wait_until(lambda: not processes_mentioning(str(tmp_path)), 30, what="no process left")
        assert not port_open(redis_port)
    finally:
        _leave_nothing(launcher, tmp_path)


def test_a_sigkilled_launcher_leaves_nothing_behind(tmp_path: Path) -> None:
    procfile = _chatty_procfile(tmp_path, "chatty-kill")
    redis_port = free_port()
    env = launcher_env(tmp_path, PORT=str(free_port()), EMBEDDED_REDIS_PORT=str(redis_port))
    log = tmp_path / "launcher.log"
    launcher = run_launcher(env, log, "--procfile", str(procfile), "--ready-timeout", "120")
    try:
        wait_until(lambda: "inferq ready at" in log.read_text(errors="replace"), 60, what="ready")
        wait_until(lambda: len(processes_mentioning(str(tmp_path))) >= 5, 30, what="every process up")
        launcher.kill()  # no handler runs: only the kernel's parent-death signal stops the children
        launcher.wait()
        wait_until(lambda: not processes_mentioning(str(tmp_path)), 30, what="no process left")
        assert not port_open(redis_port)
    finally:
        for pid in processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


# --- the banner -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "rule"),
    [
        ({}, "/rq and /metrics open: no keys are configured"),
        ({"API_KEYS": "k" * 32}, "/rq and /metrics closed: API_KEYS is set and OPERATOR_KEYS is not"),
        ({"API_KEYS": "k" * 32, "OPERATOR_KEYS": "o" * 32}, "/rq and /metrics need an OPERATOR_KEYS key"),
        ({"OPERATOR_KEYS": "o" * 32}, "/rq and /metrics need an OPERATOR_KEYS key"),
    ],
    ids=["no-keys", "api-keys", "both", "operator-keys"],
)
def test_the_banner_names_the_operator_routes_and_the_key_that_opens_them(
    tmp_path: Path, keys: dict[str, str], rule: str
) -> None:
    # (What the api really does with each configuration: tests/test_security.py; the banner of a
    # real api with and without keys: the end-to-end tests here and in tests/test_suspension.py.)
    (tmp_path / "app.py").write_text(_APP)
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"web: exec gunicorn --chdir {tmp_path} --bind 127.0.0.1:$PORT --workers 1 app:app\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = launcher_env(tmp_path, PORT=str(port), REDIS_URL="redis://127.0.0.1:9/0", **keys)
    log = tmp_path / "launcher.log"
    launcher = run_launcher(env, log, "--procfile", str(procfile), "--ready-timeout", "60")
    try:
        wait_until(lambda: "Ctrl-C stops" in log.read_text(errors="replace"), 60, what="the banner")
        banner = log.read_text(errors="replace")
        assert f"inferq ready at {base}" in banner
        assert f"dashboard: {base}/rq/" in banner and f"metrics:   {base}/metrics" in banner
        assert rule in banner, banner
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(STOP_TIMEOUT) == 0
    finally:
        _leave_nothing(launcher)
