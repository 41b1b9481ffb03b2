# The two commands of a fresh machine: `make up` runs the service, `make test` runs the tests.
# Both build the Python environment they need from the pinned requirements. It lives outside the
# clone, keyed by the pins' hash, so a re-run (or another clone) reuses the multi-GB torch install.

SHELL := /bin/bash
PYTHON ?= python3.11
INFERQ_CACHE ?= $(HOME)/.cache/inferq
PINS_HASH := $(shell cat requirements.txt requirements-dev.txt | $(PYTHON) -c 'import sys,hashlib;print(hashlib.sha256(sys.stdin.buffer.read()+sys.version.encode()).hexdigest()[:16])')
VENV ?= $(INFERQ_CACHE)/venv-$(PINS_HASH)
PY := $(VENV)/bin/python
ARTIFACT_DIR ?= artifacts/efficientnet_lite0
IMAGES ?=
BACKEND ?=

.PHONY: venv artifact test test-packages lint up classify bench soak clean

# `.venv` in the clone points at the cached environment; the editable install puts the `inferq`
# CLI on it (the environment is shared by clones with the same pins: the last one installed wins).
# It is skipped when this clone's install, from this pyproject.toml, is in place: pip takes seconds
# even with nothing to do, and `make up` runs this step every time (launch/editable_install.py).
venv: $(VENV)/.complete
	@ln -sfn $(VENV) .venv
	@$(PY) -m launch.editable_install

# Marked complete only after the install succeeds, so an interrupted install is wiped and redone.
# No file prerequisites: the pins' hash is in the path, and a fresh clone's mtimes mean nothing.
$(VENV)/.complete:
	@echo "==> building the Python environment in $(VENV) (first run: several minutes, torch is large)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

artifact: venv
	$(PY) -m artifacts.build --out $(ARTIFACT_DIR) --if-missing

# The Debian packages the tests use as real clients (a browser, nginx, Compose): installed when
# missing. Not root and no sudo: a warning, and the tests that need them skip (CI runs as root).
test-packages:
	@missing=$$(sed 's/#.*//' tests/debian-packages.txt | xargs -n1 | while read -r p; do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'ok installed' || echo "$$p"; done | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	  echo "WARNING: not root: the tests that need $$missing will skip"; exit 0; fi; \
	echo "==> installing Debian packages for the tests: $$missing"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

test: venv artifact test-packages
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

classify: venv artifact
	@test -n "$(IMAGES)" || { echo 'usage: make classify IMAGES="a.jpg b.png" [BACKEND=onnxruntime]'; exit 2; }
	$(PY) -m worker.classify --artifact $(ARTIFACT_DIR) $(if $(BACKEND),--backend $(BACKEND)) $(IMAGES)

up: venv artifact
	$(PY) -m launch.launcher

# `make bench BENCH_ARGS="--only service,litserve --quick"`: some phases, small counts.
bench: venv artifact
	$(PY) -m bench $(BENCH_ARGS)

# The long drills (bench/soak_*.py: worker deaths, a full Redis, decode bombs) → SOAK.md.
# `make soak SOAK_ARGS=--quick`: small counts, a smoke run of every drill.
soak: venv artifact
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(ARTIFACT_DIR) .inferq .pytest_cache .ruff_cache
