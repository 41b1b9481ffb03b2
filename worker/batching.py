"""Grabbing jobs off inferq's RQ queues (one per priority lane) for a batch worker's feeder,
reliably and without needless waiting.

Reliability: every id moves atomically from its queue list into that queue's RQ intermediate list
(`BLMOVE`/`LMOVE`, RQ's own reliable-dequeue primitive), so a worker that dies between the pop and
the job's start leaves the id where RQ's maintenance finds it, never nowhere.

A grab takes what is queued, up to the room the worker has (the batch itself is formed later, by the
model thread, from everything ready: `worker.pipeline`). When the model is idle and the queues hold
fewer jobs than that room, the grab waits for companions (Triton's max queue delay) only while the
arrival rate seen so far predicts another job before the oldest job's deadline
(`enqueued_at + max_delay`): a lone job under light load starts at once, the delay is spent only
when companions are actually expected, and it is counted from the oldest job's arrival, not from
the grab.

Lanes: higher lanes go first, but each lower lane is owed `low_share` of every grab's slots while
it has jobs waiting (a deficit counter carries fractions across grabs, so even grabs of one give
the low lane its share): under saturation the low lane gets at least that fraction of the
throughput and is never starved; when the high lane is idle the low lane gets everything.
An idle worker blocks on the highest lane only (BLMOVE takes one source), so a job arriving on a
lower lane of an idle worker waits at most one idle poll (`idle_block` seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis import Redis

# KEYS: queue1, intermediate1, queue2, intermediate2, ...; ARGV: total, reserved slots for lane 2..n.
# Reserved slots of lower lanes are taken first, then every lane in priority order fills the rest.
# Returns a flat list: lane number (1-based), id, lane number, id, ...
_MOVE_UP_TO = """
local total = tonumber(ARGV[1])
local moved = {}
local count = 0
local function take(lane, limit)
  local taken = 0
  while taken < limit and count < total do
    local id = redis.call('LMOVE', KEYS[2 * lane - 1], KEYS[2 * lane], 'LEFT', 'RIGHT')
    if not id then break end
    moved[#moved + 1] = lane
    moved[#moved + 1] = id
    taken = taken + 1
    count = count + 1
  end
end
local lanes = #KEYS / 2
for lane = 2, lanes do take(lane, tonumber(ARGV[lane]) or 0) end
for lane = 1, lanes do take(lane, total) end
return moved
"""


@dataclass(frozen=True)
class Lane:
    queue_key: str
    intermediate_key: str


@dataclass(frozen=True)
class Grabbed:
    lane: int  # 0 = highest priority
    job_id: str


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BatchCollector:
    def __init__(
        self,
        connection: Redis,
        lanes: Sequence[Lane],
        max_size: int,
        max_delay: float,
        low_share: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lanes:
            raise ValueError("at least one lane")
        self.connection = connection
        self.lanes = list(lanes)
        self.max_size = max_size
        self.max_delay = max_delay
        self.low_share = low_share
        self.clock = clock
        self.arrivals = ArrivalRate()
        self._owed = [0.0] * len(self.lanes)  # slots owed to each lower lane (index 0 unused)
        self._move_up_to = connection.register_script(_MOVE_UP_TO)

    def take_first(self, block_seconds: float) -> Grabbed | None:
        """One id from the highest non-empty lane, blocking up to `block_seconds` on the top lane."""
        taken = self.take_available(1)
        if taken:
            return taken[0]
        top = self.lanes[0]
        moved = self.connection.blmove(top.queue_key, top.intermediate_key, block_seconds, "LEFT", "RIGHT")
        return Grabbed(0, _text(moved)) if moved is not None else None

    def take_available(self, limit: int) -> list[Grabbed]:
        if limit <= 0:
            return []
        reserved = []
        for lane in range(1, len(self.lanes)):
            self._owed[lane] += limit * self.low_share
            reserved.append(int(self._owed[lane]))
        keys = [key for lane in self.lanes for key in (lane.queue_key, lane.intermediate_key)]
        flat = self._move_up_to(keys=keys, args=[limit, *reserved])
        grabbed = [Grabbed(int(flat[i]) - 1, _text(flat[i + 1])) for i in range(0, len(flat), 2)]
        for lane, owed_now in zip(range(1, len(self.lanes)), reserved, strict=True):
            took = sum(1 for g in grabbed if g.lane == lane)
            # A lane that could not fill its reserved slots is empty: it banks nothing, so an idle
            # low lane is not owed a burst later. Otherwise it is paid what it took.
            self._owed[lane] = 0.0 if took < owed_now else max(0.0, self._owed[lane] - took)
        return grabbed

    def waits_for_companions(self, model_idle: bool) -> bool:
        """Whether `wait_for_more` is worth calling: only when the model would otherwise start at
        once; while it is busy, later arrivals join the waiting jobs in the next batch anyway."""
        return model_idle

    def wait_for_more(self, have: int, oldest_arrival: float) -> list[Grabbed]:
        """Ids to add to a batch of `have` that the queues could not fill: waits only while it pays."""
        extra: list[Grabbed] = []
        deadline = oldest_arrival + self.max_delay
        top = self.lanes[0]
        while have + len(extra) < self.max_size:
            remaining = deadline - self.clock()
            if remaining <= 0 or not self.arrivals.expects_arrival_within(remaining):
                break
            # Redis takes fractional BLMOVE timeouts; 1 ms is its floor.
            moved = self.connection.blmove(
                top.queue_key, top.intermediate_key, max(remaining, 0.001), "LEFT", "RIGHT"
            )
            if moved is None:
                break
            extra.append(Grabbed(0, _text(moved)))
            extra += self.take_available(self.max_size - have - len(extra))
        return extra
