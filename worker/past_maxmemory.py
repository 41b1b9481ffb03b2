"""A worker's own writes when Redis is past `maxmemory`.

Under `noeviction`, a Redis over its `maxmemory` refuses every command that may grow memory, and a
MULTI holding one is refused whole: the worker's bookkeeping too (the grab's LMOVE, the start, the
heartbeat, the end). Then nothing drains: memory goes down only when workers end jobs (each end
deletes an image, far bigger than what the end writes), and ending jobs needs those very writes.

So a write of the worker that Redis refused that way is sent again with each run of its commands
wrapped in one call of a Lua script flagged `allow-oom` (Redis 7, Valkey): queued in the same MULTI,
after the same WATCHes, it is as atomic and as ownership-checked as before, and Redis accepts it
past maxmemory. Only the worker's writes take this path, and each is small or frees more than it
writes (over a job's life: its image freed against its result written); new work is still refused
at the door (503 `redis_full`). A Redis older than 7 does not read script flags: there the replay
fails as the refused write did, as before.

Usage: `snapshot` what a pipeline has queued before it runs (or record the commands on a
`recorder` pipeline, never executed itself), then `replay` them on the pipeline that runs them, as
they are or wrapped (`allow_oom`); `execute` does both for a write that watches nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError

# `snapshot` and `replay` read and fill a pipeline's queue (`Pipeline.command_stack`, `.scripts`):
# redis-py internals, the only ones the worker touches, here and nowhere else.
REDIS_PY_WRITTEN_FOR = "8."
if not redis.__version__.startswith(REDIS_PY_WRITTEN_FOR):
    raise ImportError(
        f"worker.past_maxmemory reads redis-py {REDIS_PY_WRITTEN_FOR}x pipelines' queued commands "
        f"(Pipeline.command_stack, Pipeline.scripts); redis-py {redis.__version__} is installed: "
        "check them before changing the pin"
    )

log = logging.getLogger("inferq.worker")

# ARGV: for each command, its number of words, then the words. Returns one reply per command.
# `allow-oom`: accepted past maxmemory, also when queued in a MULTI (the flag makes the call not
# "denyoom", so neither the queueing nor the EXEC is refused). A command that fails stops the script
# with its error, as it would fail the pipeline it came from.
ALLOW_OOM = "#!lua flags=allow-oom"
_RUN = (
    ALLOW_OOM
    + """
local replies = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  replies[#replies + 1] = redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return replies
"""
)

# Commands that run a script: replayed as they are (a script cannot call another; the scripts the
# worker queues, e.g. the image release, delete before they write, which Redis allows past maxmemory).
_SCRIPT_CALLS = {"EVALSHA", "EVAL"}


@dataclass(frozen=True)
class Recorded:
    """The commands queued on a pipeline, and the scripts they call."""

    commands: list[tuple[tuple[Any, ...], dict[str, Any]]]
    scripts: list[Any]


def recorder(conn: Redis) -> Pipeline:
    """A pipeline to record commands on: RQ's helpers write to it as to any pipeline."""
    return conn.pipeline(transaction=False)


def snapshot(pipe: Pipeline) -> Recorded:
    """What `pipe` has queued (before its `execute`, which forgets it)."""
    return Recorded(list(pipe.command_stack), list(pipe.scripts))


def replay(pipe: Pipeline, recorded: Recorded, *, allow_oom: bool) -> list[int | None]:
    """Queue the recorded commands on `pipe`; with `allow_oom`, each run of plain commands as one
    call of the allow-oom script. Returns the layout `unwrap` needs to give one reply per command."""
    for script in recorded.scripts:  # loaded by `pipe` before it runs
        pipe.scripts.add(script)
    layout: list[int | None] = []
    run: list[Any] = []
    count = 0

    def flush() -> None:
        nonlocal count
        if count:
            pipe.register_script(_RUN)(keys=[], args=run, client=pipe)
            layout.append(count)
            run.clear()
            count = 0

    for args, options in recorded.commands:
        if allow_oom and str(args[0]).upper() not in _SCRIPT_CALLS:
            run.extend((len(args), *args))
            count += 1
            continue
        flush()
        pipe.execute_command(*args, **options)
        layout.append(None)
    flush()
    return layout


def unwrap(replies: Sequence[Any], layout: Sequence[int | None]) -> list[Any]:
    """One reply per recorded command (a wrapped run's replies are raw: no redis-py parsing)."""
    flat: list[Any] = []
    for size, reply in zip(layout, replies, strict=True):
        flat.extend(reply if size is not None else [reply])
    return flat


def execute(conn: Redis, recorded: Pipeline, *, what: str, transaction: bool = True) -> list[Any]:
    """Run `recorded`'s commands (as one transaction, or one pipeline); if Redis refuses them past
    maxmemory, once more through the allow-oom script. `what` names the write in the log."""
    for allow_oom in (False, True):
        with conn.pipeline(transaction=transaction) as pipe:
            layout = replay(pipe, snapshot(recorded), allow_oom=allow_oom)
            try:
                return unwrap(pipe.execute(), layout)
            except OutOfMemoryError as exc:
                if allow_oom:
                    raise
                refused(what, exc)
    raise AssertionError("unreachable")


# One warning per kind of write in this many seconds (a heartbeat past maxmemory comes every second).
_WARN_EVERY_SECONDS = 10.0
_warned: dict[str, float] = {}


def refused(what: str, exc: Exception) -> None:
    clock = time.monotonic()
    level = (
        logging.DEBUG
        if clock - _warned.get(what, -_WARN_EVERY_SECONDS) < _WARN_EVERY_SECONDS
        else logging.WARNING
    )
    if level == logging.WARNING:
        _warned[what] = clock
    log.log(level, "Redis is full (%s); %s past maxmemory", exc, what)


def grab(
    conn: Redis, lanes: Sequence[tuple[str, str]], limit: int, *, low_share: float
) -> list[tuple[int, str]]:
    """Up to `limit` ids moved from the lanes' queues into their grabbed lists, past maxmemory
    (where the grab script's LMOVE is refused): `(lane index, id)` pairs. Each lower lane first gets
    its share of the slots, as the normal grab gives it; then the lanes in priority order."""
    if limit <= 0:
        return []
    script = conn.register_script(_RUN)
    plan = [(lane, int(limit * low_share)) for lane in range(1, len(lanes))]
    plan += [(lane, limit) for lane in range(len(lanes))]
    taken: list[tuple[int, str]] = []
    for lane, most in plan:
        want = min(most, limit - len(taken))
        if want <= 0:
            continue
        queue_key, grabbed_key = lanes[lane]
        args: list[Any] = []
        for _ in range(want):  # an LMOVE from an empty list moves nothing: no harm in asking
            args += [5, "LMOVE", queue_key, grabbed_key, "LEFT", "RIGHT"]
        taken += [(lane, _text(job_id)) for job_id in script(keys=[], args=args) if job_id]
    return taken


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
