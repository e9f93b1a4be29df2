# `make test` and `make demo` work on a fresh clone: the first run creates .venv
# and installs the project with its test extras into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit demo bench chaos clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "eventbus needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest --cov --cov-report=term

test: lint typecheck unit

demo: $(STAMP)
	$(PY) examples/demo.py
	$(PY) examples/fulfilment.py

chaos: $(STAMP)
	$(PY) -m eventbus.chaos

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
