# Bowline: `make run` serves the bundled tiny model on CPU; `make test` installs everything and runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= models/tiny
PYTEST_ARGS ?=

.PHONY: help install run test unit integration lint bench bench-operator images kind-up kind-down e2e helm-lint tiny-model clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/.installed: runtime/pyproject.toml operator/pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first, pinned: the CPU build; an unpinned resolve could pull a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e runtime -e operator -r requirements-test.txt
	touch $@

install: $(BIN)/.installed ## create .venv and install runtime, operator and test tools

$(MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/python -m bowline_runtime make-tiny-model $(MODEL) --preset tiny

tiny-model: $(MODEL)/config.json ## build the bundled tiny model (random weights, local tokenizer)

run: install tiny-model ## serve the tiny model on CPU at http://$(HOST):$(PORT)/v1
	@echo 'Try: curl http://$(HOST):$(PORT)/v1/chat/completions -H "Content-Type: application/json" -d '"'"'{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'"'"
	$(BIN)/python -m bowline_runtime serve --model $(MODEL) --served-model-name tiny --device cpu --host $(HOST) --port $(PORT)

test: install ## install everything and run the whole suite (exit 5, no tests collected, fails)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

lint: install ## ruff over the Python code
	$(BIN)/ruff check runtime operator tests bench

bench: install ## engine and server benchmarks against baselines (not part of make test)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) models bench/results .pytest_cache
