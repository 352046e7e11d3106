# mia-gen: `make run` (creates .venv on first use, then runs the quick-start), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-slow test-all bench bench-gpu gpu-wheels clean-cache

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

# The GPU figures (benchmarks/bench_gpu.py; BENCHMARKS.md (g)) on a machine with CUDA and this virtualenv.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py

# Wheels for a GPU machine that has torch but no registry (Python 3.12): what bench_gpu.py needs beyond its
# image, carried as .whl/ and installed by benchmarks/gpu_run.sh. antlr4 4.9 (omegaconf's) is a source
# distribution only, so it is built into a wheel here.
GPU_WHEELS ?= .whl
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
		"diffusers>=0.27" "omegaconf>=2.3" "importlib-metadata>=6"
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_WHEELS) "antlr4-python3-runtime==4.9.*"

clean-cache:
	rm -rf .cache/mia-gen
