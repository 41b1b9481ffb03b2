"""inferq's model behind LitServe: the synchronous peer the bench's `litserve` phase measures.

`python -m bench.litserve_peer --port N --backend onnxruntime --threads 2` (run by the LitServe venv's
interpreter, `bench.peer`; the project on PYTHONPATH) serves `POST /predict`: the raw image bytes
in, the same JSON an inferq job ends with out (`predictions` top-5 and `model`), in one request.

Everything but the server is the project's own: the artifact (verified, on the backend named, warmed
up at batch 1, 2, 4, 8 as a worker warms up), the worker's decode (`shared.preprocess.preprocess`
through the handler's `preprocess_one`, the step a worker's decoder runs) and its forward pass and
top-k (`ClassifyHandler.infer`). LitServe does the rest as it ships: its uvicorn front process hands
each request through a queue to one inference worker process, which collects up to `max_batch_size`
requests, waiting at most `batch_timeout` for them, then decodes them one after the other and runs
one forward pass. A bad image fails its whole batch there (LitServe's rule, not inferq's); the
bench's photos are all valid.

No `from __future__ import annotations` here: LitServe reads `decode_request`'s annotation at run
time to build its FastAPI endpoint, and a string annotation would not resolve in its module.
"""

import argparse
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
from fastapi import Body, HTTPException

PATH = "/predict"
TOP_K = 5
# The raw upload as the request body, like `POST /v1/jobs` takes it (no multipart, no base64).
RawImage = Annotated[bytes, Body(media_type="application/octet-stream")]


class ClassifyAPI(ls.LitAPI):
    """One inference worker's model: setup loads it, each batch is decoded then run in one pass."""

    def __init__(self, backend: str, threads: int, max_batch_size: int, batch_timeout_s: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path=PATH)
        # Plain values only: LitServe pickles this object into its (spawned) inference worker.
        self.backend = backend
        self.threads = threads
        self.max_batch_size_setting = max_batch_size

    def setup(self, device: str) -> None:
        from shared.config import Settings
        from worker.handler import load_handler

        threads = {f"{name}_threads": self.threads for name in ("torch", "onnxruntime", "openvino")}
        settings = Settings().model_copy(
            update={
                "backend": self.backend,
                "max_batch_size": self.max_batch_size_setting,
                # The backend is named and the batch size is LitServe's: nothing to measure, only
                # the warm-up a worker does at the sizes it will run.
                "auto_batch_cap": False,
                **threads,
            }
        )
        self.handler = load_handler(settings)
        # The bench counts this process's CPU apart from the front's (`bench.peer`).
        pid_file = os.environ.get("LITSERVE_PEER_WORKER_PID_FILE")
        if pid_file:
            Path(pid_file).write_text(str(os.getpid()))

    def decode_request(self, request: RawImage) -> Any:
        return self.handler.preprocess_one(request)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: list[Any]) -> list[Any]:
        from worker.handler import PreparedBatch

        outcomes, _ = self.handler.infer(PreparedBatch.of(x), [TOP_K] * len(x))
        return outcomes

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        if output.error is not None:
            error = output.error
            raise HTTPException(status_code=error.http_status, detail=error.to_dict())
        result: dict[str, Any] = output.result
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backend", required=True, choices=("onnxruntime", "openvino", "torchscript"))
    parser.add_argument("--threads", type=int, required=True, help="intra-op threads of the backend")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    main_pid = os.getpid()

    def shut_down(signum: int, frame: object) -> None:
        # SIGTERM (the bench's stop) as LitServe's own Ctrl-C: it stops its worker, front and queue
        # manager, which a main process killed outright would leave running. A forked child that
        # inherited this handler dies of the signal as it would have without it.
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, shut_down)
    api = ClassifyAPI(args.backend, args.threads, args.max_batch_size, args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    # generate_client_file=False: LitServe would otherwise write a client.py into the working folder.
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
