# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# .venv is (re)built only when requirements.txt or pyproject.toml change (stamp file).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: venv demo test test-fast airflow bench-trl-venv clean

venv: $(STAMP)

$(STAMP):
	@echo ">> setting up $(VENV) (requirements changed or first run)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP)
	@bash scripts/test.sh

# Airflow standalone with the project's DAGs and plugins + an MLflow UI (Ctrl-C stops)
airflow: $(STAMP)
	@bash scripts/airflow.sh

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# TRL 1.12, the last release with a PPOTrainer, in its own venv for benchmarks/ppo_throughput.py
bench-trl-venv:
	@test -x .rlhf/bench-trl112/bin/python || $(PYTHON) -m venv .rlhf/bench-trl112
	.rlhf/bench-trl112/bin/python -m pip install -q "torch==2.13.0"
	.rlhf/bench-trl112/bin/python -m pip install -q trl==1.12.0 transformers==5.24.0 \
		accelerate==1.15.0 datasets==5.2.0

clean:
	rm -rf .rlhf
