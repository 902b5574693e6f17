# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# .venv is (re)built only when requirements.txt or pyproject.toml change (stamp file).
# PyTorch: TORCH_VARIANT=cpu (default: a local wheel, else PyTorch's CPU index) or a CUDA
# build such as TORCH_VARIANT=cu128 (scripts/install_torch.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: venv demo demo-real test test-fast airflow bench-trl-venv clean

venv: $(STAMP)

$(STAMP):
	@echo ">> setting up $(VENV) (requirements changed or first run)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	@bash scripts/demo.sh

# the second demo: a real pretrained chat model (SmolLM2-135M-Instruct), converted once
demo-real: $(STAMP)
	@bash scripts/demo_real.sh

test: $(STAMP)
	@bash scripts/test.sh

# Airflow standalone with the project's DAGs and plugins + an MLflow UI (Ctrl-C stops)
airflow: $(STAMP)
	@bash scripts/airflow.sh

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# TRL 1.12, the last release with a PPOTrainer, for benchmarks/ppo_throughput.py: the
# project's own packages with TRL 1.12 in place of its TRL, so that both sides import the
# same libraries (transformers and accelerate load what is installed: boto3, scipy, ...)
BENCH_TRL := .rlhf/bench-trl112
bench-trl-venv: $(BENCH_TRL)/.installed

$(BENCH_TRL)/.installed: requirements.txt
	@test -x $(BENCH_TRL)/bin/python || $(PYTHON) -m venv $(BENCH_TRL)
	$(BENCH_TRL)/bin/python -m pip install -q --upgrade "pip==26.3"
	bash scripts/install_torch.sh $(BENCH_TRL)/bin/python
	$(BENCH_TRL)/bin/python -m pip install -q -r requirements.txt
	$(BENCH_TRL)/bin/python -m pip install -q --no-deps trl==1.12.0
	@touch $@

clean:
	rm -rf .rlhf
