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

.PHONY: venv demo test test-fast bench-preprocess bench-quality bench-gradcam clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(PY) -m melanoma.demo

test: venv
	$(PY) -m pytest -q -rs

test-fast: venv
	$(PY) -m pytest -q -rs -m "not e2e and not slow"

bench-preprocess: venv
	$(PY) benchmarks/bench_preprocess.py

bench-quality: venv
	$(PY) benchmarks/bench_quality.py

bench-gradcam: venv
	$(PY) benchmarks/bench_gradcam.py

clean:
	rm -rf output
