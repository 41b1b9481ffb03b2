# The inferq image: the api, the batch workers and rq-dashboard all run from it (docker-compose.yml).
#
#   docker build -t inferq .
#       torch from PyPI as pinned in requirements.txt: the CUDA build, which also runs on the CPU
#       (a large image: the NVIDIA runtime libraries come with it).
#   docker build --build-arg TORCH_INDEX=<PyTorch's CPU wheel index URL> -t inferq:cpu .
#       CPU-only variant: torch/torchvision (same versions) come from that index, and the CUDA-only
#       pins (nvidia-*, cuda-*, triton) are not installed. Several GB smaller.
# The api binds HOST=0.0.0.0 here, which the bind rule allows only with API keys: give it API_KEYS
# or API_KEYS_FILE (docker-compose.yml mounts a keys file as a secret). Never bake keys into the image.
# GPU at run time: the default (CUDA) build, DEVICE=cuda, and a GPU given to the worker containers
# (NVIDIA Container Toolkit; `gpus: all` or `deploy.resources.reservations.devices` in compose).
#   docker build --target worker-slim -t inferq-worker-slim .
#       A CPU worker without torch: requirements-worker.txt (ONNX Runtime + OpenVINO), the source and
#       the artifact built by the full image; BACKEND=auto serves the ONNX export on the faster one.
FROM python:3.11-slim AS full

ARG TORCH_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app

# glibc's malloc, like a fresh machine: the default backends (ONNX Runtime, OpenVINO) allocate in
# their own arenas, and OpenVINO's compile_model deadlocks under a preloaded tcmalloc (README, tcmalloc).

# Dependencies first: this layer is rebuilt only when the pins change.
COPY requirements.txt ./
RUN set -eu; \
    if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" \
            "$(grep -E '^torch==' requirements.txt)" "$(grep -E '^torchvision==' requirements.txt)"; \
        grep -vE '^(nvidia-|cuda-|triton==)' requirements.txt > /tmp/requirements.txt; \
    else \
        cp requirements.txt /tmp/requirements.txt; \
    fi; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

COPY . .

# The default model artifact, built at image build time from the weights a pinned package ships
# (no download), byte-for-byte reproducible; owned by root, so read-only for the app.
RUN python -m artifacts.build --out artifacts/efficientnet_lite0 \
    && useradd --system --uid 10001 --home-dir /home/inferq --create-home --shell /usr/sbin/nologin inferq

USER inferq

EXPOSE 8000

# Liveness of the api process (no Redis call). compose overrides it per service: /readyz for the
# api, none for the workers (no HTTP), the dashboard's own page.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"]

# --- the slim CPU worker: no torch, the artifact copied from the full build --------------------------
FROM python:3.11-slim AS worker-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

COPY requirements-worker.txt ./
RUN pip install -r requirements-worker.txt

COPY . .
COPY --from=full /app/artifacts/efficientnet_lite0 artifacts/efficientnet_lite0
RUN useradd --system --uid 10001 --home-dir /home/inferq --create-home --shell /usr/sbin/nologin inferq

USER inferq

# No HTTP in a worker: liveness is its RQ heartbeat (/readyz of the api counts live workers).
HEALTHCHECK NONE

CMD ["python", "-m", "worker"]

# --- the default target: the full image (api, workers, dashboard) ---------------------------------------
FROM full
