# Fresh machine: `make run` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h \
             csrc/cuda/*.cuh) setup.py pyproject.toml
# The Triton of the GPU machines (3.6); on a CPU machine its interpreter runs the Triton kernels in the tests.
TRITON ?= triton==3.6.0

.PHONY: setup run test bench clean

setup: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q "numpy>=1.26" "ninja>=1.11" "setuptools>=69" wheel "tqdm>=4.66" "rich>=13" \
		"pytest>=8" "hypothesis>=6.100" expecttest "matplotlib>=3.8" "scikit-learn>=1.4" "$(TRITON)"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# SparseProp is an optional peer of the benchmark; it builds from source (about 30 s).
$(VENV)/.bench: $(VENV)/.deps
	$(BIN)/pip install -q "pybind11>=2.10" scipy
	$(BIN)/pip install -q --no-build-isolation sparseprop || echo "sparseprop did not install: its column will read n/a"
	touch $@

run: setup
	$(BIN)/sparsekern demo

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup $(VENV)/.bench
	$(BIN)/sparsekern bench

clean:
	rm -rf build $(VENV) sparsekern/*.so *.egg-info
