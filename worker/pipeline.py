"""The hand-over between a batch worker's feeder thread and its model thread.

Batches are formed late, by the model thread, not by the feeder: the feeder starts and preprocesses
jobs one by one as they arrive and parks them here; whenever the model thread is free it takes
everything that is ready, up to the batch cap. So a job that arrives while a forward pass runs joins
the next batch with every other job that arrived meanwhile, instead of being committed to a batch of
its own that the later arrivals then queue behind (Triton's dynamic batcher forms batches the same
way: when a model instance becomes available).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadyItems(Generic[T]):
    """Prepared items waiting for a forward pass, at most `capacity` of them.

    The feeder waits for room before it grabs more jobs, so a worker never holds more started jobs
    than the batch being computed plus `capacity` ready ones (the rest stay queued in Redis, where
    other workers can take them)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._model_busy = False

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def put(self, item: T) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("put after close")
            self._items.append(item)
            self._changed.notify_all()

    def room(self, timeout: float) -> int:
        """Free places, waiting up to `timeout` s while there are none (0 if none came)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._items) < self.capacity or self._closed, timeout)
            return max(0, self.capacity - len(self._items))

    def idle(self) -> bool:
        """Nothing ready and no batch taken but not yet released: a new job would run at once."""
        with self._changed:
            return not self._items and not self._model_busy

    def take(self, limit: int) -> list[T]:
        """Up to `limit` items, oldest first, blocking until there is one; [] once closed and empty.
        The taker is busy until it calls `release()`."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self._items) or self._closed)
            taken = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._model_busy = bool(taken)
            self._changed.notify_all()
            return taken

    def release(self) -> None:
        with self._changed:
            self._model_busy = False
            self._changed.notify_all()

    def close(self) -> None:
        """No more puts: `take` drains what is left, then returns []."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
