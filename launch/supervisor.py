"""A small process supervisor: Procfile commands in their own sessions, their output on one console.

Why not honcho's `Manager`: adapting it meant overriding its private hooks, and its signal handlers
print (they take the printer's lock), so a SIGTERM that landed while the main thread held that
lock deadlocked the launcher. Here:

- Signal handlers never do I/O and never take a lock (they read the monotonic clock, set
  attributes and call `os.kill`). The first SIGINT/SIGTERM records itself and sends SIGTERM to
  every command, so the stop starts even if the main thread is stuck writing to a console nobody
  reads; a second stop request SIGKILLs every group; a third one exits at once (`os._exit`: for a
  main thread blocked on a console that is never read; the embedded Valkey then gets its
  parent-death SIGTERM and shuts down cleanly). `signal.set_wakeup_fd` wakes the main loop's
  `select`.
- One stop request can arrive as several signals: `kill -TERM -- -<pgid>` on `make up` (what
  `docker stop`, systemd and CI runners send) reaches the launcher once from the group kill and
  once more from make, which forwards SIGTERM to its children. So every SIGINT/SIGTERM within
  SAME_REQUEST_SECONDS of the first signal of a request is a copy of it and changes nothing; only
  a signal after that window is a new request (a deliberate second Ctrl-C).
- A graceful stop signals the command only, not its group: gunicorn and RQ's worker pool stop
  their own children in their own way (a worker that got both the group's SIGTERM and its pool's
  SIGINT could hang in RQ's shutdown). What is still running after the grace period, orphans
  included, is SIGKILLed as a group.
- One thread, the main one, reads every child's output (non-blocking pipes, `selectors`) and
  prints it, so lines never interleave and no printing lock is shared with anything.
- Other threads (the launcher's readiness probe) talk to the main loop through `post()`: a
  lock-free queue plus a byte on the wake-up pipe.

Each command runs as `sh -c <command>` in a new session (a terminal's Ctrl-C reaches the launcher
only, and what is left of a command can be killed as one group), and asks the kernel for SIGTERM
when the launcher dies (`launch.processes.die_with_parent`), so even a SIGKILLed launcher leaves
nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import queue
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from honcho.colour import get_colours
from honcho.printer import Message, Printer

from launch.processes import die_with_parent, send_signal

TAIL_LINES = 40
SYSTEM = "system"
# The name the launcher's own lines carry.
LAUNCHER = "launcher"
# How often the main loop looks at its children when nothing is printed.
TICK_SECONDS = 0.2
_READ_CHUNK = 65536
# The exit code after a third stop request (128 + SIGTERM's number, as a shell reports a kill).
EXIT_ABANDONED = 143
# Signals this close (seconds) to the first signal of a stop request are copies of that request
# (a process group's SIGTERM plus make's forwarded one arrive within milliseconds, even on a
# loaded machine); a person who means a second Ctrl-C presses it later than this.
SAME_REQUEST_SECONDS = 1.0


@dataclass
class Child:
    """One Procfile process: its command, its process (group leader), its last lines."""

    name: str
    command: str
    colour: str | None
    proc: subprocess.Popen[bytes] | None = None
    partial: bytes = b""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    stop_sent: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None


@dataclass(frozen=True)
class Event:
    """Something another thread tells the main loop: a line to print, or a verdict."""

    kind: str  # "say", "ready", "suspended" (up, its workers suspended) or "fail"
    text: str = ""
    culprit: str | None = None


class Supervisor:
    """Starts commands, prints their output, and stops them all on a signal or the first exit.

    Use from the main thread: `install_signal_handlers()`, `start()` each command, then `run()`
    (returns why it ended) and `stop()`; or all of that with `supervising()`.
    """

    def __init__(self, output: TextIO, names: list[str], hide: Callable[[str], bool] | None = None) -> None:
        self.printer = Printer(
            output, width=max(len(n) for n in [SYSTEM, LAUNCHER, *names]), colour=True, prefix=True
        )
        self.output = output
        self.hide = hide or (lambda _line: False)
        self.children: dict[str, Child] = {}
        colours = get_colours()
        for name in names:
            self.children[name] = Child(name, "", next(colours))
        self.stop_signal: int | None = None
        # Stop requests so far: 1 a graceful stop, 2 a kill, 3 an exit (`_on_signal`).
        self.stop_requests = 0
        self._request_began: float | None = None  # time.monotonic() of the current request's first signal
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup_fd: int | None = None

    # --- signals (main thread) -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No I/O, no locks, no allocation that can block: the clock, attributes and os.kill only.
        now = time.monotonic()
        if self._request_began is not None and now - self._request_began < SAME_REQUEST_SECONDS:
            return  # a copy of the request being served (see the module's docstring)
        self._request_began = now
        self.stop_requests += 1
        if self.stop_signal is None:
            self.stop_signal = signum
        escalate = self.stop_requests > 1
        if self.stop_requests > 2:
            os._exit(EXIT_ABANDONED)
        for child in self.children.values():
            if child.proc is not None and (escalate or not child.stop_sent):
                child.stop_sent = True
                send_signal(child.proc.pid, signal.SIGKILL if escalate else signal.SIGTERM, group=escalate)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    # --- starting --------------------------------------------------------------------------------

    def start(self, name: str, command: str, env: Mapping[str, str], cwd: Path) -> None:
        """Run `command` through `sh -c` in a session of its own, its output to the main loop."""
        child = self.children[name]
        child.command = command
        launcher_pid = os.getpid()
        child.proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Between fork and exec, before any other thread exists (the launcher starts its
            # readiness thread only after every fork).
            preexec_fn=lambda: die_with_parent(signal.SIGTERM, launcher_pid),
        )
        assert child.proc.stdout is not None
        os.set_blocking(child.proc.stdout.fileno(), False)
        self._selector.register(child.proc.stdout, selectors.EVENT_READ, child)
        self.say(f"{name} started (pid={child.proc.pid})", SYSTEM)
        if self.stop_signal is not None:  # a signal landed while we were forking
            child.stop_sent = True
            send_signal(child.proc.pid, signal.SIGTERM)

    # --- other threads ---------------------------------------------------------------------------

    def post(self, event: Event) -> None:
        """From any thread: hand the main loop an event (and wake it)."""
        self._events.put(event)
        with contextlib.suppress(BlockingIOError):  # full pipe: the loop is awake anyway
            os.write(self._wake_w, b"\0")

    # --- printing (main thread) ------------------------------------------------------------------

    def say(self, text: str, name: str = LAUNCHER) -> None:
        colour = self.children[name].colour if name in self.children else None
        self._print(name, text, colour)

    def raw(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # stdout closed: keep supervising
            self.output.write(text)
            self.output.flush()

    def _print(self, name: str, text: str, colour: str | None) -> None:
        message = Message("line", text, datetime.datetime.now(), name, colour)
        with contextlib.suppress(OSError, ValueError):
            self.printer.write(message)

    def _emit(self, child: Child, data: bytes, final: bool = False) -> None:
        data = child.partial + data
        lines = data.split(b"\n")
        child.partial = b"" if final else lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if final and not line:
                continue
            if self.hide(line):
                continue
            child.tail.append(line)
            self._print(child.name, line, child.colour)

    # --- the loop (main thread) ------------------------------------------------------------------

    def pump(self, timeout: float) -> list[Event]:
        """Print whatever the children wrote within `timeout` s; the events other threads posted."""
        for key, _mask in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, _READ_CHUNK):
                        pass
                continue
            child: Child = key.data
            try:
                data = os.read(key.fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if data:
                self._emit(child, data)
            else:  # EOF: the process (and everything holding its pipe) closed its output
                self._emit(child, b"", final=True)
                self._selector.unregister(key.fileobj)
        events = []
        with contextlib.suppress(queue.Empty):
            while True:
                events.append(self._events.get_nowait())
        return events

    def first_exit(self) -> Child | None:
        """The first child found exited (a failed one before one that exited 0)."""
        exited = [c for c in self.children.values() if c.returncode is not None]
        return next((c for c in exited if c.returncode != 0), exited[0] if exited else None)

    def run(self, on_event: Callable[[Event], bool]) -> Child | None:
        """Print output until a stop signal, `on_event` returning True, or a child exiting (it is
        returned; None otherwise)."""
        while not self.stopping:
            for event in self.pump(TICK_SECONDS):
                if on_event(event):
                    return None
            if self.stopping:
                return None
            exited = self.first_exit()
            if exited is not None:
                self.pump(0)  # its last words
                return exited
        return None

    def stop(self, kill_after: float) -> list[str]:
        """SIGTERM every command not yet signalled, keep printing while they drain, SIGKILL what is
        left after `kill_after` s. The names of the processes that had to be killed."""
        for child in self.children.values():
            if child.proc is not None and not child.stop_sent:
                child.stop_sent = True
                send_signal(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + kill_after
        killed: list[str] = []
        for child in self._live():
            while child.returncode is None and time.monotonic() < deadline:
                self.pump(TICK_SECONDS)
            if child.returncode is None:
                killed.append(child.name)
        for child in self.children.values():
            # SIGKILL the whole group: also what the leader left behind (orphaned children).
            if child.proc is not None:
                send_signal(child.proc.pid, signal.SIGKILL, group=True)
                child.proc.wait()
        self.pump(0)
        for child in self.children.values():
            if child.returncode is not None and child.proc is not None and child.proc.stdout is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(child.proc.stdout)
                child.proc.stdout.close()
        return killed

    def _live(self) -> Iterator[Child]:
        return (c for c in self.children.values() if c.proc is not None)

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
