"""`python -m worker`: one long-lived batch worker on the configured queue."""

from __future__ import annotations

import argparse
import logging
import sys

from shared.config import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--name", help="worker name (default: a random id)")
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    parser.add_argument("--max-jobs", type=int, default=None, help="quit after this many jobs")
    args = parser.parse_args(argv)

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.jobs import LANES, lane_queue_name
    from worker.batch_worker import BatchWorker

    queues = [lane_queue_name(settings, lane) for lane in LANES]
    worker = BatchWorker(queues, name=args.name, settings=settings)
    worker.work(burst=args.burst, max_jobs=args.max_jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
