# Idempotent entry points: `make demo` (set up, then the main job), `make test` (set up, then the suite but its slow
# lanes), `make test-slow` (the slow lanes: multi-process training, golden CORE evaluation, the executable docs) and
# `make test-versions` (the compact suite on every supported transformers release) and `make test-serve` (vLLM serving
# the demo, docs/serving.md).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup demo test test-slow test-versions test-serve torch

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	$(BIN)/pip install -q -e ".[all,test]"
	touch $@

# torch only where it is missing: a machine's own torch build is never replaced. pip takes it from the indexes and
# find-links this machine is configured with, preferring the +cpu build where no GPU answers; TORCH_INDEX_URL adds an
# index for this one install (e.g. PyTorch's CPU or CUDA wheel index; README, "Two commands").
TORCH_INDEX_URL ?=
PIP_TORCH := $(BIN)/pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url "$(TORCH_INDEX_URL)")
torch:
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PIP_TORCH) "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP_TORCH) "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || $(PIP_TORCH) "torch==$(TORCH_VERSION)"; \
	fi

demo: setup
	$(BIN)/parcae generate --max-new-tokens 120 "ROMEO:"
	$(BIN)/parcae generate --max-new-tokens 40 --compare-loops 1,2,4,8,16 "ROMEO:"

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not docs and not serve"

test-slow: setup
	$(BIN)/python -m pytest -q -m "(slow or docs) and not serve"

# The compact suite (marker `versions`) on every supported transformers release, each in its own environment cached
# under $(PARCAE_ENV_CACHE) (default ~/.cache/parcae-transformers/envs); .ci/transformers_lane.py says how.
test-versions: setup
	$(BIN)/python .ci/transformers_lane.py

# The tests marked `serve` (vLLM serving the demo) in a vLLM environment cached under $(PARCAE_ENV_CACHE); skipped with
# a message where vLLM has no build for the machine, unless PARCAE_SERVE_REQUIRED=1 (.ci/serve_lane.py says how).
test-serve: setup
	$(BIN)/python .ci/serve_lane.py
