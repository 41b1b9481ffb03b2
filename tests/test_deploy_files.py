"""The deployment files: the Procfile's lines run real modules with flags their CLIs accept, and
docker-compose.yml / Dockerfile have what production needs (durable Redis, healthchecks, a worker
service that scales, nothing published beyond loopback)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from honcho.environ import parse_procfile

from api.validation import MULTIPART_OVERHEAD_BYTES
from shared.config import PROJECT_ROOT, Settings
from tests import nginx

PROCFILE = PROJECT_ROOT / "Procfile"
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"

# Stands in for the program a Procfile line execs: prints the argv and the environment it would get.
_ARGV_PRINTER = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))"


def procfile() -> dict[str, str]:
    return dict(parse_procfile(PROCFILE.read_text(encoding="utf-8")).processes)


def exec_of(command: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment the shell (`sh -c`, as honcho runs it) gives the program that
    `command` execs, with `env` as the environment."""
    assert re.search(r"\bexec \S+", command), f"the command should exec its program: {command}"
    probe = re.sub(r"\bexec (\S+)", lambda m: f'exec {sys.executable} -c "{_ARGV_PRINTER}" {m[1]}', command)
    out = subprocess.run(
        ["sh", "-c", probe], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    data = json.loads(out.stdout)
    return data["argv"], data["env"]


SECRET_URL = "redis://inferq:s3cret-pass@redis.internal:6380/2"


def base_env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "REDIS_URL": SECRET_URL, **extra}


def test_procfile_has_web_and_worker() -> None:
    assert set(procfile()) == {"web", "worker"}


def test_web_runs_gunicorn_with_the_api_config() -> None:
    argv, _ = exec_of(procfile()["web"], base_env())
    assert argv == ["gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"]
    assert (PROJECT_ROOT / "api" / "gunicorn_conf.py").is_file()
    spec = importlib.util.find_spec("api.wsgi")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    assigned = {
        t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if hasattr(t, "id")
    }
    assert "app" in assigned, "api/wsgi.py must define `app` at module level"


@pytest.mark.parametrize(
    ("env", "workers", "queue"),
    [({}, 1, "inferq"), ({"WORKERS": "3", "QUEUE_NAME": "gpu-queue"}, 3, "gpu-queue")],
)
def test_worker_runs_rq_worker_pool_of_batch_workers(env: dict[str, str], workers: int, queue: str) -> None:
    from rq.cli.cli import main as rq_cli
    from rq.serializers import JSONSerializer, resolve_serializer
    from rq.utils import import_attribute
    from rq.worker import BaseWorker

    argv, child_env = exec_of(procfile()["worker"], base_env(**env))
    assert argv[:2] == ["rq", "worker-pool"]
    # The flags are ones `rq worker-pool` really accepts (click parses them as the CLI would).
    command = rq_cli.get_command(None, "worker-pool")  # type: ignore[arg-type]
    params = command.make_context("worker-pool", argv[2:]).params
    assert params["num_workers"] == workers
    # Every priority lane, highest first (shared.jobs.LANES).
    assert params["queues"] == (queue, f"{queue}-low")
    worker_class = import_attribute(params["worker_class"])
    assert isinstance(worker_class, type) and issubclass(worker_class, BaseWorker)
    assert worker_class.__name__ == "BatchWorker"
    assert resolve_serializer(params["serializer"]) is JSONSerializer
    # The Redis URL reaches rq through its environment variable, never the command line (`ps`).
    assert child_env.get("RQ_REDIS_URL") == SECRET_URL
    assert not any("s3cret" in arg for arg in argv)


def test_the_pool_supervisor_does_not_import_torch() -> None:
    # `rq worker-pool` imports the worker class in its supervisor and forks the workers from it:
    # torch (threads, CUDA) must be loaded by each worker, after the fork.
    code = "import sys, worker.batch_worker; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


# --- docker-compose.yml ---------------------------------------------------------------------------


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Compose v1 is a program of the system's Python: this interpreter's PYTHONPATH is not for it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        argv, cwd=PROJECT_ROOT, input=stdin, env=env, capture_output=True, text=True, timeout=60
    )


def _compose_cli() -> list[str] | None:
    """The Compose that is installed: v2 (`docker compose`) first, else v1 (`docker-compose`)."""
    docker = shutil.which("docker")
    if docker and _run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    compose_v1 = shutil.which("docker-compose")
    return [compose_v1] if compose_v1 else None


def test_compose_accepts_the_file() -> None:
    """Whichever Compose is installed validates the file (`make test` installs Debian's v1)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (make test-packages)")
    out = _run(*cli, "-f", str(COMPOSE_FILE), "config", "--quiet")
    assert out.returncode == 0, f"{' '.join(cli)} config rejects docker-compose.yml:\n{out.stderr}"


def test_compose_file_follows_the_compose_specification() -> None:
    """The Compose Specification's JSON schema, which Compose v2 validates files against (v2 is not
    installable here), as vendored by check-jsonschema (a dev dependency)."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema, which ships the Compose Specification schema, is not installed")
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    out = subprocess.run([*argv, str(COMPOSE_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _compose_config() -> dict[str, Any]:
    """docker-compose.yml as data, as normalised and validated by the installed Compose: `docker
    compose config` (v2, JSON) or `docker-compose config` (v1, a Python program: its interpreter has
    PyYAML). Without Compose, as PyYAML reads it."""
    cli = _compose_cli()
    if cli is not None and cli[-1] == "compose":
        out = _run(*cli, "-f", str(COMPOSE_FILE), "config", "--format", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]
    if cli is not None:
        out = _run(*cli, "-f", str(COMPOSE_FILE), "config")
        assert out.returncode == 0, f"docker-compose config rejects the file:\n{out.stderr}"
        shebang = Path(cli[0]).read_text(encoding="utf-8", errors="replace").splitlines()[0]
        interpreter = shebang.removeprefix("#!").split()
        to_json = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
        parsed = _run(*interpreter, "-c", to_json, stdin=out.stdout)
        assert parsed.returncode == 0, parsed.stderr
        return json.loads(parsed.stdout)  # type: ignore[no-any-return]
    try:
        import yaml
    except ImportError:
        pytest.skip("no YAML reader: neither Compose nor PyYAML is installed")
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_config()


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, container port) of each published port, whatever the notation."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # compose v2's normalised long syntax
            out.append((port.get("host_ip", ""), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            out.append((host_ip, parts[-1]))
    return out


def test_compose_has_the_five_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"nginx", "redis", "api", "worker", "dashboard"}


def _bind_mount(service: dict[str, Any], target: str) -> tuple[Path, bool]:
    """(host path, read-only) of the bind mount at `target`, whatever the notation: the file's
    short syntax (relative source), v1's normalised string (absolute), v2's long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            source, mounted, *mode = str(volume).split(":")
            mounts.append((source, mounted, "ro" in "".join(mode).split(",")))
    (found,) = [(source, read_only) for source, mounted, read_only in mounts if mounted == target]
    return (PROJECT_ROOT / found[0]).resolve(), found[1]


def _default(name: str) -> Any:
    """A setting's default: what the compose file's api runs with (it sets no limit of its own)."""
    return Settings.model_fields[name].default


@pytest.fixture(scope="module")
def nginx_http(compose: dict[str, Any]) -> nginx.Directive:
    """The `http` block of the config file the compose file mounts into the nginx container."""
    source, read_only = _bind_mount(compose["services"]["nginx"], nginx.CONTAINER_PATH)
    assert source == nginx.NGINX_CONF.resolve() and read_only
    return nginx.parse(source.read_text(encoding="utf-8")).one("http")


def test_compose_nginx_is_a_buffering_front_door_with_timeouts(
    compose: dict[str, Any], nginx_http: nginx.Directive
) -> None:
    """Clients reach the api only through nginx, which buffers requests with header and body
    deadlines, and waits longer than the longest long-poll."""
    assert ("127.0.0.1", "8000") in _published(compose["services"]["nginx"])
    assert not _published(compose["services"]["api"]), "the api is reached through nginx only"
    assert nginx_http.one("upstream", "inferq_api").one("server").args == ["api:8000"]
    server = nginx_http.one("server")
    assert server.value("listen") == "8000"
    for location in server.all("location"):
        if not location.args[0].startswith("@"):
            assert location.value("proxy_pass") == "http://inferq_api", location.args
    assert server.value("proxy_request_buffering") == "on"
    assert server.value("proxy_buffering") == "on"
    for timeout in ("client_header_timeout", "client_body_timeout"):
        assert 0 < nginx.seconds(server.value(timeout)) <= 10
    assert nginx.seconds(server.value("proxy_read_timeout")) > _default("max_wait_seconds")
    # Thousands of long-polls: nginx's connection budget must be far above its default 512.
    events = nginx.parse(nginx.NGINX_CONF.read_text(encoding="utf-8")).one("events")
    assert int(events.value("worker_connections")) >= 10_000


def test_compose_nginx_body_limits_are_the_apis(nginx_http: nginx.Directive) -> None:
    """Each upload route takes at most what the api takes there, so nginx never buffers a body the
    api refuses; the rest take little. Its 413 names the route's limit."""
    server = nginx_http.one("server")
    limits = {
        "/v1/jobs": _default("max_upload_bytes") + MULTIPART_OVERHEAD_BYTES,
        "/v1/batches": _default("max_batch_upload_bytes"),
    }
    for path, limit in limits.items():
        assert nginx.size_bytes(server.one("location", "=", path).value("client_max_body_size")) == limit
    default_limit = nginx.size_bytes(server.value("client_max_body_size"))
    assert default_limit <= min(limits.values())
    messages = {d.name: d.args[0] for d in nginx_http.one("map", "$uri", "$inferq_body_limit").block or []}
    assert f"{_default('max_upload_bytes'):,}" in messages["/v1/jobs"]
    assert f"{MULTIPART_OVERHEAD_BYTES:,}" in messages["/v1/jobs"]
    assert f"{_default('max_batch_upload_bytes'):,}" in messages["/v1/batches"]
    assert f"{default_limit:,}" in messages["default"]


@pytest.mark.parametrize("status", [413, 500, 502, 504])
def test_compose_nginx_answers_its_own_errors_in_the_api_shape(
    nginx_http: nginx.Directive, status: int
) -> None:
    server = nginx_http.one("server")
    (page,) = [d.args[-1] for d in server.all("error_page") if str(status) in d.args[:-1]]
    location = server.one("location", page)
    assert location.one("types").block == [], "a path's extension must not change the type"
    assert location.value("default_type") == "application/json"
    code, body = location.one("return").args
    assert code == str(status)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and re.fullmatch(r"[a-z_]+", error["code"])


def test_compose_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.match(r"(valkey/valkey|redis):", redis["image"])
    command = _command(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    # A memory bound that leaves room beside the default image budget (MAX_QUEUED_BYTES).
    maxmemory = str(command[command.index("--maxmemory") + 1]).lower()
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
    number, unit = re.fullmatch(r"(\d+)(kb|mb|gb)", maxmemory).groups()  # type: ignore[union-attr]
    assert Settings().max_queued_bytes <= 0.75 * int(number) * units[unit]
    assert any(str(v).endswith(":/data") or ":/data:" in str(v) for v in redis["volumes"]) or any(
        isinstance(v, dict) and v.get("target") == "/data" for v in redis["volumes"]
    )
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert not redis.get("ports"), "Redis has no password here: it must not be published"


def test_compose_api_is_healthchecked_on_readyz(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert _command(api)[:1] == ["gunicorn"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8000" in [str(p) for p in api.get("expose", [])]


def test_compose_api_has_api_keys_for_its_public_bind(compose: dict[str, Any]) -> None:
    # In its container the api binds 0.0.0.0: the bind rule (shared.bind_policy.check_bind_allowed)
    # refuses that without API keys, so gunicorn would not start.
    api = compose["services"]["api"]
    env = api["environment"]
    assert env["HOST"] == "0.0.0.0"
    assert env.get("API_KEYS") or env.get("API_KEYS_FILE") == "/run/secrets/api_keys"
    if "API_KEYS_FILE" in env:
        sources = [s if isinstance(s, str) else s["source"] for s in api["secrets"]]
        assert "api_keys" in sources and "api_keys" in compose["secrets"]


def test_compose_worker_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert _command(worker) == ["python", "-m", "worker"]
    assert "container_name" not in worker, "a fixed container name prevents --scale worker=N"
    assert not worker.get("ports"), "published ports prevent --scale worker=N"
    assert worker["restart"] == "unless-stopped"


def test_compose_publishes_nothing_beyond_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host_ip, _port in _published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes a port beyond loopback"


def test_compose_dashboard_reads_json_jobs(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert _command(dashboard)[0] == "rq-dashboard"
    assert "--json" in _command(dashboard)
    assert dashboard["environment"]["RQ_DASHBOARD_REDIS_URL"].startswith("redis://redis:")


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX", text, re.M)
    assert "pip install -r" in text
    assert "python -m artifacts.build --out artifacts/efficientnet_lite0" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"^HEALTHCHECK .*/healthz", text, re.M | re.S)
