"""`inferq`: classify image files and read jobs from the command line.

    inferq classify photo.jpg more/ -r --format jsonl
    inferq classify backlog/ --priority low --deadline-ms 60000
    inferq status <job-id> --wait 30

Each image is one request when it ends within 30 s (`Client.classify`: `Prefer: wait`), else its
submit is followed by long-polls.

Exit codes: 0 every image finished; 1 any image failed or was refused (or `status` of a failed, expired,
canceled or unknown job); 2 usage error, or the service cannot be reached / refuses the API key.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from client import __version__
from client.errors import AuthenticationError, ClientError, InvalidInput, JobFailed, Unavailable
from client.models import JobResult
from client.sdk import DEFAULT_URL, Client, Outcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Folders are expanded to files with these extensions (case-insensitive). Files named on the
# command line are always sent, whatever their name: the api judges the bytes, not the name.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_COLUMNS = ("file", "status", "label", "index", "score", "error_code")


class UsageError(Exception):
    """Reported on stderr with exit code 2."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = Client(args.url, args.api_key)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        with client:
            return int(args.run(client, args))
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        # Worker threads may sit in a 30 s long-poll; do not wait for them to notice.
        _flush_quietly()
        print("inferq: interrupted", file=sys.stderr)
        os._exit(130)
    except BrokenPipeError:
        # `inferq classify ... | head`: the reader left; say nothing more. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


# --- classify ------------------------------------------------------------------------------------


def run_classify(client: Client, args: argparse.Namespace) -> int:
    files = expand_paths(args.paths, recursive=args.recursive)
    _preflight(client)
    show_progress = args.progress if args.progress is not None else len(files) > 1 and sys.stderr.isatty()
    bar = _progress_bar(len(files)) if show_progress else None

    def emit(line: str) -> None:
        if bar is not None:
            bar.write(line, file=sys.stdout)  # prints above the bar instead of through it
        else:
            print(line, flush=True)

    writer = _WRITERS[args.format](emit)
    outcomes: list[Outcome] = []
    try:
        results = client.classify_many(
            files,
            top_k=args.top_k,
            concurrency=args.concurrency,
            timeout=args.timeout,
            priority=args.priority,
            deadline_ms=args.deadline_ms,
        )
        for path, outcome in results:
            outcomes.append(outcome)
            writer.add(str(path), outcome)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    writer.close()
    return _exit_code(outcomes)


def expand_paths(paths: Iterable[str], recursive: bool) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, hidden entries skipped)."""
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(_images_in(path, recursive))
        elif path.exists():
            files.append(path)
        else:
            missing.append(raw)
    if missing:
        raise UsageError("no such file or directory: " + ", ".join(missing))
    if not files:
        raise UsageError("no image files found (folders are expanded by extension; -r to recurse)")
    return files


def _images_in(folder: Path, recursive: bool) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):  # symlinked folders are not followed: no loops
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(names):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(root, name)


def _preflight(client: Client, *, need_workers: bool = True) -> None:
    """Fail fast (exit 2) when the service cannot be reached, rather than once per file, or after
    the client's retries of a refused connection (seconds of backoff)."""
    try:
        readiness = client.ready()
    except ClientError as exc:
        raise UsageError(f"cannot use the inferq service: {exc}") from exc
    if need_workers and not readiness.ready:
        print(
            f"inferq: warning: the service is not ready ({readiness.reason}); jobs wait in the queue",
            file=sys.stderr,
        )


def _exit_code(outcomes: list[Outcome]) -> int:
    if all(isinstance(o, JobResult) for o in outcomes):
        return EXIT_OK
    # Nothing got through and every error says "cannot reach / not allowed": the service is the
    # problem, not the images.
    if not any(isinstance(o, JobResult) for o in outcomes) and all(
        isinstance(o, Unavailable | AuthenticationError) for o in outcomes
    ):
        return EXIT_USAGE
    return EXIT_FAILED


def outcome_record(path: str, outcome: Outcome) -> dict[str, Any]:
    """One file's outcome as the api's job shape plus `file`; errors that never became a job
    (refused upload, unreadable file, unreachable service) get status `rejected` or `error`."""
    if isinstance(outcome, JobResult):
        return {"file": path, **outcome.to_dict()}
    if isinstance(outcome, JobFailed):
        return {"file": path, **outcome.result.to_dict()}
    return {
        "file": path,
        "id": outcome.job_id,
        "status": "rejected" if isinstance(outcome, InvalidInput) else "error",
        "predictions": [],
        "model": None,
        "error": outcome.to_dict(),
        "timings": None,
        "created_at": None,
        "started_at": None,
        "ended_at": None,
    }


class _JsonlWriter:
    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit

    def add(self, path: str, outcome: Outcome) -> None:
        self.emit(json.dumps(outcome_record(path, outcome), ensure_ascii=False))

    def close(self) -> None:
        pass


class _CsvWriter:
    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self._line(CSV_COLUMNS)

    def _line(self, row: Iterable[object]) -> None:
        # csv.writer wants a file; format one row at a time so lines stream out as results arrive.
        buffer = _LineBuffer()
        csv.writer(buffer, lineterminator="").writerow(row)
        self.emit(buffer.text)

    def add(self, path: str, outcome: Outcome) -> None:
        record = outcome_record(path, outcome)
        top = record["predictions"][0] if record["predictions"] else None
        error = record["error"] or {}
        self._line(
            (
                path,
                record["status"],
                top["label"] if top else "",
                top["index"] if top else "",
                top["score"] if top else "",
                error.get("code", ""),
            )
        )

    def close(self) -> None:
        pass


class _TableWriter:
    """Aligned columns need every row first: printed when all files are done."""

    HEADER = ("FILE", "STATUS", "LABEL", "SCORE", "ERROR")

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.rows: list[tuple[str, ...]] = []

    def add(self, path: str, outcome: Outcome) -> None:
        record = outcome_record(path, outcome)
        top = record["predictions"][0] if record["predictions"] else None
        error = record["error"]
        self.rows.append(
            (
                path,
                record["status"],
                top["label"] if top else "-",
                f"{top['score']:.4f}" if top else "-",
                f"{error['code']}: {error['message']}" if error else "",
            )
        )

    def close(self) -> None:
        rows = [self.HEADER, *self.rows]
        # The last column (the error message) is not padded: it may be long.
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            self.emit("  ".join([*cells, row[-1]]).rstrip())


_WRITERS: dict[str, Callable[[Callable[[str], None]], _JsonlWriter | _CsvWriter | _TableWriter]] = {
    "table": _TableWriter,
    "jsonl": _JsonlWriter,
    "csv": _CsvWriter,
}


class _LineBuffer:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm  # only when a bar is shown: keeps `inferq status` startup lean

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


# --- status --------------------------------------------------------------------------------------


def run_status(client: Client, args: argparse.Namespace) -> int:
    if not args.job_id:
        raise UsageError("a job id is required: inferq status <job-id>")
    _preflight(client, need_workers=False)
    try:
        result = client.wait(args.job_id, args.wait) if args.wait else client.get(args.job_id)
    except (Unavailable, AuthenticationError) as exc:
        raise UsageError(f"cannot use the inferq service: {exc}") from exc
    except ClientError as exc:
        return _fail(str(exc), EXIT_FAILED)
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return EXIT_OK if result.status in ("queued", "started", "finished") else EXIT_FAILED


# --- plumbing ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # --url / --api-key are accepted before or after the subcommand: the subcommands' copies
    # default to SUPPRESS so they only override what the top level parsed.
    def connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
        parser.add_argument(
            "--url",
            default=default,
            help=f"base URL of the api (default: $INFERQ_URL or {DEFAULT_URL})",
        )
        parser.add_argument(
            "--api-key",
            default=default,
            help="sent as 'Authorization: Bearer' (default: $INFERQ_API_KEY; prefer it: argv shows in ps)",
        )

    parser = argparse.ArgumentParser(
        prog="inferq",
        description="Classify images with an inferq service.",
        epilog="Exit codes: 0 all finished, 1 any image failed or was refused, "
        "2 usage error or service unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"inferq {__version__}")
    connection_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="classify image files and folders")
    connection_options(classify, argparse.SUPPRESS)
    classify.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    classify.add_argument("-r", "--recursive", action="store_true", help="also look in subfolders")
    classify.add_argument("-k", "--top-k", type=_positive_int, default=5, help="predictions per image")
    classify.add_argument(
        "-c", "--concurrency", type=_positive_int, default=8, help="images in flight (default 8)"
    )
    classify.add_argument(
        "-f", "--format", choices=sorted(_WRITERS), default="table", help="output format (default table)"
    )
    classify.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for each image")
    classify.add_argument(
        "--priority",
        choices=("high", "low"),
        default=None,
        help="the jobs' lane (default: the server's, high); low jobs still get a share of every batch",
    )
    classify.add_argument(
        "--deadline-ms",
        type=_positive_int,
        default=None,
        metavar="MS",
        help="a job no worker has started within MS milliseconds of its submission ends 'expired' "
        "without running (default: no deadline)",
    )
    classify.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal and there are several files)",
    )
    classify.set_defaults(run=run_classify)

    status = commands.add_parser("status", help="show one job (as JSON)")
    connection_options(status, argparse.SUPPRESS)
    status.add_argument("job_id", metavar="ID")
    status.add_argument(
        "--wait", type=_seconds, default=0.0, metavar="S", help="wait up to S seconds for it to end"
    )
    status.set_defaults(run=run_status)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def _fail(message: str, code: int) -> int:
    print(f"inferq: {message}", file=sys.stderr)
    return code


def _flush_quietly(*streams: TextIO) -> None:
    for stream in streams or (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
