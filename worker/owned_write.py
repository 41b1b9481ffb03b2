"""A worker's write that must land only while it still owns the jobs, in one round trip.

Ownership (see `worker.rq_writes`): the job's execution is in its started registry with a score
(expiry) still in the future. Checked client-side, that takes a WATCH, a read of the scores, then
the MULTI: three round trips, on the path of every result. Here the check and the write are one Lua
script: it reads each score and, only if every job is still owned, runs the recorded commands; it
writes nothing otherwise (the caller then takes the WATCHed path, which sorts out which jobs it still
owns). A script runs atomically, so no recovery (`worker.liveness`) can come in between.

A script cannot call another, so the scripts the recorded commands call (e.g. the image release) are
inlined as Lua functions, called where their EVALSHA was. The script has no flags (a Redis 6.2 does
not read them): a Redis past maxmemory refuses its first write, before anything was written, and
`run` returns None for the caller's path that handles that (`worker.past_maxmemory`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError

from worker import past_maxmemory

# ARGV: the wall-clock time, the number of jobs, a (started registry key, execution) pair per job,
# then each command as its number of words and the words; a call of an inlined script is the word
# `SCRIPT`, the index of its function, then its EVALSHA's numkeys, keys and args.
_CHECK_AND_RUN = """
local wall = tonumber(ARGV[1])
local jobs = tonumber(ARGV[2])
for j = 1, jobs do
  local score = redis.call('ZSCORE', ARGV[1 + 2 * j], ARGV[2 + 2 * j])
  if not score or tonumber(score) <= wall then return 0 end
end
local i = 3 + 2 * jobs
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if ARGV[i + 1] == 'SCRIPT' then
    local numkeys = tonumber(ARGV[i + 3])
    local keys = {unpack(ARGV, i + 4, i + 3 + numkeys)}
    local args = {}
    if i + 4 + numkeys <= i + n then args = {unpack(ARGV, i + 4 + numkeys, i + n)} end
    inlined[tonumber(ARGV[i + 2])](keys, args)
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
return 1
"""


@cache
def _source(scripts: tuple[str, ...]) -> str:
    """The script, with `scripts` inlined as the functions `inlined[0]`, `inlined[1]`..."""
    functions = (f"inlined[{k}] = function(KEYS, ARGV)\n{body}\nend\n" for k, body in enumerate(scripts))
    return "local inlined = {}\n" + "".join(functions) + _CHECK_AND_RUN


def run(conn: Redis, owned: Sequence[tuple[str, str]], recorded: Pipeline) -> bool | None:
    """Run `recorded`'s commands if every `(started registry key, execution composite key)` in
    `owned` is still there unexpired: True once written, False when not all are owned (nothing
    written). None, nothing written either, when this path cannot take the write: Redis refused it
    past maxmemory, or it calls a script that cannot be inlined (flagged)."""
    commands = past_maxmemory.snapshot(recorded)
    by_sha = {script.sha: script for script in commands.scripts}
    inlined: list[str] = []
    args: list[object] = [repr(time.time()), len(owned)]
    for registry, execution in owned:
        args += [registry, execution]
    for words, _ in commands.commands:
        if str(words[0]).upper() == "EVALSHA":
            script = by_sha.get(words[1])
            if script is None or script.script.lstrip().startswith("#!"):
                return None
            if script.script not in inlined:
                inlined.append(script.script)
            words = ("SCRIPT", inlined.index(script.script), *words[2:])
        elif str(words[0]).upper() == "EVAL":
            return None
        args += [len(words), *words]
    try:
        return conn.register_script(_source(tuple(inlined)))(keys=[], args=args) == 1
    except OutOfMemoryError:
        return None
