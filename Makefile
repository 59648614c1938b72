# The two commands of the README (each sets everything up first, idempotently):
#   make study   # the batch-size scaling study on the bundled real dataset (the main job)
#   make test    # the test suite (what CI runs)
# Setup: a .venv with torch (the CUDA build 2.14.1 from this machine's package cache; a current one
# elsewhere), the test/bench/train/dali extras (DALI: its CPU pipeline is tested here), and fastlars
# built in place with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

.PHONY: setup study quick test bench lint clean

setup: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch>=2.11" torchvision ninja pybind11
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[test,bench,train,dali]"
	$(PY) -c "import fastlars; print(fastlars.env_report())"
	touch $@

study: setup
	$(PY) -m train.study --preset default

quick: setup
	$(PY) -m train.study --preset quick

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks --device cpu

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info fastlars/_C*.so
