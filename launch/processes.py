"""Child processes on this machine, one way for the launcher, the bench and the tests.

Ports (a free one, waiting for one to open or close), stopping a process (SIGTERM, then SIGKILL),
reading `/proc` (resident memory, descendants, liveness), the tcmalloc library `make up` and the
bench preload, and the kernel's parent-death signal that keeps a child from outliving its parent.
Linux only where it says `/proc`; elsewhere those helpers report nothing rather than fail.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Debian's libtcmalloc-minimal4 (`apt-get install libtcmalloc-minimal4`): see PRELOAD_TCMALLOC.
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")

_PR_SET_PDEATHSIG = 1


# --- ports ----------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel says is free now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition"
) -> float:
    """Poll until `predicate()`; the seconds it took. Raises TimeoutError after `timeout`."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float, host: str = LOOPBACK) -> float:
    """Wait until host:port accepts connections; the seconds it took."""
    return wait_until(lambda: port_open(port, host), timeout, what=f"{host}:{port} accepting connections")


# --- stopping -------------------------------------------------------------------------------------


def stop_process(
    proc: subprocess.Popen[bytes] | None, timeout: float = 20.0, sig: int = signal.SIGTERM
) -> int | None:
    """Send `sig` (SIGTERM: a graceful stop), SIGKILL after `timeout` s; reap it. The exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def send_signal(pid: int, sig: int, *, group: bool = False) -> bool:
    """Send `sig` to `pid` (with `group`: to its whole process group); False when nothing is left.

    Only `os.kill`/`os.killpg`: safe to call from a signal handler (no lock, no allocation that
    can block).
    """
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user; the rest of the group got it
        return True
    return True


# --- parent-death signal --------------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    # Resolved once, in the parent: between fork and exec the child must not dlopen anything.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Runs in a child between fork and exec: ask the kernel for `sig` when the parent dies.

    Caveat of the kernel feature: the "parent" is the *thread* that forked, so fork from a thread
    that lives as long as the child should (normally the main thread). If the parent died between
    fork and this call, nobody would ever signal the child: it exits at once instead.
    """
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when this thread dies."""
    parent_pid = os.getpid()
    return lambda: die_with_parent(sig, parent_pid)


# --- /proc ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)", or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def proc_table() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, state) of every process, from /proc (nothing where there is no /proc)."""
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            yield int(entry.name), int(fields[1]), fields[0]


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int, started: int | None = None) -> bool:
    """`pid` runs (a zombie counts as gone); with `started`, it is still that very process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, state in proc_table():
        if state not in ("Z", "X"):
            children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        for pid in children.get(frontier.pop(), []):
            started = start_time(pid)
            if started is not None and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of `pid` (default: this process), MiB; NaN if it is gone."""
    try:
        status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    except OSError:
        return math.nan
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan
