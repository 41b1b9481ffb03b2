"""gunicorn settings of the api, all derived from shared.config (environment variables).

Run: `gunicorn --config api/gunicorn_conf.py api.wsgi:app` from the project root.

- gevent workers (`api.gevent_worker`, which says why, and how slow clients are cut off): a connection,
  idle, slow or long-polling, costs a greenlet and a file descriptor; API_WORKER_CONNECTIONS per process.
  A long-poll waits on the process's one completion listener (`api.long_poll`), not in Redis.
- Prometheus multi-process mode: each process writes its samples to PROMETHEUS_MULTIPROC_DIR and a
  scrape of any process adds them up; the directory is wiped at start (stale files of a previous
  run would be added in) and a dead process's live gauges are dropped in `child_exit`.
- The bind rule (`shared.bind_policy.check_bind_allowed`): without API keys, only loopback addresses.
  Checked in `on_starting` against the addresses gunicorn will really bind (a `--bind` on the
  command line or in GUNICORN_CMD_ARGS overrides HOST:PORT), before any socket is opened.
- Logs: gunicorn's error and access logs go through `shared.log_redaction` (Authorization values and
  Redis URL passwords are masked), re-installed whenever gunicorn rebuilds its handlers; with
  LOG_FORMAT=json (the default) they are JSON lines like the app's (`shared.logging_setup`).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

# gunicorn executes this file by path: make the project importable whatever the cwd.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from gevent.monkey import MonkeyPatchWarning  # noqa: E402
from gunicorn.glogging import Logger as _GunicornLogger  # noqa: E402

# gunicorn's gevent worker patches the standard library in each worker, after this file and what it
# imports are loaded; `import redis` also loads redis-py's asyncio client, which binds ssl names at
# import, and gevent warns about them on every worker start. The api never uses that client; its
# sync client looks `ssl` up at call time, so it gets the patched module.
warnings.filterwarnings("ignore", message=r"Monkey-patching ssl after ssl", category=MonkeyPatchWarning)

from shared.bind_policy import BindNotAllowed, check_bind_allowed  # noqa: E402
from shared.config import get_settings  # noqa: E402

_settings = get_settings()

# --- Prometheus multi-process directory (must be in the environment before any worker imports
# prometheus_client: workers fork from this master and load the app afterwards) ------------------
_owned_metrics_dir: str | None = None
if _settings.prometheus_multiproc_dir is not None:
    _metrics_dir = str(_settings.prometheus_multiproc_dir)
    os.makedirs(_metrics_dir, exist_ok=True)
else:
    _metrics_dir = _owned_metrics_dir = tempfile.mkdtemp(prefix="inferq-prometheus-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

# --- Server -------------------------------------------------------------------------------------
bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.web_concurrency
worker_class = "api.gevent_worker.InferqGeventWorker"
worker_connections = _settings.api_worker_connections
# Seconds without a heartbeat from a worker's main loop before the master kills it (not a request
# timeout: the heartbeat runs in its own greenlet, so long-polls may outlive it by design).
timeout = 30
# After SIGTERM, in-flight requests (long-polls included) get this long to finish.
graceful_timeout = _settings.api_graceful_timeout
# Idle keep-alive limit; also gunicorn's header-read limit, which api.gevent_worker replaces for new
# connections with API_HEADER_TIMEOUT. Must not be 0: gunicorn would then read headers without a limit.
keepalive = _settings.api_keepalive
# Restart a process after this many requests (0 = never), jittered so processes do not restart together.
max_requests = _settings.api_max_requests
max_requests_jitter = _settings.api_max_requests // 10
# The heartbeat file lives in RAM: a slow disk must not make a healthy worker look dead.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
proc_name = "inferq-api"
# gunicorn 27's control socket defaults to one path per user: several api servers (tests, `make up`)
# would fight over it, and nothing here uses it.
control_socket_disable = True

# --- Logging ------------------------------------------------------------------------------------
loglevel = _settings.log_level.lower()
errorlog = "-"
accesslog = "-" if _settings.api_access_log else None
# client, request line, status, response bytes, duration in ms, user agent.
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms "%(a)s"'


# Atoms `RedactingLogger.atoms` builds by itself (those of `access_log_format` above); a format that
# uses any other (e.g. a request header, through GUNICORN_CMD_ARGS) gets gunicorn's full set.
_CHEAP_ATOMS = frozenset("hrsBMa")
_ATOM_RE = re.compile(r"%\(([^)]*)\)")


@functools.lru_cache(maxsize=8)
def _uses_cheap_atoms_only(access_format: str) -> bool:
    used = set(_ATOM_RE.findall(access_format))
    return bool(used) and used <= _CHEAP_ATOMS


class RedactingLogger(_GunicornLogger):
    """gunicorn's logger, with the secret-redacting filter on its handlers (after every setup)."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict[str, Any]:
        # gunicorn builds every atom for each access-log line, every request header and environ
        # variable included, whatever the format uses: a large share of an access line's cost.
        # The project's format (or any format using only these atoms) gets just what it prints.
        if not _uses_cheap_atoms_only(self.cfg.access_log_format):
            return super().atoms(resp, req, environ, request_time)  # type: ignore[no-any-return]
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        return {
            "h": environ.get("REMOTE_ADDR", "-"),
            "r": f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}",
            "s": status,
            "B": getattr(resp, "sent", None),
            "M": request_time.seconds * 1000 + int(request_time.microseconds / 1000),
            "a": environ.get("HTTP_USER_AGENT", "-"),
        }

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # Imported here: `api` must not be imported before PROMETHEUS_MULTIPROC_DIR is set (above).
        from shared.log_redaction import install_redaction

        install_redaction(self.error_log, self.access_log)
        # LOG_FORMAT=json: gunicorn's own lines (errors, access log) are JSON lines too.
        from shared.logging_setup import apply_to_handlers, set_log_context

        set_log_context(service="api")
        apply_to_handlers([*self.error_log.handlers, *self.access_log.handlers], _settings.log_format)
        from shared.logging_setup import direct_json_handlers, write_json_line

        self._direct_access = (
            direct_json_handlers(self.access_log) if _settings.log_format == "json" else None
        )
        self._write_json_line = write_json_line

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        # One line per request: written directly when the handlers are the project's own JSON ones
        # (the same line, redacted the same way), else through `logging` as gunicorn does.
        direct = getattr(self, "_direct_access", None)
        if direct is None or not self.access_log_enabled or not self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)
            return
        try:
            atoms = self.atoms_wrapper_class(self.atoms(resp, req, environ, request_time))
            self._write_json_line(
                direct, self.access_log.name, logging.INFO, self.cfg.access_log_format % atoms
            )
        except Exception:
            self.error(traceback.format_exc())


logger_class = RedactingLogger


# --- Hooks ----------------------------------------------------------------------------------------
def on_starting(server: Any) -> None:
    # Before anything listens: the api may only be public with API keys. gunicorn prints a
    # RuntimeError raised here as "Error: <message>" and exits 1.
    try:
        for address in server.cfg.address:
            if isinstance(address, tuple):  # (host, port); a unix socket path (str) or fd (int) is local
                check_bind_allowed(_settings, host=str(address[0]))
    except BindNotAllowed:
        if _owned_metrics_dir is not None:
            shutil.rmtree(_owned_metrics_dir, ignore_errors=True)
        raise
    # Files of processes from a previous run would be summed into this run's counters.
    for entry in Path(_metrics_dir).glob("*.db"):
        entry.unlink(missing_ok=True)
    server.log.info("prometheus multiprocess dir: %s", _metrics_dir)


def post_worker_init(worker: Any) -> None:
    """The app is loaded: freeze what exists (tens of thousands of objects, walked by every full
    collection with the GIL held) out of the garbage collector's reach, so a collection no longer
    stalls every request thread."""
    gc.collect()
    gc.freeze()


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker itself: flush the logs and end the process here. Left to the interpreter's own
    shutdown, gevent's patched `threading` is torn down before logging's handler weakrefs, which then
    print tracebacks on the way out."""
    if os.getpid() != worker.pid:
        return  # gunicorn also calls this hook in the master, after it reaped a worker
    exc = sys.exc_info()[1]
    code = exc.code if isinstance(exc, SystemExit) else 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _owned_metrics_dir is not None:
        shutil.rmtree(_owned_metrics_dir, ignore_errors=True)
