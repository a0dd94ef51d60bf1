# The two commands: `make demo` and `make test`. Everything runs from .venv (made on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export SPARK_LOCAL_IP := 127.0.0.1
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo test test-fast test-stack stack-images test-chaos lint bench-preprocess bench-quality bench-gradcam clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(PY) -m pipeline.demo

# Everything but the Docker stack (which needs root and installs an engine): see test-stack.
test: venv
	$(PY) -m pytest -q -rs -m "not stack"

# The production stack for real (tests/test_stack.py): installs and starts a Docker engine when
# missing (as root), builds local stand-ins for the public base images, then the project's images,
# runs the DAG in `docker compose`, and tears everything down. .ci/run runs it after `make test`.
test-stack: venv
	$(MAKE) --no-print-directory stack-images && $(PY) -m pytest -q -rs -m stack tests/test_stack.py; \
		status=$$?; bash docker/local/engine.sh stop; exit $$status

# What test-stack needs before its test: the engine, the base-image stand-ins, a browser for the UI
# test and the project's images (each step keeps what is already there). CI runs it beside `make test`.
stack-images: venv
	bash docker/local/engine.sh
	bash docker/local/base-images.sh
	command -v chromedriver >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null)
	$(PY) tests/stack_compose.py build

# Fault injection into real runs (tests/test_chaos.py, also part of `make test`): object store down
# and frozen (moto behind a proxy), training killed, Spark worker killed, disk full (a tmpfs, root).
test-chaos: venv
	$(PY) -m pytest -q -rs -m chaos tests/test_chaos.py

# ruff (settings in pyproject.toml): lint, then the formatter in check mode (changes nothing).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: venv
	$(PY) -m pytest -q -rs -m "not e2e and not slow and not stack"

bench-preprocess: venv
	$(PY) benchmarks/bench_preprocess.py

bench-quality: venv
	$(PY) benchmarks/bench_quality.py

bench-gradcam: venv
	$(PY) benchmarks/bench_gradcam.py

clean:
	rm -rf output
