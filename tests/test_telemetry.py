"""Worker telemetry in Redis (shared.telemetry) and the api's /metrics that exposes it."""

from __future__ import annotations

import io
import math
from typing import Any

import fakeredis
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq.job import Job
from rq.serializers import JSONSerializer

from api import create_app
from shared.config import PROJECT_ROOT, Settings
from shared.telemetry import (
    BATCH_SIZE,
    HISTOGRAMS,
    QUEUE_WAIT,
    RedisHistogram,
    record_batch,
    telemetry_key,
)
from tests.service import free_port
from tests.worker_stub import STUB_MODEL, STUB_SHA256, png, stub_worker, truncated_png


def scrape(client: Any) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}


def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def histogram(families: dict[str, Any], name: str) -> dict[str, Any]:
    values = samples(families[name])
    buckets = {dict(labels)["le"]: v for (sample, labels), v in values.items() if sample.endswith("_bucket")}
    return {"buckets": buckets, "count": values[(f"{name}_count", ())], "sum": values[(f"{name}_sum", ())]}


def test_histogram_math_against_redis(
    fake_redis_server: fakeredis.FakeServer, fake_redis: fakeredis.FakeRedis
) -> None:
    hist = RedisHistogram("inferq_test_seconds", "test", (1, 2, 5))
    with fake_redis.pipeline() as pipe:
        hist.observe(pipe, "ns", [0.5, 1, 1.5, 2, 7, math.nan])  # NaN is not an observation
        assert len(pipe.command_stack) <= len(hist.buckets) + 1 + 2
        pipe.execute()
    raw = fake_redis.hgetall(hist.key("ns"))
    assert raw == {b"1.0": b"2", b"2.0": b"2", b"+Inf": b"1", b"sum": b"12", b"count": b"5"}
    # A second worker (another connection, another process: the same hash) adds to it.
    other = fakeredis.FakeRedis(server=fake_redis_server)
    with other.pipeline() as pipe:
        hist.observe(pipe, "ns", [5.0, 0.1])
        pipe.execute()
    snap = hist.parse(fake_redis.hgetall(hist.key("ns")))
    assert snap.buckets == [(1.0, 3), (2.0, 5), (5.0, 6), (math.inf, 7)]
    assert snap.count == 7 and math.isclose(snap.sum, 17.1)
    assert hist.parse({}).buckets == [(1.0, 0), (2.0, 0), (5.0, 0), (math.inf, 0)]
    other.close()


def test_a_batch_costs_a_bounded_number_of_commands_whatever_its_size(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    def commands(size: int) -> int:
        with fake_redis.pipeline() as pipe:
            record_batch(
                pipe,
                namespace="ns",
                queue_ms=[3.0] * size,
                preprocess_ms=[2.0] * size,
                inference_ms=40.0,
                batch_size=size,
                finished=size - 1,
                failed_by_code={"corrupt_image": 1},
            )
            return len(pipe.command_stack)

    # All values of one kind fall in one bucket here: 3 commands per histogram + 2 counters.
    assert commands(2) == commands(256) == 4 * 3 + 2
    with fake_redis.pipeline() as pipe:
        record_batch(
            pipe,
            namespace="ns",
            queue_ms=[],
            preprocess_ms=[],
            inference_ms=0,
            batch_size=0,
            finished=0,
            failed_by_code={},
        )
        assert not pipe.command_stack


def test_metrics_show_every_workers_telemetry(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = Settings(redis_url=redis_url, max_batch_size=4)
    client = create_app(settings).test_client()
    before = scrape(client)
    submitted_before = samples(before["inferq_jobs_submitted"]) if "inferq_jobs_submitted" in before else {}

    def post(data: bytes, lane: str) -> str:
        response = client.post(
            f"/v1/jobs?priority={lane}", data=data, headers={"Content-Type": "application/octet-stream"}
        )
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()["id"]

    good = [post(png(30 * i), "high") for i in range(5)] + [post(png(99), "low")]
    bad = [post(truncated_png(), "low")]
    multi = client.post(
        "/v1/batches?priority=low",
        data={"image": [(io.BytesIO(png(5)), "a.png"), (io.BytesIO(png(6)), "b.png")]},
        content_type="multipart/form-data",
    )
    assert multi.status_code == 202
    good += [job["id"] for job in multi.get_json()["jobs"]]
    # Two workers one after the other (a restart): the second adds to what the first recorded.
    stub_worker(settings, name="tel-first").work(burst=True, max_jobs=4)
    stub_worker(settings, name="tel-second").work(burst=True)
    live = stub_worker(settings, name="tel-live")
    live.register_birth()

    jobs = [Job.fetch(i, connection=redis_conn, serializer=JSONSerializer) for i in good + bad]
    assert all(job.get_status() in ("finished", "failed") for job in jobs)
    batches = {job.meta["batch_id"] for job in jobs}
    # The batches that ran a forward pass: those with a decodable image (the bad one was in none).
    passes = {job.meta["batch_id"] for job in jobs[: len(good)]}
    families = scrape(client)

    wait = histogram(families, "inferq_job_queue_wait_seconds")
    assert wait["count"] == len(jobs) and wait["buckets"]["+Inf"] == len(jobs)
    assert wait["sum"] > 0
    assert list(wait["buckets"].values()) == sorted(wait["buckets"].values())  # cumulative
    sizes = histogram(families, "inferq_batch_size")
    assert sizes["count"] == len(passes) and sizes["sum"] == len(good)
    assert sizes["buckets"]["4.0"] == len(passes)  # MAX_BATCH_SIZE=4
    assert histogram(families, "inferq_job_preprocess_seconds")["count"] == len(jobs)
    inference = histogram(families, "inferq_batch_inference_seconds")
    assert 1 <= inference["count"] <= len(passes) <= len(batches)
    assert samples(families["inferq_jobs_finished"]) == {("inferq_jobs_finished_total", ()): len(good)}
    assert samples(families["inferq_jobs_failed"]) == {
        ("inferq_jobs_failed_total", (("code", "corrupt_image"),)): 1
    }

    submitted = samples(families["inferq_jobs_submitted"])
    for lane, count in (("high", 5), ("low", 4)):
        key = ("inferq_jobs_submitted_total", (("lane", lane),))
        assert submitted[key] - submitted_before.get(key, 0) == count

    assert samples(families["inferq_workers_live"]) == {("inferq_workers_live", ()): 1}
    (info,) = families["inferq_worker_info"].samples
    assert info.value == 1
    assert info.labels == {
        "worker": "tel-live",
        "hostname": live.hostname,
        "model": STUB_MODEL,
        "model_sha256": STUB_SHA256,
        "queues": "inferq,inferq-low",
    }
    live.register_death()
    after = scrape(client)
    assert not after["inferq_worker_info"].samples
    assert samples(after["inferq_workers_live"]) == {("inferq_workers_live", ()): 0}


def test_a_job_whose_image_failed_to_decode_reports_no_forward_pass(redis_url: str) -> None:
    """Its timings have no inference time or batch size (it was in no forward pass), a job of the
    same batch reports the pass it was in, and the batch-size histogram counts that pass alone."""
    settings = Settings(redis_url=redis_url, queue_name="no-forward-pass", max_batch_size=4)
    client = create_app(settings).test_client()
    sizes_before = histogram(scrape(client), "inferq_batch_size")

    def post(data: bytes) -> str:
        response = client.post("/v1/jobs", data=data, headers={"Content-Type": "image/png"})
        assert response.status_code == 202, response.get_data(as_text=True)
        return str(response.get_json()["id"])

    good, bad = post(png(40)), post(truncated_png())
    stub_worker(settings).work(burst=True)

    bad_view = client.get(f"/v1/jobs/{bad}").get_json()
    assert bad_view["status"] == "failed" and bad_view["error"]["code"] == "corrupt_image"
    assert bad_view["timings"]["inference_ms"] is None, bad_view
    assert bad_view["timings"]["batch_size"] is None, bad_view
    good_view = client.get(f"/v1/jobs/{good}").get_json()
    assert good_view["status"] == "finished"
    assert good_view["timings"]["inference_ms"] > 0
    assert good_view["timings"]["batch_size"] == 1, good_view  # the one decodable image
    sizes = histogram(scrape(client), "inferq_batch_size")
    assert sizes["count"] - sizes_before["count"] == 1
    assert sizes["sum"] - sizes_before["sum"] == 1


def test_the_readme_says_what_the_failure_counters_help_text_says(redis_url: str) -> None:
    """One description of `inferq_jobs_failed_total`: its HELP on /metrics is the README's row."""
    client = create_app(Settings(redis_url=redis_url)).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    (help_line,) = [line for line in text.splitlines() if line.startswith("# HELP inferq_jobs_failed_total ")]
    help_text = help_line.removeprefix("# HELP inferq_jobs_failed_total ")
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `inferq_jobs_failed_total` |")]
    assert row.split(" | ")[-1].removesuffix(" |").replace("`", "") == help_text


def test_idempotent_replays_are_not_counted(redis_url: str) -> None:
    client = create_app(Settings(redis_url=redis_url)).test_client()

    def submitted() -> float:
        family = scrape(client).get("inferq_jobs_submitted")
        return samples(family).get(("inferq_jobs_submitted_total", (("lane", "high"),)), 0) if family else 0

    start = submitted()
    headers = {"Content-Type": "image/png", "Idempotency-Key": "replay-test-1"}
    first = client.post("/v1/jobs", data=png(1), headers=headers)
    again = client.post("/v1/jobs", data=png(1), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert submitted() - start == 1


def test_keys_are_namespaced_by_queue_name() -> None:
    assert QUEUE_WAIT.key("inferq") == telemetry_key("inferq", "job_queue_wait_seconds")
    assert BATCH_SIZE.key("other") == "inferq:telemetry:v1:other:batch_size"
    assert len({h.name for h in HISTOGRAMS}) == 4


def test_a_scrape_with_redis_down_still_answers(tmp_path: Any) -> None:
    client = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    families = scrape(client)
    assert samples(families["inferq_redis_up"]) == {("inferq_redis_up", ()): 0}
    assert "inferq_worker_info" not in families
