# The two commands of the README (each sets everything up first, idempotently):
#   make study   # the batch-size scaling study on the bundled real dataset (the main job)
#   make test    # the test suite (what CI runs)
#   make fashion # the study on Fashion-MNIST (installs Debian's dataset-fashion-mnist where apt exists)
# Setup: a .venv with torch (the CUDA build 2.14.1 from this machine's package cache; a current one
# elsewhere), the test/bench/train/dali extras (DALI: its CPU pipeline is tested here), and fastlars
# built in place with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

FASHION_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup study quick fashion fashion-data test bench lint clean

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

# Fashion-MNIST: Debian's dataset-fashion-mnist (the four IDX .gz files in $(FASHION_DIR)) where apt exists;
# elsewhere, put the four files in that folder (or any, and pass --data FOLDER to python -m train.study).
fashion-data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_DIR)/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get install -y dataset-fashion-mnist || \
			{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; \
	else \
		echo "No apt here: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and"; \
		echo "t10k-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist, data/fashion) into"; \
		echo "$(FASHION_DIR), or into any folder and run: $(PY) -m train.study --preset fashion --data FOLDER"; \
		exit 1; \
	fi

fashion: setup fashion-data
	$(PY) -m train.study --preset fashion

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks --device cpu

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info fastlars/_C*.so
