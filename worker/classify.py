"""Classify image files from the command line, in-process, with the reference (unbatched) pipeline.

    python -m worker.classify [--artifact DIR] [--backend NAME] [--top-k 5] IMAGE...
    make classify IMAGES="a.jpg b.png" [BACKEND=onnxruntime]

Prints one table row per prediction. An image that cannot be classified prints its error code and
message instead, the other images still print, and the exit status is 1. Exit status 2: the artifact
itself is unusable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from shared.config import get_settings
from shared.errors import ArtifactError, InferqError
from worker.backends import BACKEND_NAMES


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m worker.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=settings.artifact_dir, help="Artifact folder.")
    parser.add_argument(
        "--backend",
        choices=["auto", *BACKEND_NAMES],
        default=settings.backend,
        help="The runtime (default: BACKEND, else auto: the fastest installed one at batch 1).",
    )
    parser.add_argument("--top-k", type=int, default=5, help="Predictions per image (default 5).")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    # Imported here so `--help` and argument errors answer without loading a runtime.
    from worker.backend_choice import measure_backends
    from worker.reference import classify_reference

    try:
        chosen = settings.model_copy(update={"artifact_dir": args.artifact, "backend": args.backend})
        model = measure_backends(chosen, (1,), measure=args.backend == "auto").runner.model
    except ArtifactError as exc:
        print(f"cannot load the model artifact: {exc}", file=sys.stderr)
        return 2

    rows: list[tuple[str, str, str, str]] = []
    failed = 0
    for path in args.images:
        try:
            predictions = classify_reference(path.read_bytes(), model, args.top_k, settings.max_image_pixels)
        except InferqError as exc:
            failed += 1
            rows.append((str(path), "-", f"error {exc.code}", exc.message))
            continue
        except OSError as exc:
            failed += 1
            rows.append((str(path), "-", "error unreadable_file", exc.strerror or str(exc)))
            continue
        for rank, p in enumerate(predictions, start=1):
            rows.append((str(path), str(rank), p["label"], f"{p['score']:.4f}"))

    header = ("file", "rank", "label", "score")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)] + [0]
    backend = model.backend
    served = f"{backend.path.name} sha256 {model.sha256[:12]} on {backend.name} {backend.version}"
    print(f"model {model.name} {served}", file=out)
    for r in rows:
        print(_row(r, widths), file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
