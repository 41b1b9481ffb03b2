"""`python -m launch.launcher`: what `make up` runs: the whole service on this machine.

1. Applies the api's bind rule (`shared.bind_policy.check_bind_allowed`) before starting anything:
   without API keys it refuses a non-loopback `HOST`.
2. Starts the embedded Valkey server (AOF on, data under `DATA_DIR/redis`) unless `REDIS_URL` is
   set, and exports its URL to the processes it runs.
3. Runs the `Procfile` (gunicorn api + RQ's `worker-pool` of `BatchWorker`s, which respawns a
   worker that dies) under `launch.supervisor`, from the project root, with the current
   interpreter's bin dir first on PATH and the project root on PYTHONPATH.
4. Waits (at most `--ready-timeout`, 180 s) until `http://HOST:PORT/readyz` answers 200, printing
   progress; then prints the URL, examples, where the dashboard (/rq) and /metrics are and which
   key opens them, and the cold-start time, and keeps running. A /readyz that answers 503 because
   the workers are suspended (`rq:suspended`, which the embedded Redis keeps in its AOF) counts as
   up: the banner then says so, with the `rq resume` command. If a process exits first, or
   readiness never comes, it stops everything and exits 1 with the tail of the processes' output.
5. On Ctrl-C / SIGTERM (whatever is being printed at that moment): SIGTERM to each process group
   (gunicorn drains its requests, the pool stops its workers after their batch), SIGKILL to what
   is left after `API_GRACEFUL_TIMEOUT` + a margin; the Redis server is stopped last and the
   launcher exits 0. Signals within `SAME_REQUEST_SECONDS` (1 s) of the first are copies of the same
   stop request (`kill -TERM -- -<pgid>` on `make up` reaches the launcher twice: make forwards it);
   a second request (a Ctrl-C 1 s or more later) kills the processes at once; a third exits the
   launcher at once.

Process tree: launcher ─┬─ valkey-server (own process group)
                        ├─ gunicorn master ── gunicorn workers         (own session)
                        └─ rq worker-pool ── BatchWorker × WORKERS      (own session)
Each child asks the kernel for SIGTERM when the launcher dies (PR_SET_PDEATHSIG), and gunicorn
and the pool stop their own children: so even a SIGKILLed launcher leaves nothing running.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from honcho.environ import parse_procfile
from pydantic import ValidationError

from launch.processes import TCMALLOC, proc_table
from launch.supervisor import SAME_REQUEST_SECONDS, Child, Event, Supervisor
from shared.bind_policy import BindNotAllowed, check_bind_allowed
from shared.config import PROJECT_ROOT, Settings, get_settings
from shared.redis_conn import redact_url

READY_TIMEOUT_SECONDS = 180.0
PROGRESS_EVERY_SECONDS = 10.0
# Extra seconds, after gunicorn's own graceful timeout, before what still runs is SIGKILLed (a
# shorter wait would cut long-polls that gunicorn is draining).
KILL_MARGIN_SECONDS = 10
# The readiness probes carry this User-Agent, and their access-log lines are not shown: the
# launcher reports progress itself.
PROBE_USER_AGENT = "inferq-launcher-readyz"
# /readyz's `status` while the workers are suspended (api/health.py): the service is up all the same.
READYZ_SUSPENDED = "suspended"
# This many child processes of one Procfile process (pool workers, gunicorn workers) dying before
# the service is ready means a crash loop (e.g. no artifact): stop at once rather than at the timeout.
CRASH_LOOP_DEATHS = 3

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class LauncherError(RuntimeError):
    """A setting the launcher refuses, with the message to show."""


# --- checks -------------------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly when something already listens on HOST:PORT (gunicorn would retry
    for 5 s, then exit with a less obvious message)."""
    host = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LauncherError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (set PORT)") from None


def base_url(host: str, port: int) -> str:
    """The URL this machine reaches the api at (the wildcard addresses mean every interface,
    loopback included)."""
    host = host.strip().strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# --- environment of the processes ------------------------------------------------------------


def child_env(settings: Settings, redis_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment plus what the Procfile's processes need.

    The settings the Procfile's shell expands itself (`${WORKERS}`, ...) and those the launcher
    polls (HOST, PORT) are exported under their canonical names, so `workers=2` (settings are
    case-insensitive) or a default means the same to every process.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's bin/python is a symlink
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PROJECT_ROOT)]
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, *path]),
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *pythonpath]),
            "PYTHONUNBUFFERED": "1",  # output reaches the supervisor (a pipe) line by line
            "REDIS_URL": redis_url,
            "HOST": settings.host,
            "PORT": str(settings.port),
            "WORKERS": str(settings.workers),
            "QUEUE_NAME": settings.queue_name,
            "LOG_LEVEL": settings.log_level,
        }
    )
    # A person reads `make up`'s console: readable lines unless JSON was asked for explicitly.
    env.setdefault("LOG_FORMAT", "text")
    if settings.preload_tcmalloc and TCMALLOC.exists() and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = str(TCMALLOC)
    return env


# --- readiness ------------------------------------------------------------------------------------


class Readiness:
    """Polls `/readyz` from a thread of its own until it answers 200, the timeout, or a crash loop;
    it only posts events: the main loop does all the printing and the stopping."""

    def __init__(self, supervisor: Supervisor, url: str, timeout: float, started: float) -> None:
        self.supervisor = supervisor
        self.url = url
        self.timeout = timeout
        self.started = started
        self.done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="inferq-readiness", daemon=True).start()

    def _say(self, text: str) -> None:
        self.supervisor.post(Event("say", text))

    def _run(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        opener.addheaders = [("User-Agent", PROBE_USER_AGENT)]
        readyz = f"{self.url}/readyz"
        deadline = self.started + self.timeout
        next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
        deaths = _ChildDeaths()
        self._say(f"waiting for {readyz} (at most {self.timeout:.0f} s)")
        while not self.done.is_set():
            code, status, reason = _probe(opener, readyz)
            if code == 200 or (code == 503 and status == READYZ_SUSPENDED):
                # Suspended workers are up (and may stay suspended for good): announce them, saying so.
                kind = "ready" if code == 200 else "suspended"
                self.supervisor.post(Event(kind, f"{time.monotonic() - self.started:.1f}"))
                return
            died = deaths.update({c.name: c.pid for c in self.supervisor.children.values()})
            for name, count in died.items():
                if count >= CRASH_LOOP_DEATHS:
                    reason = (
                        f"{count} processes started by {name!r} died before the service was ready "
                        "(a crash loop: see the output below)"
                    )
                    self.supervisor.post(Event("fail", reason, culprit=name))
                    return
            now = time.monotonic()
            if now >= deadline:
                self._say(f"not ready after {self.timeout:.0f} s: {reason}")
                self.supervisor.post(
                    Event("fail", f"{readyz} did not answer 200 within {self.timeout:.0f} s ({reason})")
                )
                return
            if now >= next_progress:
                self._say(f"still waiting ({now - self.started:.0f} s): {reason}")
                next_progress = now + PROGRESS_EVERY_SECONDS
            self.done.wait(0.5)


def operator_routes(settings: Settings) -> str:
    """Who /rq and /metrics let in, as `api.auth.authenticate_operator` decides."""
    if settings.operator_keys:
        return (
            "need an OPERATOR_KEYS key (-H 'Authorization: Bearer <operator key>'; a browser logs in "
            "to /rq with HTTP Basic: any user name, the key as password)"
        )
    if settings.auth_enabled:
        return "closed: API_KEYS is set and OPERATOR_KEYS is not (tenant keys do not open them)"
    return "open: no keys are configured (the api listens on loopback only)"


def resume_command(redis_url: str) -> str:
    """The `rq resume` that lifts a suspension on this Redis (its password, if any, masked)."""
    rq = Path(sys.executable).parent / "rq"  # the rq of this environment, on PATH or not
    return f"{shlex.quote(str(rq)) if rq.exists() else 'rq'} resume --url {redact_url(redis_url)}"


def announcement(url: str, cold_start: str, settings: Settings, redis_url: str, suspended: bool) -> str:
    key = "-H 'Authorization: Bearer <key>' " if settings.auth_enabled else ""
    if suspended:
        head = (
            f"\ninferq up at {url} (cold start {cold_start} s), but the workers are suspended "
            "(rq:suspended is set, by `rq suspend`; Redis keeps it across restarts): they take no job and "
            "/readyz answers 503 until you run\n"
            f"  resume:    {resume_command(redis_url)}\n"
        )
    else:
        head = f"\ninferq ready at {url} (cold start {cold_start} s)\n"
    return (
        f"{head}"
        f"  submit:    curl {key}-F image=@photo.jpg {url}/v1/jobs\n"
        f"  result:    curl {key}'{url}/v1/jobs/<id>?wait=10'\n"
        f"  docs:      {url}/openapi.json\n"
        f"  dashboard: {url}/rq/\n"
        f"  metrics:   {url}/metrics\n"
        f"  /rq and /metrics {operator_routes(settings)}\n"
        f"Ctrl-C stops everything gracefully; a second Ctrl-C, {SAME_REQUEST_SECONDS:g} s or more later, "
        "kills at once.\n\n"
    )


class _ChildDeaths:
    """Counts, per Procfile process, its child processes that have died (from /proc; Linux)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = collections.defaultdict(set)
        self.dead: dict[str, set[int]] = collections.defaultdict(set)

    def update(self, parents: dict[str, int | None]) -> dict[str, int]:
        by_pid = {pid: name for name, pid in parents.items() if pid}
        alive: dict[str, set[int]] = collections.defaultdict(set)
        for pid, ppid, state in proc_table():
            if ppid in by_pid and state != "Z":
                alive[by_pid[ppid]].add(pid)
        for name in by_pid.values():
            self.dead[name] |= self.seen[name] - alive[name]
            self.seen[name] |= alive[name]
        return {name: len(pids) for name, pids in self.dead.items()}


def _probe(opener: urllib.request.OpenerDirector, url: str) -> tuple[int | None, str | None, str]:
    """/readyz's HTTP status, the `status` of its body and its reason (None, None, why: no answer)."""
    try:
        with opener.open(url, timeout=2) as response:
            return response.status, "ok", "ready"
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
            status, reason = body.get("status"), body.get("reason") or f"HTTP {exc.code}"
        except (ValueError, AttributeError, OSError):
            status, reason = None, f"HTTP {exc.code}"
        return exc.code, status if isinstance(status, str) else None, str(reason)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return None, None, f"the api does not answer yet ({getattr(exc, 'reason', exc)})"


# --- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis(settings: Settings, supervisor: Supervisor) -> Iterator[str]:
    """The URL of the Redis to use: REDIS_URL, or an embedded server for the duration."""
    if settings.redis_url:
        supervisor.say(f"using Redis at {redact_url(settings.redis_url)} (REDIS_URL)")
        yield settings.redis_url
        return
    from launch.redis_server import EmbeddedRedis

    server = EmbeddedRedis.from_settings(settings)  # from the main thread: PDEATHSIG is per thread
    with server:
        supervisor.say(f"embedded Valkey at {server.url}, AOF in {server.data_dir}")
        try:
            yield server.url
        finally:
            supervisor.say("stopping the embedded Valkey server")


@dataclass
class Outcome:
    """How supervision ended: a stop signal, a failure (with the process to blame), or an exit."""

    stop_signal: int | None = None
    failure: str | None = None
    culprit: str | None = None
    exited: Child | None = None
    ready_after: str | None = None
    killed: list[str] = field(default_factory=list)


def supervise(
    supervisor: Supervisor,
    processes: dict[str, str],
    env: dict[str, str],
    url: str,
    ready_timeout: float,
    started: float,
    settings: Settings,
    kill_after: float,
) -> Outcome:
    """Start the Procfile's processes, announce readiness, and run until a stop; stop them all."""
    outcome = Outcome()
    readiness = Readiness(supervisor, url, ready_timeout, started)

    def on_event(event: Event) -> bool:
        if event.kind == "say":
            supervisor.say(event.text)
        elif event.kind in ("ready", "suspended"):
            outcome.ready_after = event.text
            suspended = event.kind == "suspended"
            supervisor.raw(announcement(url, event.text, settings, env["REDIS_URL"], suspended))
        elif event.kind == "fail":
            outcome.failure, outcome.culprit = event.text, event.culprit
            return True
        return False

    try:
        for name, command in processes.items():
            if supervisor.stopping:
                break
            supervisor.start(name, command, env, PROJECT_ROOT)
        if not supervisor.stopping:
            readiness.start()  # only now: no fork follows
            outcome.exited = supervisor.run(on_event)
    finally:
        readiness.done.set()
        outcome.stop_signal = supervisor.stop_signal
        outcome.killed = supervisor.stop(kill_after)
    return outcome


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m launch.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--procfile", type=Path, default=PROJECT_ROOT / "Procfile")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_SECONDS,
        help="seconds to wait for /readyz before giving up (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"error: invalid settings in the environment:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_bind_allowed(settings)
        check_port_free(settings.host, settings.port)
        processes = parse_procfile(args.procfile.read_text(encoding="utf-8")).processes
    except (BindNotAllowed, LauncherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: cannot read the Procfile: {exc}", file=sys.stderr)
        return EXIT_USAGE

    supervisor = Supervisor(sys.stdout, list(processes), hide=lambda line: PROBE_USER_AGENT in line)
    url = base_url(settings.host, settings.port)
    # gunicorn drains its requests for API_GRACEFUL_TIMEOUT; only after that (and a margin) is
    # anything still running killed.
    kill_after = settings.api_graceful_timeout + KILL_MARGIN_SECONDS
    supervisor.install_signal_handlers()
    try:
        with _redis(settings, supervisor) as redis_url:
            if supervisor.stopping:
                print("stopped before the processes started", file=sys.stderr)
                return EXIT_OK
            env = child_env(settings, redis_url)
            outcome = supervise(
                supervisor,
                processes,
                env,
                url,
                args.ready_timeout,
                started,
                settings,
                kill_after,
            )
    except Exception as exc:  # EmbeddedRedisError and the like: say it in one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        supervisor.restore_signal_handlers()
        supervisor.close()

    if outcome.stop_signal is not None:
        if outcome.killed:
            supervisor.say(
                f"warning: {', '.join(outcome.killed)} did not stop within {kill_after:.0f} s and was killed"
            )
        if supervisor.stop_requests > 1:
            supervisor.say("a second stop request: every process was killed at once")
        supervisor.say(f"stopped ({signal.Signals(outcome.stop_signal).name})")
        return EXIT_OK
    tails = {name: child.tail for name, child in supervisor.children.items()}
    if outcome.failure is not None:
        print(f"error: {outcome.failure}", file=sys.stderr)
        # The culprit's output last, where the eye lands.
        for name in sorted(tails, key=lambda n: n == outcome.culprit):
            _print_tail(name, tails[name])
        return EXIT_FAILED
    exited = outcome.exited
    name, code = (exited.name, exited.returncode) if exited is not None else ("?", None)
    when = "after" if outcome.ready_after is not None else "before"
    print(f"error: process {name!r} exited with code {code} {when} the service was ready", file=sys.stderr)
    _print_tail(name, tails.get(name, ()))
    return EXIT_FAILED


def _print_tail(name: str, tail: Iterable[str]) -> None:
    lines = list(tail)
    print(f"--- last {len(lines)} lines of {name} ---", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
