"""Redis writes recorded rather than sent, for a Lua script to make after its own checks, in the same
atomic step: the submit's one round trip (`shared.image_budget.reserve`) stores the image, RQ's job
and the api's counters only if the byte budget admits them, and nothing at all otherwise.

`RecordedWrites` takes redis-py's command API (`set`, `hset`, `zadd`, ...; RQ's enqueue calls it as
it would a pipeline already in MULTI), so each module records its writes as it would send them and
the bytes that reach Redis are the ones redis-py would have sent. `APPLY_LUA` is the script fragment
that makes them; `pack` lays them out as its KEYS and ARGV.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import CoreCommands

# The write commands a recording may hold: each names one key, its first argument (so that every
# key a script touches is declared in its KEYS, as Redis asks of scripts).
SINGLE_KEY_WRITES = frozenset({"SET", "HSET", "RPUSH", "SADD", "ZADD", "EXPIRE"})

# `apply(from)`: makes the writes packed in ARGV[from..] (see `pack`), in order.
APPLY_LUA = """
local function apply(from)
  local i = from
  while i <= #ARGV do
    local n = tonumber(ARGV[i + 1])
    redis.call(ARGV[i + 2], KEYS[tonumber(ARGV[i])], unpack(ARGV, i + 3, i + 2 + n))
    i = i + 3 + n
  end
end
"""


class RecordedWrites(CoreCommands):  # type: ignore[misc]
    """Write commands in the order they were made, none sent."""

    # RQ's enqueue, handed this as its pipeline, finds it already in a transaction and calls no MULTI.
    explicit_transaction = True

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        name = str(args[0]).upper()
        if name not in SINGLE_KEY_WRITES:
            raise ValueError(f"{name} cannot be recorded for a script (one of {sorted(SINGLE_KEY_WRITES)})")
        self.commands.append((name, *args[1:]))

    def multi(self) -> None:
        """Already a transaction: the script that makes these writes runs atomically."""

    def extend(self, other: RecordedWrites) -> None:
        self.commands.extend(other.commands)


def pack(writes: RecordedWrites, keys: list[Any], args: list[Any]) -> None:
    """Append `writes` to a script's `keys` and `args`: each write as its key's index in KEYS (a key
    written several times is declared once), its argument count, its command and its arguments."""
    index = {key: i for i, key in enumerate(keys, start=1)}
    for name, key, *rest in writes.commands:
        if key not in index:
            keys.append(key)
            index[key] = len(keys)
        args += [index[key], len(rest), name, *rest]
