"""`python -m launch.launcher`: what `make up` runs: the whole service on this machine (DESIGN 3).

1. Applies the api's bind rule (`api.bind_policy.check_bind_allowed`) before starting anything:
   without API keys it refuses a non-loopback `HOST`.
2. Starts the embedded Valkey server (AOF on, data under `DATA_DIR/redis`) unless `REDIS_URL` is
   set, and exports its URL to the processes it runs.
3. Runs the `Procfile` (gunicorn api + RQ's `worker-pool` of `BatchWorker`s, which respawns a
   worker that dies) with honcho's Python API, from the project root, with the current
   interpreter's bin dir first on PATH and the project root on PYTHONPATH.
4. Waits (at most `--ready-timeout`, 180 s) until `http://HOST:PORT/readyz` answers 200, printing
   progress; then prints the URL, an example and the cold-start time, and keeps running. If a
   process exits first, or readiness never comes, it stops everything and exits 1 with the tail
   of the processes' output.
5. On Ctrl-C / SIGTERM: honcho sends SIGTERM to each process group (gunicorn drains its requests,
   the pool stops its workers after their batch), waits for them, then the Redis server is stopped
   last and the launcher exits 0.

Process tree: launcher ─┬─ valkey-server (own process group; dies with the launcher: PDEATHSIG)
                        ├─ honcho runner ── gunicorn master ── gunicorn workers   (own session)
                        └─ honcho runner ── rq worker-pool ── BatchWorker × WORKERS (own session)
The runners and the commands they start ask the kernel to be signalled when their parent dies
(valkey-server too), and gunicorn and the pool stop their own children: so even a SIGKILLed
launcher leaves nothing running.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import honcho.manager
from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Message, Printer
from honcho.process import Popen, Process
from pydantic import ValidationError

from api.bind_policy import BindNotAllowed, check_bind_allowed
from launch.redis_server import load_prctl
from shared.config import PROJECT_ROOT, Settings, get_settings
from shared.redis_conn import redact_url

READY_TIMEOUT_SECONDS = 180.0
# Debian's libtcmalloc-minimal4 (`apt-get install libtcmalloc-minimal4`): see PRELOAD_TCMALLOC.
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
PROGRESS_EVERY_SECONDS = 10.0
TAIL_LINES = 40
# Extra seconds honcho waits, after gunicorn's own graceful timeout, before it SIGKILLs what is
# still running (honcho's default of 5 s would cut long-polls that gunicorn is draining).
KILL_MARGIN_SECONDS = 10
LAUNCHER_NAME = "launcher"
# The readiness probes carry this User-Agent, and their access-log lines are not shown: the
# launcher reports progress itself.
PROBE_USER_AGENT = "inferq-launcher-readyz"
# This many child processes of one Procfile process (pool workers, gunicorn workers) dying before
# the service is ready means a crash loop (e.g. no artifact): stop at once rather than at the timeout.
CRASH_LOOP_DEATHS = 3

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_PR_SET_PDEATHSIG = 1


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
            "PYTHONUNBUFFERED": "1",  # output reaches honcho (a pipe) line by line
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


# --- honcho, adapted ----------------------------------------------------------------------------


_prctl = load_prctl()


def _die_with_parent(sig: int, parent_pid: int) -> None:
    """Ask the kernel for `sig` when the parent (thread) dies; exit if it is already gone."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class _Process(Process):
    """honcho's runner of one Procfile line, tied to the launcher's life.

    The runner (a fork of the launcher) gets SIGKILL when the launcher dies, and the command it
    starts gets SIGTERM when the runner dies; so a SIGKILLed launcher still stops the api and the
    worker pool gracefully. (A graceful stop goes through honcho's SIGTERM to each process group.)
    """

    launcher_pid: int = 0  # set before the fork

    def run(self, events: Any = None, ignore_signals: bool = False) -> None:
        _die_with_parent(signal.SIGKILL, self.launcher_pid)
        runner_pid = os.getpid()
        self._child_ctor = partial(Popen, preexec_fn=partial(_die_with_parent, signal.SIGTERM, runner_pid))
        super().run(events, ignore_signals)


class _TailPrinter(Printer):
    """honcho's printer that also keeps the last lines of each process, and shares its lock with
    the launcher's own messages so lines never interleave."""

    def __init__(self, output: TextIO) -> None:
        super().__init__(output, colour=True, prefix=True)
        self.lock = threading.Lock()
        self.tails: dict[str, collections.deque[str]] = collections.defaultdict(
            partial(collections.deque, maxlen=TAIL_LINES)
        )

    def write(self, message: Message) -> None:
        data = message.data.decode("utf-8", "replace") if isinstance(message.data, bytes) else message.data
        lines = [line for line in data.splitlines() if PROBE_USER_AGENT not in line]
        if not lines:
            return
        with self.lock:
            if message.name not in (None, "system", LAUNCHER_NAME):
                self.tails[message.name].extend(lines)
            with contextlib.suppress(OSError, ValueError):  # stdout closed: keep running
                super().write(message._replace(data="\n".join(lines) + "\n"))

    def say(self, text: str) -> None:
        self.write(Message("line", text + "\n", datetime.datetime.now(), LAUNCHER_NAME, None))

    def raw(self, text: str) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.output.write(text)
            self.output.flush()


class _Supervisor(Manager):
    """honcho's Manager, plus: which signal (if any) asked it to stop, readiness polling started
    once the processes are forked, and the name of the first process that exited."""

    def __init__(
        self, printer: _TailPrinter, url: str, ready_timeout: float, started: float, auth: bool
    ) -> None:
        super().__init__(printer=printer)
        printer.width = max(printer.width, len(LAUNCHER_NAME))
        self._process_ctor = _Process
        self.printer = printer
        self.url = url
        self.ready_timeout = ready_timeout
        self.started = started
        self.auth = auth
        self.stop_signal: int | None = None
        self.failure: str | None = None
        self.ready_after: float | None = None
        self.first_exit: tuple[str, int] | None = None
        self.culprit: str | None = None  # the process whose output matters most on failure
        self._stopping = threading.Event()

    def _start(self) -> None:
        # Called by `loop()` right after it installed honcho's SIGINT/SIGTERM handlers: wrap them
        # to remember that the stop was asked for (then the launcher exits 0).
        for signum in (signal.SIGINT, signal.SIGTERM):
            honcho_handler = signal.getsignal(signum)

            def on_signal(signum: int, frame: Any, _honcho: Any = honcho_handler) -> None:
                if self.stop_signal is None and self.failure is None:
                    self.stop_signal = signum
                self._stopping.set()
                _honcho(signum, frame)

            signal.signal(signum, on_signal)
        for entry in self._processes.values():
            entry["obj"].launcher_pid = os.getpid()
        super()._start()
        # Only now (no fork follows) start a thread.
        threading.Thread(target=self._wait_ready, name="inferq-readiness", daemon=True).start()

    def _any_stopped(self) -> bool:
        # `loop()` asks this after every message until the first process stops: remember which.
        stopped = [n for n, p in self._processes.items() if p.get("returncode") is not None]
        if stopped and self.first_exit is None:
            name = next((n for n in stopped if self._processes[n]["returncode"] != 0), stopped[0])
            self.first_exit = (name, self._processes[name]["returncode"])
        return bool(stopped)

    def loop(self) -> None:
        try:
            super().loop()
        finally:
            self._stopping.set()
            for entry in self._processes.values():
                runner = entry.get("process")
                if runner is not None:
                    runner.join(timeout=5)

    def fail(self, reason: str) -> None:
        """From the readiness thread: record why, and stop everything via the main thread."""
        self.failure = reason
        os.kill(os.getpid(), signal.SIGTERM)

    def _wait_ready(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        opener.addheaders = [("User-Agent", PROBE_USER_AGENT)]
        readyz = f"{self.url}/readyz"
        deadline = self.started + self.ready_timeout
        next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
        deaths = _ChildDeaths()
        self.printer.say(f"waiting for {readyz} (at most {self.ready_timeout:.0f} s)")
        while not self._stopping.is_set():
            status, reason = _probe(opener, readyz)
            if status == 200:
                self.ready_after = time.monotonic() - self.started
                self._announce()
                return
            died = deaths.update({name: entry.get("pid") for name, entry in self._processes.items()})
            for name, count in died.items():
                if count >= CRASH_LOOP_DEATHS:
                    self.culprit = name
                    self.fail(
                        f"{count} processes started by {name!r} died before the service was ready "
                        "(a crash loop: see the output below)"
                    )
                    return
            now = time.monotonic()
            if now >= deadline:
                self.printer.say(f"not ready after {self.ready_timeout:.0f} s: {reason}")
                self.fail(f"{readyz} did not answer 200 within {self.ready_timeout:.0f} s ({reason})")
                return
            if now >= next_progress:
                self.printer.say(f"still waiting ({now - self.started:.0f} s): {reason}")
                next_progress = now + PROGRESS_EVERY_SECONDS
            self._stopping.wait(0.5)

    def _announce(self) -> None:
        key = "-H 'Authorization: Bearer <key>' " if self.auth else ""
        self.printer.raw(
            f"\ninferq ready at {self.url} (cold start {self.ready_after:.1f} s)\n"
            f"  submit:  curl {key}-F image=@photo.jpg {self.url}/v1/jobs\n"
            f"  result:  curl {key}'{self.url}/v1/jobs/<id>?wait=10'\n"
            f"  docs:    {self.url}/openapi.json\n"
            "Ctrl-C stops everything.\n\n"
        )


class _ChildDeaths:
    """Counts, per Procfile process, its child processes that have died (from /proc; Linux)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = collections.defaultdict(set)
        self.dead: dict[str, set[int]] = collections.defaultdict(set)

    def update(self, parents: dict[str, int | None]) -> dict[str, int]:
        by_pid = {pid: name for name, pid in parents.items() if pid}
        alive: dict[str, set[int]] = collections.defaultdict(set)
        for pid, ppid, state in _proc_table():
            if ppid in by_pid and state != "Z":
                alive[by_pid[ppid]].add(pid)
        for name in by_pid.values():
            self.dead[name] |= self.seen[name] - alive[name]
            self.seen[name] |= alive[name]
        return {name: len(pids) for name, pids in self.dead.items()}


def _proc_table() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, state) of every process, from /proc (nothing where there is no /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "
        yield int(text.split(" ", 1)[0]), int(fields[1]), fields[0]


def _probe(opener: urllib.request.OpenerDirector, url: str) -> tuple[int | None, str]:
    try:
        with opener.open(url, timeout=2) as response:
            return response.status, "ready"
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read() or b"{}").get("reason") or f"HTTP {exc.code}"
        except (ValueError, AttributeError, OSError):
            reason = f"HTTP {exc.code}"
        return exc.code, str(reason)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return None, f"the api does not answer yet ({getattr(exc, 'reason', exc)})"


# --- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis(settings: Settings, printer: _TailPrinter) -> Iterator[str]:
    """The URL of the Redis to use: REDIS_URL, or an embedded server for the duration."""
    if settings.redis_url:
        printer.say(f"using Redis at {redact_url(settings.redis_url)} (REDIS_URL)")
        yield settings.redis_url
        return
    from launch.redis_server import EmbeddedRedis

    server = EmbeddedRedis.from_settings(settings)  # from the main thread: PDEATHSIG is per thread
    with server:
        printer.say(f"embedded Valkey at {server.url}, AOF in {server.data_dir}")
        try:
            yield server.url
        finally:
            printer.say("stopping the embedded Valkey server")


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

    # Until honcho installs its handlers, a stop request unwinds through the `with` below.
    def early_stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, early_stop)
    honcho.manager.KILL_WAIT = settings.api_graceful_timeout + KILL_MARGIN_SECONDS
    printer = _TailPrinter(sys.stdout)
    url = base_url(settings.host, settings.port)
    try:
        with _redis(settings, printer) as redis_url:
            env = child_env(settings, redis_url)
            supervisor = _Supervisor(printer, url, args.ready_timeout, started, settings.auth_enabled)
            for name, command in processes.items():
                supervisor.add_process(name, command, env=env, cwd=str(PROJECT_ROOT))
            supervisor.loop()
    except KeyboardInterrupt:
        print("stopped before the processes started", file=sys.stderr)
        return EXIT_OK
    except Exception as exc:  # EmbeddedRedisError and the like: say it in one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if supervisor.stop_signal is not None:
        killed = [n for n, p in supervisor._processes.items() if p.get("returncode") == -signal.SIGKILL]
        if killed:
            waited = honcho.manager.KILL_WAIT
            printer.say(f"warning: {', '.join(killed)} did not stop within {waited} s and was killed")
        printer.say(f"stopped ({signal.Signals(supervisor.stop_signal).name})")
        return EXIT_OK
    if supervisor.failure is not None:
        print(f"error: {supervisor.failure}", file=sys.stderr)
        # The culprit's output last, where the eye lands.
        for name in sorted(printer.tails, key=lambda n: n == supervisor.culprit):
            _print_tail(name, printer.tails[name])
        return EXIT_FAILED
    name, code = supervisor.first_exit or ("?", None)
    when = "after" if supervisor.ready_after is not None else "before"
    print(f"error: process {name!r} exited with code {code} {when} the service was ready", file=sys.stderr)
    _print_tail(name, printer.tails.get(name, ()))
    return EXIT_FAILED


def _print_tail(name: str, tail: Any) -> None:
    lines = list(tail)
    print(f"--- last {len(lines)} lines of {name} ---", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
