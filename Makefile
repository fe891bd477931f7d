# The two commands the README names: `make demo` (main job on the bundled default) and `make test`.
# Both create .venv on first use, installing torch==2.13.0 (the CPU build) before anything else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lorakit demo

test: install
	$(BIN)/python -m pytest -q -m "not slow" --timeout 600

test-slow: install
	$(BIN)/python -m pytest -q -m slow --timeout 1800

bench: install
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
