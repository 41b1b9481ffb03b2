"""The RQ job function inferq jobs name (`worker.tasks.classify`).

`BatchWorker` never calls it: it runs these jobs in batches. It exists so that every inferq job is a
complete, ordinary RQ job that any RQ worker can run one at a time (`rq worker --serializer
rq.serializers.JSONSerializer inferq`), e.g. as the naive baseline the benchmarks compare with.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from rq import get_current_job

from shared import image_budget
from shared.config import get_settings
from shared.errors import CorruptImage, InferqError
from shared.jobs import META_ERROR, result_payload
from shared.keys import image_key

if TYPE_CHECKING:
    from worker.model import LoadedModel


@lru_cache(maxsize=1)
def _model() -> LoadedModel:
    from worker.model import load_artifact

    settings = get_settings()
    return load_artifact(settings.artifact_dir, device=settings.device)


def classify(key: str, top_k: int) -> dict[str, Any]:
    from worker.reference import classify_reference

    job = get_current_job()
    settings = get_settings()
    connection = job.connection if job is not None else None
    if job is None or connection is None or key != image_key(job.id):
        raise ValueError("classify() runs as an inferq RQ job, whose image lives under its own id's key")
    try:
        data = connection.get(key)
        if data is None:
            raise CorruptImage("The image bytes are gone (expired or deleted).", code="image_missing")
        model = _model()
        predictions = classify_reference(data, model, top_k=min(max(int(top_k), 1), settings.max_top_k))
    except InferqError as exc:
        job.meta[META_ERROR] = exc.to_dict()
        job.save_meta()
        raise
    finally:
        image_budget.release(connection, [job.id])  # deletes the image, un-counts MAX_QUEUED_BYTES
    return result_payload(predictions, {"name": model.manifest.name, "sha256": model.sha256})
