# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# .venv is (re)built only when requirements.txt or pyproject.toml change (stamp file).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: venv demo test test-fast clean

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

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

clean:
	rm -rf .rlhf
