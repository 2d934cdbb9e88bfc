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

# The ~6 GB of wheels go in with uv (https://docs.astral.sh/uv/), which unpacks and byte-compiles in
# parallel: 116 s against pip's 219 s from an empty cache on 2 cores (docs/benchmarks.md, "Setup").
# uv does not read pip's configuration, so the indexes pip is configured with here are handed on (read
# with the system pip: make expands a recipe before its first line makes the venv), and
# every index counts for every package, as in pip (uv's default takes a package from the first index).
UV_PIN := uv==0.13.9
PIP_SETTING = $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$(1)='\(.*\)'$$/\1/p")
UV = .venv/bin/uv pip install -q --python $(PY) --compile-bytecode --index-strategy unsafe-best-match \
	$(addprefix --extra-index-url ,$(sort $(call PIP_SETTING,extra-index-url))) $(addprefix --find-links ,$(sort $(call PIP_SETTING,find-links)))

.PHONY: setup test test-fast lint bench demo clean

setup: .venv/.done .venv/.project

.venv/.done: requirements.txt
	@command -v mpirun >/dev/null || { echo "setup: installing Open MPI (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin) >/dev/null || \
	  echo "setup: Open MPI not installed; mpirun tests will skip"; }
	@command -v java >/dev/null || { echo "setup: installing Java (apt; pycocoevalcap's PTB tokenizer and METEOR run on it)"; \
	  (apt-get update -qq && apt-get install -y -qq default-jre-headless) >/dev/null || \
	  echo "setup: Java not installed; caption scoring (COCO, MSR-VTT, AudioCaps, the demo's audio task) will fail"; }
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip $(UV_PIN)
	# torch first and pinned, so nothing later can swap it (README: "The two commands")
	$(UV) torch==2.14.1 torchvision==0.29.1
	# the pins win over a package's own caps (gradio 6.31 declares pillow<13; pillow 13.0.0 is the tested pin)
	$(UV) -r requirements.txt --overrides requirements.txt
	touch $@

# the project itself, editable, so launch/ scripts and subprocesses import it from anywhere; again whenever
# pyproject.toml changes (console scripts, package names), which a requirements-only stamp would miss
.venv/.project: pyproject.toml .venv/.done
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
