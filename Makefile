# mia-gen: `make run` (creates .venv on first use, then runs the quick-start), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-slow test-all bench clean-cache

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the bundled default (DCGAN on scikit-learn digits); extra Hydra
# overrides go in ARGS, e.g. `make run ARGS="logger=none attack=[sample_distance]"`.
run: $(STAMP)
	$(BIN)/mia-gen $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_knn.py
	$(BIN)/python benchmarks/bench_lpips.py
	$(BIN)/python benchmarks/bench_sampling_memory.py
	$(BIN)/python benchmarks/bench_diffusion_attacks.py
	$(BIN)/python benchmarks/bench_inversion.py
	$(BIN)/python benchmarks/bench_inversion.py --optimizer lbfgs --repeats 2
	$(BIN)/python benchmarks/bench_shadow_attacks.py

clean-cache:
	rm -rf .cache/mia-gen
