"""The batch-grab policy against a real server: reliability, closing rule, lanes and their shares."""

from __future__ import annotations

import redis

from worker.batching import ArrivalRate, BatchCollector, Lane

HIGH = Lane("rq:queue:t", "rq:queue:t:intermediate")
LOW = Lane("rq:queue:t-low", "rq:queue:t-low:intermediate")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def push(conn: redis.Redis, lane: Lane, *ids: str) -> None:
    conn.rpush(lane.queue_key, *ids)


def test_grabbed_ids_sit_in_the_intermediate_list(redis_conn: redis.Redis) -> None:
    push(redis_conn, HIGH, "a", "b", "c")
    collector = BatchCollector(redis_conn, [HIGH], max_size=8, max_delay=0.01)
    first = collector.take_first(0.1)
    rest = collector.take_available(7)
    assert [first.job_id, *(g.job_id for g in rest)] == ["a", "b", "c"]
    # Until a worker starts them, the ids are never only in a worker's memory.
    assert redis_conn.lrange(HIGH.intermediate_key, 0, -1) == [b"a", b"b", b"c"]
    assert redis_conn.llen(HIGH.queue_key) == 0


def test_take_available_stops_at_the_limit(redis_conn: redis.Redis) -> None:
    push(redis_conn, HIGH, *[str(i) for i in range(10)])
    collector = BatchCollector(redis_conn, [HIGH], max_size=4, max_delay=0)
    assert [g.job_id for g in collector.take_available(4)] == ["0", "1", "2", "3"]
    assert redis_conn.llen(HIGH.queue_key) == 6


def test_idle_take_first_times_out_empty(redis_conn: redis.Redis) -> None:
    collector = BatchCollector(redis_conn, [HIGH, LOW], max_size=4, max_delay=0)
    assert collector.take_first(0.05) is None


def test_a_lone_job_does_not_wait_when_no_arrival_is_expected(redis_conn: redis.Redis) -> None:
    clock = FakeClock()
    collector = BatchCollector(redis_conn, [HIGH], max_size=8, max_delay=10.0, clock=clock)
    # No arrival history: nothing predicts a companion, so no wait at all (the call returns at once).
    assert collector.wait_for_more(1, oldest_arrival=clock.now) == []
    # Sparse history (one job every 30 s) predicts nothing within a 10 s budget either.
    collector.arrivals.observe([0.0, 30.0, 60.0])
    assert collector.wait_for_more(1, oldest_arrival=clock.now) == []


def test_the_wait_is_bounded_by_the_oldest_jobs_age(redis_conn: redis.Redis) -> None:
    clock = FakeClock()
    collector = BatchCollector(redis_conn, [HIGH], max_size=8, max_delay=0.05, clock=clock)
    collector.arrivals.observe([0.0, 0.001, 0.002])  # dense traffic: companions are expected
    # The oldest job arrived 0.06 s ago: its 0.05 s budget is spent, so the batch closes now.
    assert collector.wait_for_more(1, oldest_arrival=clock.now - 0.06) == []


def test_dense_traffic_waits_and_collects_companions(redis_conn: redis.Redis) -> None:
    collector = BatchCollector(redis_conn, [HIGH], max_size=4, max_delay=5.0)
    collector.arrivals.observe([0.0, 0.001, 0.002])
    push(redis_conn, HIGH, "x", "y", "z")
    import time

    extra = collector.wait_for_more(1, oldest_arrival=time.time())
    assert [g.job_id for g in extra] == ["x", "y", "z"]


def test_arrival_rate_is_a_smoothed_gap() -> None:
    rate = ArrivalRate(weight=0.5)
    rate.observe([10.0, 11.0])
    assert rate.mean_gap == 1.0
    rate.observe([14.0])
    assert rate.mean_gap == 2.0
    assert rate.expects_arrival_within(2.5) and not rate.expects_arrival_within(1.5)


def test_high_lane_goes_first_but_low_gets_its_share(redis_conn: redis.Redis) -> None:
    push(redis_conn, HIGH, *[f"h{i}" for i in range(100)])
    push(redis_conn, LOW, *[f"l{i}" for i in range(100)])
    collector = BatchCollector(redis_conn, [HIGH, LOW], max_size=8, max_delay=0, low_share=0.25)
    taken = [g for _ in range(10) for g in collector.take_available(8)]
    low = sum(1 for g in taken if g.lane == 1)
    assert len(taken) == 80
    assert low == 20, "a quarter of the slots while both lanes are backed up"
    assert redis_conn.llen(LOW.queue_key) == 80


def test_low_lane_is_not_starved_even_with_batches_of_one(redis_conn: redis.Redis) -> None:
    push(redis_conn, HIGH, *[f"h{i}" for i in range(100)])
    push(redis_conn, LOW, *[f"l{i}" for i in range(100)])
    collector = BatchCollector(redis_conn, [HIGH, LOW], max_size=1, max_delay=0, low_share=0.25)
    lanes = [collector.take_available(1)[0].lane for _ in range(40)]
    assert lanes.count(1) == 10


def test_low_lane_gets_everything_when_high_is_idle(redis_conn: redis.Redis) -> None:
    push(redis_conn, LOW, *[f"l{i}" for i in range(5)])
    collector = BatchCollector(redis_conn, [HIGH, LOW], max_size=8, max_delay=0)
    first = collector.take_first(0.05)
    assert first is not None and first.lane == 1
    assert len(collector.take_available(7)) == 4
    assert redis_conn.lrange(LOW.intermediate_key, 0, -1) == [f"l{i}".encode() for i in range(5)]
