# `make test` and `make demo` work on a fresh clone: the first run creates .venv
# and installs the project with its test extras into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit postgres chromium docs docs-serve demo bench chaos screenshots clean

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

# The PostgreSQL tests (tests/postgres.py) use the local server: start its cluster
# if PostgreSQL is installed and the server is down. Where none can be had, those
# tests skip and say why (.ci/run makes them fail instead where PostgreSQL is installed).
PG_HOST ?= 127.0.0.1
PG_PORT ?= 5432
postgres:
	@if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h $(PG_HOST) -p $(PG_PORT); then \
		if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then \
			echo "starting PostgreSQL for the tests"; \
			for version in $$(ls /etc/postgresql); do \
				pg_ctlcluster --skip-systemctl-redirect $$version main start || true; \
			done; \
			for _ in $$(seq 50); do pg_isready -q -h $(PG_HOST) -p $(PG_PORT) && break; sleep 0.2; done; \
		fi; \
	fi

# The dashboard's browser tests (tests/dashboard/) drive Debian's chromium through its
# chromedriver: install both where they are missing and apt-get is at hand (as root).
# Where neither can be had, those tests skip and say why.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "installing chromium and chromium-driver for the dashboard's browser tests"; \
			apt-get install -y -q chromium chromium-driver >/dev/null \
				|| { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
				|| echo "could not install chromium: the browser tests will skip"; \
		else \
			echo "no chromium and no apt-get as root: the dashboard's browser tests will skip"; \
		fi; \
	fi

unit: $(STAMP) postgres chromium
	$(VENV)/bin/pytest --cov --cov-report=term

# The documentation site (mkdocs.yml, docs/): --strict turns every warning (a broken
# link, a page left out of the nav, a docstring that does not parse) into an error.
# Material's banner about MkDocs 2 is not ours to act on.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test: lint typecheck docs unit

demo: $(STAMP)
	$(PY) examples/demo.py
	$(PY) examples/fulfilment.py

# The dashboard's screenshots in docs/img, taken again by its browser tests.
screenshots: $(STAMP)
	UPDATE_SCREENSHOTS=1 $(VENV)/bin/pytest -q --no-cov tests/dashboard

chaos: $(STAMP)
	$(PY) -m eventbus.chaos

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis site
