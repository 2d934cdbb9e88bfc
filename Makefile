# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONWARNINGS := ignore::FutureWarning
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
# one thread per process: tests and the demo start several ranks on 2 cores, and oversubscription is ~10x slower
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast lint bench demo clean

setup: .venv/.done

.venv/.done: requirements.txt
	@command -v mpirun >/dev/null || { echo "setup: installing Open MPI (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin) >/dev/null || \
	  echo "setup: Open MPI not installed; mpirun tests will skip"; }
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing later can swap it (README: "The two commands")
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements.txt
	# the project itself, editable, so launch/ scripts and subprocesses import it from anywhere
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed and not slurm and not multinode"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench.run

demo: setup
	bash launch/demo.sh

clean:
	rm -rf runs demo_out .pytest_cache
