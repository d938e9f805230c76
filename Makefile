# Two idempotent entry points: `make demo` (set up, then the main job) and `make test` (set up, then the suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup demo test torch

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# torch only where it is missing: the CUDA build where a GPU answers, else the CPU build (a local +cpu wheel where
# pip's find-links has one, else PyTorch's CPU index) instead of PyPI's multi-GB CUDA default.
torch:
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu \
			--extra-index-url https://pypi.org/simple; \
	fi

demo: setup
	$(BIN)/parcae generate --max-new-tokens 120 "ROMEO:"
	$(BIN)/parcae generate --max-new-tokens 40 --compare-loops 1,2,4,8,16 "ROMEO:"

test: setup
	$(BIN)/python -m pytest -q
