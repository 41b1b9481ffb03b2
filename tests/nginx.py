"""deploy/nginx.conf for the tests: read as a tree of directives, and run with Debian's nginx.

Outside its container the file needs what README.md's "Deployment" lists: the api's address in the
upstream, a listen address, and temp paths nginx's worker can write. `render` changes exactly those
lines (each must be there once, so a rewrite of the file cannot silently leave the test running
something else) and `running_nginx` runs the result as a non-daemon child.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from launch.processes import free_port, port_open, stop_process, wait_until
from shared.config import PROJECT_ROOT

NGINX_CONF = PROJECT_ROOT / "deploy" / "nginx.conf"
# Where the compose file mounts it, and the address it proxies to there.
CONTAINER_PATH = "/etc/nginx/nginx.conf"
UPSTREAM_LINE = "server api:8000;"
LISTEN_LINE = "listen 8000;"
# Every temp path nginx creates at start; the compiled-in ones are outside a test's reach.
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

_TOKEN = re.compile(r"""\s+|#[^\n]*|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[{};]|[^\s{};'"#]+""", re.S)


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = field(default=None)

    def all(self, name: str, *args: str) -> list[Directive]:
        """The directives `name` (with these leading arguments) directly inside this block."""
        return [d for d in self.block or [] if d.name == name and d.args[: len(args)] == list(args)]

    def one(self, name: str, *args: str) -> Directive:
        found = self.all(name, *args)
        assert len(found) == 1, f"{name} {' '.join(args)}: {len(found)} found in {self.name} {self.args}"
        return found[0]

    def value(self, name: str) -> str:
        """The single argument of the one directive `name` in this block."""
        (arg,) = self.one(name).args
        return arg


def _unquote(text: str) -> str:
    """A quoted argument's value: nginx turns these escapes into their characters, keeps others."""
    escapes = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "'": "'"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m[1], m[0]), text)


def parse(text: str) -> Directive:
    """The configuration as a tree: the main context is the block of a directive named `main`."""
    stack = [Directive("main", [], [])]
    words: list[str] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token.isspace() or token.startswith("#"):
            continue
        if token in (";", "{"):
            directive = Directive(words[0], words[1:], [] if token == "{" else None)
            stack[-1].block.append(directive)  # type: ignore[union-attr]
            if token == "{":
                stack.append(directive)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(_unquote(token[1:-1]) if token[0] in "'\"" else token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def size_bytes(size: str) -> int:
    """An nginx size (`512`, `10304k`, `64m`, `1g`) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", size).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


def seconds(duration: str) -> float:
    """An nginx time in seconds (`10s`, `45`, `1m`, `500ms`)."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit or "s"]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} should occur once in {NGINX_CONF.name}"
    return text.replace(old, new)


def render(upstream: str, port: int, workdir: Path, *, replace: dict[str, str] | None = None) -> str:
    """deploy/nginx.conf for this machine: the api at `upstream` (host:port), listening on
    127.0.0.1:`port`, temp paths and access log in `workdir`; `replace` changes more lines."""
    text = NGINX_CONF.read_text(encoding="utf-8")
    text = _replace_once(text, UPSTREAM_LINE, f"server {upstream};")
    text = _replace_once(text, LISTEN_LINE, f"listen 127.0.0.1:{port};")
    local = "".join(f"  {kind}_temp_path {workdir / kind};\n" for kind in TEMP_PATHS)
    local += f"  access_log {workdir / 'access.log'};\n"
    text = _replace_once(text, "\nhttp {\n", f"\nhttp {{\n{local}")
    for old, new in (replace or {}).items():
        text = _replace_once(text, old, new)
    return text


def nginx_binary() -> str | None:
    """Debian's nginx (in /usr/sbin, which a non-root PATH may lack), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@dataclass
class Nginx:
    base: str
    workdir: Path

    def error_log(self) -> str:
        return (self.workdir / "error.log").read_text(encoding="utf-8", errors="replace")


@contextmanager
def running_nginx(workdir: Path, upstream: str, *, replace: dict[str, str] | None = None) -> Iterator[Nginx]:
    """nginx with the rendered deploy/nginx.conf, a child of the test (not a daemon), until exit."""
    binary = nginx_binary()
    assert binary is not None, "nginx is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render(upstream, port, workdir, replace=replace), encoding="utf-8")
    # As root the workers would run as `nobody`, which cannot enter a test's private temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    main = f"daemon off; pid {workdir / 'nginx.pid'}; error_log {workdir / 'error.log'} info; {user}"
    argv = [binary, "-p", f"{workdir}/", "-e", str(workdir / "error.log"), "-c", str(conf), "-g", main]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t refuses the rendered config:\n{check.stderr}"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = Nginx(f"http://127.0.0.1:{port}", workdir)
    try:
        wait_until(lambda: proc.poll() is not None or port_open(port), 30, 0.05, "nginx listening")
        assert proc.poll() is None, f"nginx exited {proc.returncode}:\n{nginx.error_log()}"
        yield nginx
    finally:
        stop_process(proc, timeout=10)  # SIGTERM: nginx's fast shutdown, its workers with it
