"""Grabbing a micro-batch off an RQ queue, reliably and without needless waiting.

Every id moves atomically from the queue list into RQ's intermediate list (`BLMOVE`/`LMOVE`, RQ's
own reliable-dequeue primitive), so a worker that dies between the pop and the job's start leaves
the id where RQ's maintenance finds it, never nowhere.

When a batch closes (Triton's dynamic-batcher knobs: max batch size, max queue delay):
1. it holds `max_size` ids; or
2. the queue is empty and the arrival rate seen so far does not predict another job before the
   oldest job's deadline (`enqueued_at + max_delay`): a lone job under light load starts at once; or
3. that deadline has passed.
So the delay is only spent when companions are actually expected, and it is counted from the
oldest job's arrival, not from the grab.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis

# Moves up to ARGV[1] ids from the queue to the intermediate list in one atomic round trip.
_MOVE_UP_TO = """
local moved = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  moved[#moved + 1] = id
end
return moved
"""


class ArrivalRate:
    """Exponentially weighted mean gap between job arrivals (enqueue times), in seconds."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.mean_gap: float | None = None
        self._last_arrival: float | None = None

    def observe(self, arrivals: list[float]) -> None:
        for arrival in sorted(arrivals):
            if self._last_arrival is not None and arrival >= self._last_arrival:
                gap = arrival - self._last_arrival
                self.mean_gap = (
                    gap if self.mean_gap is None else (self.weight * gap + (1 - self.weight) * self.mean_gap)
                )
            self._last_arrival = arrival if self._last_arrival is None else max(self._last_arrival, arrival)

    def expects_arrival_within(self, seconds: float) -> bool:
        return self.mean_gap is not None and self.mean_gap < seconds


class BatchCollector:
    def __init__(
        self,
        connection: Redis,
        queue_key: str,
        intermediate_key: str,
        max_size: int,
        max_delay: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.queue_key = queue_key
        self.intermediate_key = intermediate_key
        self.max_size = max_size
        self.max_delay = max_delay
        self.clock = clock
        self.arrivals = ArrivalRate()
        self._move_up_to = connection.register_script(_MOVE_UP_TO)

    def take_first(self, block_seconds: float) -> str | None:
        """Block up to `block_seconds` for one id; short blocks keep the worker responsive to signals."""
        moved = self.connection.blmove(self.queue_key, self.intermediate_key, block_seconds, "LEFT", "RIGHT")
        return moved.decode() if isinstance(moved, bytes) else moved

    def take_available(self, limit: int) -> list[str]:
        if limit <= 0:
            return []
        moved = self._move_up_to(keys=[self.queue_key, self.intermediate_key], args=[limit])
        return [m.decode() if isinstance(m, bytes) else m for m in moved]

    def wait_for_more(self, have: int, oldest_arrival: float) -> list[str]:
        """Ids to add to a batch of `have` that the queue could not fill: waits only while it pays."""
        extra: list[str] = []
        deadline = oldest_arrival + self.max_delay
        while have + len(extra) < self.max_size:
            remaining = deadline - self.clock()
            if remaining <= 0 or not self.arrivals.expects_arrival_within(remaining):
                break
            # Redis takes fractional BLMOVE timeouts; 1 ms is its floor.
            nxt = self.take_first(max(remaining, 0.001))
            if nxt is None:
                break
            extra.append(nxt)
            extra += self.take_available(self.max_size - have - len(extra))
        return extra
