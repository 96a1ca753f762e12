# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow demo data train-shapes pipeline prefect-server prefect-worker deploy train-all clean

# torch first, pinned, so pip takes the local CPU wheel instead of resolving a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/janusflow demo --out runs/demo

# The DVC pipeline's data stage; DVC runs `janusflow`, so the venv goes first on PATH.
data: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro data

# Bootstrap + stages 1-3 on the shapes world (configs/shapes/), outputs under runs/shapes/.
train-shapes: data
	for s in bootstrap stage1 stage2 stage3; do \
		$(VENV)/bin/janusflow train --config configs/shapes/$$s.yaml || exit 1; done

# The DVC pipeline end to end (data -> ... -> gate), without Prefect.
pipeline: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro gate

# Prefect: a local server, a process work pool and worker, the deployments of prefect.yaml.
PREFECT_LOCAL := PREFECT_API_URL=http://127.0.0.1:4200/api JANUSFLOW_ROOT=$(CURDIR) \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
prefect-server: $(STAMP)
	$(PREFECT_LOCAL) $(VENV)/bin/prefect server start --background

deploy: $(STAMP)
	$(PREFECT_LOCAL) $(VENV)/bin/prefect work-pool inspect local >/dev/null 2>&1 || \
		$(PREFECT_LOCAL) $(VENV)/bin/prefect work-pool create local --type process
	$(PREFECT_LOCAL) $(VENV)/bin/prefect --no-prompt deploy --all

prefect-worker: $(STAMP)
	$(PREFECT_LOCAL) $(VENV)/bin/prefect worker start --pool local

train-all: $(STAMP)
	$(PREFECT_LOCAL) $(VENV)/bin/prefect deployment run train-all/train-all --watch

clean:
	rm -rf runs .pytest_cache
