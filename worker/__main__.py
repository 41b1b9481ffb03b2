"""`python -m worker`: one long-lived batch worker on the configured queue."""

from __future__ import annotations

import argparse
import sys

from shared.config import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--name", help="worker name (default: a random id)")
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    parser.add_argument("--max-jobs", type=int, default=None, help="quit after this many jobs")
    args = parser.parse_args(argv)

    settings = get_settings()
    # JSON lines by default (LOG_FORMAT), secrets redacted (shared.logging_setup); the model load is logged.
    from shared.logging_setup import configure_logging

    configure_logging(service="worker", log_format=settings.log_format, level=settings.log_level)
    from worker.batch_worker import BatchWorker

    worker = BatchWorker(name=args.name, settings=settings)  # listens on every lane of QUEUE_NAME
    worker.work(burst=args.burst, max_jobs=args.max_jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
